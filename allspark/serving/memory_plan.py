"""What `allspark serve --start` will hold: the runtime's sessions once per copy of the build its
layout keeps (the runtime layout: `allspark_runtime` is one process whatever the instance counts;
components layout: once per component model instance)."""

from __future__ import annotations

from ..memory import Need
from ..runtime.memory_plan import runtime_need
from .options import RepositoryOptions


def copies(manifest: dict, options: RepositoryOptions) -> int:
    """How many processes hold the build's weights (the layout says: `ServingLayout.copies`)."""
    return options.serving_layout.copies(options)


def serving_need(manifest: dict, options: RepositoryOptions) -> Need:
    return runtime_need(manifest, "allspark serve --start", copies=copies(manifest, options))
