"""What `allspark serve --start` will hold: the runtime's sessions once (the runtime layout:
`allspark_runtime` is one process whatever the instance counts), or once per component model
instance (components layout)."""

from __future__ import annotations

from ..memory import Need
from ..runtime.memory_plan import runtime_need
from .options import Layout, RepositoryOptions


def copies(manifest: dict, options: RepositoryOptions) -> int:
    """How many processes hold the build's weights."""
    return options.instances if options.layout == Layout.COMPONENTS else 1


def serving_need(manifest: dict, options: RepositoryOptions) -> Need:
    return runtime_need(manifest, "allspark serve --start", copies=copies(manifest, options))
