"""allspark.runtime: the in-process runtime over a build, on any registered backend
(`onnxruntime`: the exported graphs; `torch`: the checkpoint they came from).

Names resolve on first use, so the backend registry (`allspark.runtime.backend`) and the command
line import neither torch nor transformers through this package.
"""

from __future__ import annotations

from importlib import import_module

_EXPORTS = {
    "GenerationConfig": "..model.generation", "Strategy": "..model.generation", "Prediction": "..model.pipeline",
    "Backend": ".backend", "BackendSpec": ".backend", "DecoderOutput": ".backend", "backend_names": ".backend",
    "register_backend": ".backend", "Request": ".runtime", "Runtime": ".runtime",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
