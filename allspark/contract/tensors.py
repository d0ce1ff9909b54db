"""The I/O contract between the exported graphs and everything that runs them.

One name for one tensor: the exporter writes these names and symbolic dims into the ONNX graphs
and the manifest; the runtime, the Triton configs, the batching of the python models and the
benchmarks read them from there. Nothing here imports torch or onnxruntime.

    component          inputs                                   outputs
    <m>_encoder        the modality's preprocessed tensors       media          [batch, n, width]
    <m>_bridge         media [batch, num_tokens, width]          bridge_tokens  [batch, latents, hidden]
    <m>_head           hidden [batch, hidden]                    output         [batch, out_dim]
    embed_tokens       input_ids [batch, seq_len]                inputs_embeds  [batch, seq_len, hidden]
    decoder            inputs_embeds, attention_mask [batch, total_len], position_ids [batch, seq_len],
                       adapter_ids [batch], past_{key,value}.<i> [batch, kv_heads, past_len, head_dim]
                                                                 logits, last_hidden_state,
                                                                 present_{key,value}.<i> [.., total_len, ..]
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from ..errors import ConfigError

# ---- symbolic dimensions ------------------------------------------------------------------------

BATCH = "batch"
SEQ_LEN = "seq_len"  # new positions in this decoder call
PAST_LEN = "past_len"  # cached positions
TOTAL_LEN = "total_len"  # past_len + seq_len: the attention mask's length
NUM_TOKENS = "num_tokens"  # media tokens into a bridge
SYMBOLIC_DIMS = (BATCH, SEQ_LEN, PAST_LEN, TOTAL_LEN, NUM_TOKENS)

Dims = tuple[str | int, ...]


@dataclass(frozen=True)
class DimRange:
    """The sizes a symbolic dim takes: what TensorRT optimisation profiles and Triton's limits need."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 0 <= self.min <= self.opt <= self.max:
            raise ConfigError(f"dim range must satisfy 0 <= min <= opt <= max, got {self}")

    def to_json(self) -> dict[str, int]:
        return {"min": self.min, "opt": self.opt, "max": self.max}


def dim_ranges(max_prompt_tokens: int, num_latents: int, max_positions: int, max_media_tokens: int,
               max_batch: int = 32) -> dict[str, DimRange]:
    """Ranges of every symbolic dim for one model: a prefill holds the bridge tokens and a prompt;
    the cache never outgrows the LLM's positions."""
    seq = num_latents + max_prompt_tokens
    return {
        BATCH: DimRange(1, min(8, max_batch), max_batch),
        SEQ_LEN: DimRange(1, min(64, seq), seq),
        PAST_LEN: DimRange(0, min(seq, max_positions - 1), max_positions - 1),
        TOTAL_LEN: DimRange(1, min(seq + 16, max_positions), max_positions),
        NUM_TOKENS: DimRange(1, max_media_tokens, max_media_tokens),
    }


# Sizes the symbolic dims take in Triton warmup requests (consistent: total = past + seq).
WARMUP_DIMS: dict[str, int] = {SEQ_LEN: 8, PAST_LEN: 4, TOTAL_LEN: 12, NUM_TOKENS: 16}

# ---- tensor names --------------------------------------------------------------------------------

MEDIA = "media"
BRIDGE_TOKENS = "bridge_tokens"
HIDDEN = "hidden"
HEAD_OUTPUT = "output"
INPUT_IDS = "input_ids"
INPUTS_EMBEDS = "inputs_embeds"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
ADAPTER_IDS = "adapter_ids"
LOGITS = "logits"
LAST_HIDDEN_STATE = "last_hidden_state"
DECODER_INPUTS = (INPUTS_EMBEDS, ATTENTION_MASK, POSITION_IDS, ADAPTER_IDS)  # then the past
CACHE_POSITION = "cache_position"  # the static-cache decoder's slots written by this call (allspark.export.static_cache)


def cache_names(num_layers: int, prefix: str) -> list[str]:
    """`past_key.0, past_value.0, past_key.1, ...` (prefix "past") or the `present` outputs."""
    return [f"{prefix}_{kv}.{i}" for i in range(num_layers) for kv in ("key", "value")]


def past_names(num_layers: int) -> list[str]:
    return cache_names(num_layers, "past")


def present_names(num_layers: int) -> list[str]:
    return cache_names(num_layers, "present")


def new_names(num_layers: int) -> list[str]:
    """The static-cache decoder's outputs: this call's keys/values only (`new_key.0`, ...)."""
    return cache_names(num_layers, "new")


# ---- components ------------------------------------------------------------------------------------


