"""ONNX Runtime sessions, set up in one place for the exporter's parity checks, the runtime's
onnxruntime backend and the Triton python models of the CPU target.

`onnxruntime` is imported when a session is made, not when this module is: the registry of
backends and the CLI list choices without paying for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import BackendError

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}


Provider = str | tuple[str, dict[str, str]]  # a name (aliases allowed), or (name, provider options)


def _name(p: Provider) -> str:
    return p[0] if isinstance(p, tuple) else p


def resolve_providers(providers: Sequence[Provider] | None) -> list[Provider]:
    """Execution providers (aliases allowed, each optionally with its options) that this
    onnxruntime build has, CPU last as the fallback for ops a GPU provider lacks."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted: list[Provider] = []
    for p in providers or ["cpu"]:
        full = PROVIDER_ALIASES.get(_name(p).lower(), _name(p))
        wanted.append((full, p[1]) if isinstance(p, tuple) else full)
    missing = [_name(p) for p in wanted if _name(p) not in available]
    if missing:
        raise BackendError(f"execution provider(s) {missing} not available in this onnxruntime "
                           f"build; available: {available}")
    if "CPUExecutionProvider" not in [_name(p) for p in wanted]:
        wanted.append("CPUExecutionProvider")
    return wanted


_SHARED_ARENA: list[bool] = []


def _register_shared_arena(ort: Any) -> None:
    """One CPU arena for the whole process, registered once with onnxruntime's environment."""
    if not _SHARED_ARENA:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
        _SHARED_ARENA.append(True)


def session(path: str | Path, threads: int = 0, spin: bool = True,
            providers: Sequence[Provider] | None = None, shared_arena: bool = False) -> Any:
    """An `InferenceSession` for `path`. `threads` 0 is onnxruntime's default; `spin=False` lets
    idle intra-op threads sleep, which is fair when several sessions or processes share the cores.
    `shared_arena`: the session allocates from one process-wide CPU arena instead of its own, so a
    pipeline of sessions run one after another (encoder, bridge, decoder) peaks at the largest one's
    working set, not at the sum of every session's own peak (`allspark map`: 948 -> 614 MB)."""
    import onnxruntime as ort

    if threads < 0:
        raise BackendError(f"threads: expected >= 0 (0: onnxruntime's default), got {threads}")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if shared_arena:
        _register_shared_arena(ort)
        opts.add_session_config_entry("session.use_env_allocators", "1")
    providers = resolve_providers(providers)
    names = [_name(p) for p in providers]
    if {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(names) and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # CUDA and cuDNN from the nvidia-* wheels torch uses, found before the session needs them
    try:
        sess = ort.InferenceSession(str(path), opts, providers=providers)
    except Exception as e:  # NoSuchFile, InvalidProtobuf, ...: onnxruntime's own exception types
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise BackendError(f"{path}: onnxruntime cannot load this graph ({type(e).__name__}: {first})") from None
    if names[0] != "CPUExecutionProvider" and sess.get_providers()[0] != names[0]:
        # onnxruntime falls back to CPU when a GPU provider's libraries fail to load: say so instead
        raise BackendError(f"{path}: {names[0]} did not start (missing CUDA/cuDNN/TensorRT libraries?); "
                           f"the session got {sess.get_providers()}")
    return sess


def arena_shrinking_run_options() -> Any:
    """Run options that give the CPU arena's unused memory back after each run (servers: a large
    batch would otherwise keep the process at its peak; no measurable cost at batch 1)."""
    import onnxruntime as ort

    ro = ort.RunOptions()
    ro.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return ro


def input_dtypes(sess: Any) -> dict[str, Any]:
    """A session's inputs by name, as numpy dtypes (an fp16 graph's floats: float16)."""
    import numpy as np

    from .contract.tensors import ONNX_TO_NUMPY

    return {i.name: np.dtype(ONNX_TO_NUMPY[i.type]) for i in sess.get_inputs()}
