"""Entry points of installed packages, for the two registries that take plug-ins: modalities
(`allspark.modalities`) and runtime backends (`allspark.backends`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def load_entry_points(group: str, handle: Callable[[Any], None], error: type[Exception],
                      skip_module: str = "") -> None:
    """Load every entry point of `group` (except those in `skip_module`) and pass what it names to
    `handle`; a failure names the entry point and its package's target."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=group):
        if skip_module and ep.value.split(":")[0] == skip_module:
            continue
        try:
            handle(ep.load())
        except Exception as e:
            raise error(f"plug-in {ep.name!r} ({ep.value}) of {group!r} failed to load: {type(e).__name__}: {e}") from e
