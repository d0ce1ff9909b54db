"""Typed options of a Triton model repository: target, dynamic batching, instances, TensorRT, warmup.

    RepositoryOptions(target=Target.GPU,
                      batching=BatchingOptions(max_batch_size=32, preferred_batch_sizes=(4, 8, 16, 32)),
                      tensorrt=TensorRTOptions(enabled=True, fp16=True, engine_cache_dir="/cache/trt"))

Every option validates itself on construction and says what to fix (`ConfigError`). The CLI maps
one flag to one field (`allspark serve --help`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from ..contract.tensors import STATIC_CACHE, artifact_format
from ..errors import ConfigError
from .layouts import ARTIFACT_NEEDS_COMPONENTS, Layout, default_layout, serving_layout

__all__ = ["BatchingOptions", "Layout", "RepositoryOptions", "Target", "TensorRTOptions"]


class Target(str, Enum):
    """Where the component models run.

    GPU: `backend: "onnxruntime"` models on KIND_GPU (Triton's NGC build).
    CPU: python-backend models that run onnxruntime (the PyPI build in nvidia-pytriton has only the
    python backend). Entry models are python models on either target.
    """

    GPU = "gpu"
    CPU = "cpu"


@dataclass(frozen=True)
class BatchingOptions:
    """Triton's dynamic batcher on every component model (and the entries of single-pass modalities).

    `max_queue_delay_us` = 0 batches what queued while an instance was busy without waiting for more;
    a few hundred microseconds trade latency at low load for fuller batches on a GPU.
    `queue_timeout_us` rejects a request still in a model's queue after that long (0: never). Triton's
    per-request `timeout` may override it on a direct call, but an ensemble does not pass it on: a
    client's own timeout travels as the `deadline_unix_ns` parameter (`ServingClient(timeout_us=)`).
    """

    enabled: bool = True
    max_batch_size: int = 32
    preferred_batch_sizes: tuple[int, ...] = (4, 8, 16, 32)
    max_queue_delay_us: int = 0
    queue_timeout_us: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "preferred_batch_sizes", tuple(self.preferred_batch_sizes))
        if self.max_batch_size < 1:
            raise ConfigError(f"batching.max_batch_size must be >= 1, got {self.max_batch_size}")
        bad = [b for b in self.preferred_batch_sizes if not 1 <= b <= self.max_batch_size]
        if bad:
            raise ConfigError(f"batching.preferred_batch_sizes {bad} outside 1..max_batch_size "
                              f"({self.max_batch_size}); lower them or raise --max-batch-size")
        if list(self.preferred_batch_sizes) != sorted(set(self.preferred_batch_sizes)):
            raise ConfigError(f"batching.preferred_batch_sizes must be increasing and distinct, "
                              f"got {self.preferred_batch_sizes}")
        if self.max_queue_delay_us < 0 or self.queue_timeout_us < 0:
            raise ConfigError(f"batching.max_queue_delay_us and queue_timeout_us must be >= 0, got "
                              f"{self.max_queue_delay_us} and {self.queue_timeout_us}")


@dataclass(frozen=True)
class TensorRTOptions:
    """The TensorRT execution accelerator of the onnxruntime backend (GPU target only).

    Without explicit optimisation profiles ONNX Runtime's TensorRT provider builds an engine per new
    shape range it meets; `engine_cache_dir` keeps them across restarts (the directory must be
    writable by the server and is specific to one GPU, driver and TensorRT version).
    """

    enabled: bool = False
    fp16: bool = True
    engine_cache_dir: str = ""  # "": no engine cache
    max_workspace_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        if self.max_workspace_bytes < 1 << 20:
            raise ConfigError(f"tensorrt.max_workspace_bytes must be >= 1 MiB, got {self.max_workspace_bytes}")

    def parameters(self) -> dict[str, str]:
        """The accelerator's parameters, by the onnxruntime backend's own keys."""
        p = {"precision_mode": "FP16" if self.fp16 else "FP32",
             "max_workspace_size_bytes": str(self.max_workspace_bytes)}
        if self.engine_cache_dir:
            p.update(trt_engine_cache_enable="true", trt_engine_cache_path=self.engine_cache_dir)
        return p


@dataclass(frozen=True)
class RepositoryOptions:
    """Everything `allspark serve` can vary in a repository it writes."""

    target: Target = Target.GPU
    # a registered layout's name (`allspark.serving.layouts`; Layout names the built-in ones);
    # None: runtime on the CPU target (measured faster), components on the GPU
    layout: str | Layout | None = None
    artifact: str = "onnx"  # the exported format the GPU target serves natively (allspark.contract)
    batching: BatchingOptions = field(default_factory=BatchingOptions)
    tensorrt: TensorRTOptions = field(default_factory=TensorRTOptions)
    instances: int = 1  # instances per component model (GPU: per listed GPU)
    # instances per shared entry model (runtime layout: forwarder instances and allspark_runtime's
    # single-pass worker threads, never copies of the weights): 2, because one python-backend instance
    # sometimes sat ~500 ms between two batches while requests waited (Triton 2.51, CPU)
    entry_instances: int = 2
    gpus: tuple[int, ...] = ()  # KIND_GPU device ids; (): every visible GPU
    warmup: bool = True  # every model answers once before the server reports it ready
    threads: int = 0  # onnxruntime intra-op threads inside CPU component models (0: onnxruntime's default)
    # the python models' onnxruntime execution providers (CPU target): ("cuda",) serves the python-backend
    # repository from a GPU. Single-pass batches keep their tensors on it, and served streams join the
    # device plane's static cache (`allspark.runtime.decoding.SlotState`): no host round trip per token
    # (tested on torch CPU tensors; not yet run on a GPU)
    providers: tuple[str, ...] = ()
    max_new_tokens: int = 64  # generation entries' default; a request may ask for 1 .. the build's max positions
    max_generation_threads: int = 64  # concurrent streams per generation-entry instance
    # largest request an entry accepts (all inputs together): 64 MiB holds 27 float32 RGB tiles of
    # 448 px, or one 2048 x 2048 x 4-band float32 scene; whole scenes go through `allspark map`,
    # which tiles them, not through one request
    max_request_mb: float = 64.0
    bls_timeout_ms: int = 30_000  # components layout: a BLS call queued longer fails its request

    def __post_init__(self) -> None:
        object.__setattr__(self, "target", Target(self.target))
        object.__setattr__(self, "gpus", tuple(self.gpus))
        if self.layout is None:
            object.__setattr__(self, "layout", default_layout(self.target))
        object.__setattr__(self, "layout", serving_layout(self.layout).name)  # a plain str; raises if unknown
        artifact_format(self.artifact)  # raises ConfigError naming the known formats
        if self.artifact == STATIC_CACHE.name:
            raise ConfigError(f"artifact {STATIC_CACHE.name!r}: the runtime's decoder graph, not a Triton model "
                              "(Triton serves 'onnx' or 'tensorrt')")
        if self.tensorrt.enabled and self.target != Target.GPU:
            raise ConfigError("tensorrt: the TensorRT accelerator needs --target gpu "
                              "(the CPU target runs onnxruntime's CPU provider inside python models)")
        self.serving_layout.validate(self)  # its own rules (runtime: no TensorRT, ONNX only)
        if self.artifact != "onnx" and self.target != Target.GPU:
            raise ConfigError(ARTIFACT_NEEDS_COMPONENTS.format(self.artifact))
        if self.artifact == "tensorrt" and self.tensorrt.enabled:
            raise ConfigError("--trt-plans serves prebuilt engines on Triton's tensorrt backend; --trt is onnxruntime's "
                              "TensorRT accelerator for ONNX graphs: choose one")
        if self.gpus and self.target != Target.GPU:
            raise ConfigError("gpus: device ids apply to --target gpu only")
        for name in ("instances", "entry_instances", "max_new_tokens", "max_generation_threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_request_mb <= 0 or self.bls_timeout_ms < 1:
            raise ConfigError(f"max_request_mb must be > 0 and bls_timeout_ms >= 1, got {self.max_request_mb} "
                              f"and {self.bls_timeout_ms}")
        if self.threads < 0:
            raise ConfigError(f"threads must be >= 0 (0: onnxruntime's default), got {self.threads}")
        object.__setattr__(self, "providers", tuple(self.providers))
        if self.providers and self.target != Target.CPU:
            raise ConfigError("providers: the python models' execution providers apply to --target cpu (the "
                              "gpu target serves on Triton's own onnxruntime backend, on KIND_GPU)")
        if any(g < 0 for g in self.gpus):
            raise ConfigError(f"gpus: device ids must be >= 0, got {self.gpus}")

    @property
    def serving_layout(self):
        """The layout object (`allspark.serving.layouts.ServingLayout`) this repository is written in."""
        return serving_layout(self.layout)

    def to_json(self) -> dict:
        from dataclasses import asdict

        d = asdict(self)
        d["target"] = self.target.value
        d["layout"] = self.layout
        return d
