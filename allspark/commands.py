"""How a part of the package contributes to the `allspark` command line.

Each part's `cli` module lists `COMMANDS` (top-level subcommands) and may list `BENCH_TARGETS`
(targets of `allspark bench`); `allspark.cli` collects them, so no part edits another's parser.
A command's `arguments` and `run` may be given as "module:function" strings: they are imported
when that command is used, so `allspark --help` never pays for torch or onnxruntime.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Arguments = Callable[[argparse.ArgumentParser], None]  # adds the command's arguments
Run = Callable[[argparse.Namespace], int]  # returns the exit status


def _resolve(target: Callable | str) -> Callable:
    if callable(target):
        return target
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    arguments: Arguments | str
    run: Run | str

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        _resolve(self.arguments)(parser)

    def __call__(self, args: argparse.Namespace) -> Any:
        return _resolve(self.run)(args)


def at_least(low: int):
    """An argparse type: an integer >= `low` (`--threads -5` is refused with the range)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def port(text: str) -> int:
    """An argparse type: a TCP port, 0 meaning a free one."""
    value = at_least(0)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port in 0..65535, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value
