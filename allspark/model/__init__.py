"""The PyTorch reference model of AllSpark, and what every runtime shares with it: configuration,
presets, the modality registry, the request pipeline and the decode loop.

Names resolve on first use, so `import allspark.model.registry` (or the runtime's onnxruntime
path) does not import torch and transformers through this package.
"""

from __future__ import annotations

from importlib import import_module

_EXPORTS = {
    "AllSpark": "model", "AllSparkConfig": "config", "HeadKind": "config", "ModalityConfig": "config",
    "Precision": "config", "ModalitySpec": "registry", "register_modality": "registry",
    "resolve_modality": "registry", "spec": "registry", "specs": "registry", "unregister_modality": "registry",
    "Prediction": "pipeline", "Row": "pipeline", "get_preset": "presets",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