class Kind(str, Enum):
    ENCODER = "encoder"
    BRIDGE = "bridge"
    HEAD = "head"
    EMBED_TOKENS = "embed_tokens"
    DECODER = "decoder"

    @property
    def per_modality(self) -> bool:
        return self in (Kind.ENCODER, Kind.BRIDGE, Kind.HEAD)


EMBED_COMPONENT = "embed_tokens"
DECODER_COMPONENT = "decoder"
STATIC_DECODER = "decoder_static"  # the decoder's static-cache graph: an artifact of `decoder`, not a component


def component_name(kind: Kind | str, modality: str | None = None) -> str:
    """The one way a component is named: `rgb_encoder`, `embed_tokens`, `decoder`."""
    kind = Kind(kind)
    if kind.per_modality:
        if not modality:
            raise ConfigError(f"a {kind.value} component belongs to a modality; none given")
        return f"{modality}_{kind.value}"
    return EMBED_COMPONENT if kind == Kind.EMBED_TOKENS else DECODER_COMPONENT


# ---- dtypes ----------------------------------------------------------------------------------------

# Tensors are described by numpy dtype names everywhere (manifest, specs); these map them.
PRECISION_DTYPES = {"fp32": "float32", "fp16": "float16", "int8": "float32", "int4": "float32"}  # export precision -> float dtype
ONNX_TO_NUMPY = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
                 "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool",
                 "tensor(uint8)": "uint8", "tensor(int8)": "int8"}
NUMPY_TO_TRITON = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "float64": "TYPE_FP64",
                   "int64": "TYPE_INT64", "int32": "TYPE_INT32", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8",
                   "bool": "TYPE_BOOL", "object": "TYPE_STRING"}
# Triton's wire names of the same types (the client's InferInput datatype)
NUMPY_TO_WIRE = {"float32": "FP32", "float16": "FP16", "float64": "FP64", "int64": "INT64", "int32": "INT32",
                 "int8": "INT8", "uint8": "UINT8", "bool": "BOOL", "object": "BYTES"}
FIELD_DTYPES = {"float": "float32", "int": "int64", "text": "object"}  # request field kind -> dtype


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32", "int64", ...
    dims: Dims
    range: tuple[int, int] | None = None  # inclusive bounds of an integer input (ids, positions, masks)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "dims": list(self.dims)}
        if self.range is not None:
            d["range"] = list(self.range)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "TensorSpec":
        r = d.get("range")
        return cls(d["name"], d["dtype"], tuple(d["dims"]), tuple(r) if r is not None else None)


def check_values(t: TensorSpec, x: Any) -> tuple[str, str] | None:
    """(expected, got) if the values of input `t` are wrong (non-finite floats, integers out of its
    range), else None. Component models run this on what they are sent directly, where no request
    schema stood in front."""
    import numpy as np

    a = np.asarray(x)
    if a.dtype.kind == "f" and a.size and not np.isfinite(a).all():
        return "finite values", "NaN or inf"
    if t.range is not None and a.size and a.dtype.kind in "iu":
        lo, hi = t.range
        if a.min() < lo or a.max() > hi:
            return f"values in [{lo}, {hi}]", f"values in [{a.min()}, {a.max()}]"
    return None


# ---- artifact formats ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArtifactFormat:
    """A file format a component can be exported to, and how Triton serves it natively."""

    name: str  # the key under a component's `artifacts` in the manifest
    suffix: str
    triton_backend: str  # the Triton backend that runs this format
    triton_file: str  # the file name that backend expects in a model version directory


ONNX = ArtifactFormat("onnx", ".onnx", "onnxruntime", "model.onnx")
TENSORRT = ArtifactFormat("tensorrt", ".plan", "tensorrt", "model.plan")  # engines: allspark.export.tensorrt_engines
# the decoder's static-cache graph (allspark.export.static_cache); the runtime's, never Triton's
STATIC_CACHE = ArtifactFormat("onnx-static-cache", ".onnx", "onnxruntime", "model.onnx")
_ARTIFACT_FORMATS: dict[str, ArtifactFormat] = {ONNX.name: ONNX, TENSORRT.name: TENSORRT, STATIC_CACHE.name: STATIC_CACHE}


def register_artifact_format(fmt: ArtifactFormat) -> ArtifactFormat:
    """Make a new format known (a plug-in's own engine format)."""
    _ARTIFACT_FORMATS[fmt.name] = fmt
    return fmt


def artifact_format(name: str) -> ArtifactFormat:
    try:
        return _ARTIFACT_FORMATS[name]
    except KeyError:
        raise ConfigError(f"unknown artifact format {name!r}; known: {sorted(_ARTIFACT_FORMATS)}") from None
