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
