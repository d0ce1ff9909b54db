"""What `allspark serve --start` will hold: the runtime's sessions once per python model instance
that owns a `Runtime` (the runtime layout), or once per component model instance (components layout)."""

from __future__ import annotations

from ..memory import Need
from ..runtime.memory_plan import runtime_need
from .options import Layout, RepositoryOptions


def copies(manifest: dict, options: RepositoryOptions) -> int:
    """How many processes hold the build's weights."""
    from ..model.registry import spec

    if options.layout == Layout.COMPONENTS:
        return options.instances
    shared = int(any(not spec(m).head.generates for m in manifest["modalities"])) + int(
        any(spec(m).head.generates for m in manifest["modalities"]))  # allspark_entry, allspark_stream
    return options.entry_instances * shared


def serving_need(manifest: dict, options: RepositoryOptions) -> Need:
    n = copies(manifest, options)
    need = runtime_need(manifest, "allspark serve --start", copies=n)
    fits = list(need.fits)
    if options.layout == Layout.RUNTIME and options.entry_instances > 1:
        fits.append(("--entry-instances 1", runtime_need(manifest, "", copies=n // options.entry_instances).bytes))
    return Need(need.command, need.bytes, need.parts, tuple(fits))
