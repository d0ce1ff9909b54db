"""Runtime backends as plug-ins: the five calls a backend implements, and the registry that
`Runtime.load`, the CLI, `allspark bench` and serving read.

    encode(component, tensors) -> media          (B, n, d)      component: a route's encoder
    bridge(component, media)   -> bridge tokens  (B, N, H)
    head(component, hidden)    -> output         (B, out_dim)
    embed(input_ids)           -> embeddings     (B, T, H)
    decode(feed)               -> DecoderOutput(logits, hidden, present)

Component and tensor names are the manifest's (`allspark.contract`). A backend is one module with
a class whose `load(build, manifest, **options)` returns it, plus one `BackendSpec` registration:
in `BUILTIN` below, or from another package through the entry-point group `allspark.backends`
(its value a `BackendSpec`, or a callable that calls `register_backend`). Registration names the
factory as "module:attribute", so listing backends imports none of them.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np

from ..errors import BackendError
from ..plugins import load_entry_points

ENTRY_POINT_GROUP = "allspark.backends"


class DecoderOutput(NamedTuple):
    logits: np.ndarray | None  # (B, T, vocab); None where the caller did not ask for it
    hidden: np.ndarray | None  # (B, T, H) last hidden state
    # the KV cache after this call, in the manifest's `cache.present` order; device tensors only from
    # `prefill_on_device` (allspark.runtime.decoding.DeviceDecoding)
    present: list[np.ndarray]


@runtime_checkable
class Backend(Protocol):
    name: str

    def encode(self, component: str, tensors: Mapping[str, np.ndarray]) -> np.ndarray: ...

    def bridge(self, component: str, media: np.ndarray) -> np.ndarray: ...

    def head(self, component: str, hidden: np.ndarray) -> np.ndarray: ...

    def embed(self, input_ids: np.ndarray) -> np.ndarray: ...

    def decode(self, feed: Mapping[str, np.ndarray], last: bool = False) -> DecoderOutput:
        """The decoder over `feed`. `last`: logits and hidden state of the last position only
        ((B, 1, .)): a prefill needs no more, and a long prompt's full logits are B x T x vocab."""


@dataclass(frozen=True)
class BackendSpec:
    name: str
    factory: str  # "module:attribute" of a callable (build: Path, manifest: dict, **options) -> Backend
    description: str
    artifact: str | None = None  # the artifact format it runs (`allspark.contract`); None: the checkpoint
    variants: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # bench label -> options
    gpu_only: bool = False  # never among a CPU machine's default benchmark backends

    def factory_callable(self) -> Any:
        module, _, attr = self.factory.partition(":")
        try:
            obj: Any = importlib.import_module(module)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as e:
            raise BackendError(f"backend {self.name!r}: cannot import {self.factory} ({type(e).__name__}: {e})") from None
        return obj

    def options(self) -> tuple[str, ...]:
        """The keyword options its factory accepts."""
        params = list(inspect.signature(self.factory_callable()).parameters.values())[2:]  # after build, manifest
        return tuple(p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))

    def load(self, build: Path, manifest: dict, **options: Any) -> Backend:
        accepted = self.options()
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise BackendError(f"backend {self.name!r}: unknown option(s) {unknown}; it takes {list(accepted)}")
        return self.factory_callable()(build, manifest, **options)


BUILTIN = (
    BackendSpec("onnxruntime", "allspark.runtime.onnxruntime_backend:OrtBackend.load",
                "the build's ONNX graphs on ONNX Runtime (CPU, CUDA or TensorRT execution providers)",
                artifact="onnx",
                # device-resident decode loop (on the static-cache graph where the build has one)
                variants={"onnxruntime-cuda": {"providers": ["cuda"]},
                          "onnxruntime-cuda-growing": {"providers": ["cuda"], "static_cache": False},
                          "onnxruntime-cuda-host": {"providers": ["cuda"], "device_resident": False}}),
    BackendSpec("torch", "allspark.runtime.torch_backend:TorchBackend.load",
                "the PyTorch reference modules of the checkpoint the build came from",
                variants={"torch-compile": {"compile": True},
                          "torch-cuda": {"device": "cuda", "cuda_graphs": False},
                          "torch-cuda-compile": {"device": "cuda", "compile": True, "cuda_graphs": False},
                          "torch-cuda-graphs": {"device": "cuda", "cuda_graphs": True}}),
    BackendSpec("tensorrt", "allspark.runtime.tensorrt_backend:TrtBackend.load",
                "the build's TensorRT engines (allspark trt-engines; CUDA and TensorRT needed)",
                artifact="tensorrt", gpu_only=True),
)
GPU_VARIANT = "-cuda"  # variants whose label has this run on a CUDA GPU: never in the CPU defaults

_BACKENDS: dict[str, BackendSpec] = {}
_loaded = False


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for s in BUILTIN:
        _BACKENDS[s.name] = s
    load_entry_points(ENTRY_POINT_GROUP, _register_plugin, BackendError)


def _register_plugin(obj: Any) -> None:
    """A backend entry point names a `BackendSpec`, or a function that registers one."""
    if isinstance(obj, BackendSpec):
        register_backend(obj)
    elif callable(obj):
        obj()


def register_backend(spec: BackendSpec, replace: bool = False) -> BackendSpec:
    _load()
    if spec.name in _BACKENDS and not replace and _BACKENDS[spec.name] != spec:
        raise BackendError(f"backend {spec.name!r} is already registered (pass replace=True to override)")
    _BACKENDS[spec.name] = spec
    return spec


def backends() -> dict[str, BackendSpec]:
    _load()
    return dict(_BACKENDS)


def backend_names() -> tuple[str, ...]:
    return tuple(backends())


def get_backend(name: str) -> BackendSpec:
    known = backends()
    if name not in known:
        raise BackendError(f"backend: expected one of {list(known)}, got {name!r}")
    return known[name]


def load_backend(name: str, build: Path, manifest: dict, **options: Any) -> Backend:
    return get_backend(name).load(build, manifest, **options)
