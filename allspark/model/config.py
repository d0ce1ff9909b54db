"""Typed configuration of the AllSpark model: the LLM, the bridge, one encoder per modality.

Everything is a frozen dataclass that validates itself in ``__post_init__``. A modality is named by
a string (the registry's key; `allspark.modalities.Modality` lists the ten built-in names), so a
plug-in modality configures like a built-in one. Encoder config classes are looked up by class name
when a config is read back from JSON: a plug-in registers its class with `register_encoder_config`.
Presets (`tiny`, `demo`, `base`, `paper`) are assembled in `allspark.model.presets`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum
from typing import Any

from ..errors import ConfigError


class HeadKind(str, Enum):
    """What a modality's answer is; every part asks these properties instead of listing kinds."""

    CLASSIFICATION = "classification"
    PIXEL_CLASSIFICATION = "pixel_classification"  # HSI: one pixel's spectrum -> class
    REGRESSION = "regression"
    GENERATION = "generation"  # the LLM's own lm_head, through a generation loop

    @property
    def classifies(self) -> bool:
        """Answers a label and a probability per label."""
        return self in (HeadKind.CLASSIFICATION, HeadKind.PIXEL_CLASSIFICATION)

    @property
    def generates(self) -> bool:
        """Answers text, token by token (no head module: the LLM's lm_head)."""
        return self == HeadKind.GENERATION

    @property
    def regresses(self) -> bool:
        """Answers values in the task's own shape and units."""
        return self == HeadKind.REGRESSION


class Precision(str, Enum):
    """Export precision of the graphs (bf16 is not offered: ONNX Runtime's CPU kernels lack it).
    int4 / int8: weight-only, block-wise quantization of the MatMul weights (ONNX Runtime's
    MatMulNBits; adapter sets as QMoE), written from the checkpoint a tensor at a time; activations,
    inputs and outputs stay fp32 (allspark.export.quantize)."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    INT4 = "int4"

    @property
    def quantized(self) -> bool:
        return self in (Precision.INT8, Precision.INT4)


def _require(cond: bool, what: str) -> None:
    if not cond:
        raise ConfigError(what)


@dataclass(frozen=True)
class LLMConfig:
    """LLaMA decoder plus Lynx's bottleneck adapters after every `adapter_freq`-th layer."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    num_kv_heads: int = 0  # 0: same as num_heads (LLaMA-7B has no GQA)
    adapter_size: int = 0  # bottleneck width of each adapter
    adapter_freq: int = 2  # adapters on layers 0, f, 2f, ...
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048

    def __post_init__(self) -> None:
        if self.num_kv_heads == 0:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        _require(self.hidden_size % self.num_heads == 0,
                 f"llm.hidden_size {self.hidden_size} must divide by num_heads {self.num_heads}")
        _require(self.num_heads % self.num_kv_heads == 0,
                 f"llm.num_heads {self.num_heads} must divide by num_kv_heads {self.num_kv_heads}")
        _require(self.adapter_size > 0, "llm.adapter_size must be > 0")
        _require(self.adapter_freq >= 1, "llm.adapter_freq must be >= 1")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def adapter_layers(self) -> tuple[int, ...]:
        return tuple(range(0, self.num_layers, self.adapter_freq))


@dataclass(frozen=True)
class BridgeConfig:
    """Lynx's Perceiver resampler; its width is the LLM's hidden size, its media width the encoder's."""

    num_latents: int = 32
    depth: int = 3
    heads: int = 8
    head_dim: int = 64
    ff_mult: int = 4

    def __post_init__(self) -> None:
        _require(min(self.num_latents, self.depth, self.heads, self.head_dim, self.ff_mult) >= 1,
                 "bridge: every size must be >= 1")


# ---- encoders: one config class per encoder family -------------------------------------------


@dataclass(frozen=True)
class TransformerDims:
    width: int
    depth: int
    heads: int
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        _require(self.width % self.heads == 0,
                 f"encoder width {self.width} must divide by heads {self.heads}")


@dataclass(frozen=True)
class ViTConfig(TransformerDims):
    """EVA-style ViT (RGB) or a ViT whose patch embedding takes C channels (MSI)."""

    image_size: int = 28
    patch_size: int = 14
    channels: int = 3
    mean: tuple[float, ...] = ()  # per channel, applied inside the encoder graph
    std: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.image_size % self.patch_size == 0,
                 f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        _require(len(self.mean) == len(self.std) == self.channels,
                 f"mean/std need {self.channels} values each, got {len(self.mean)}/{len(self.std)}")

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass(frozen=True)
class TableConfig(TransformerDims):
    """TabFormer-style: an embedding per discrete column, a 1->width map per continuous column."""

    cardinalities: tuple[int, ...] = (24, 12)  # discrete columns' category counts
    num_continuous: int = 10
    target_dims: int = 1


@dataclass(frozen=True)
class HSIConfig(TransformerDims):
    bands: int = 103


@dataclass(frozen=True)
class SARConfig:
    width: int
    image_size: int = 32
    channels: int = 2  # polarisations; single-channel inputs are repeated to fill
    conv_channels: tuple[int, int] = (16, 32)  # the first two conv layers; the third emits `width`


@dataclass(frozen=True)
class TrajectoryConfig(TransformerDims):
    obs_len: int = 8
    pred_len: int = 12


@dataclass(frozen=True)
class GraphConfig(TransformerDims):
    """STAEformer-style embedding; `width` = sum of the four concatenated parts."""

    num_nodes: int = 207
    in_steps: int = 12
    features: int = 1
    horizon: int = 12
    steps_per_day: int = 288
    # The head predicts each node's change from its last speed reading, which postprocessing adds
    # back (a residual forecast: zero is the last-value forecast). False, the head predicts the
    # speeds themselves: configs stored before this field (issue 30) read as False, so their heads
    # keep their meaning, and so do `base` and `paper` (the paper's head, as `allspark convert` reads
    # it from an AllSpark training checkpoint); `tiny` and `demo` set True.
    residual: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.width % 4 == 0, f"graph width {self.width} must divide by 4 (four parts)")


@dataclass(frozen=True)
class PointCloudConfig(TransformerDims):
    num_points: int = 256  # clouds are resampled to this many points before the encoder
    max_points: int = 100_000  # larger inputs are rejected
    num_groups: int = 16
    group_size: int = 8
    extra_features: int = 0  # d in K x (3 + d)


# Encoder config classes by name, for `AllSparkConfig.from_dict` (a config's JSON names its type).
_ENCODER_CONFIGS: dict[str, type] = {c.__name__: c for c in
                                     (ViTConfig, TableConfig, HSIConfig, SARConfig, TrajectoryConfig, GraphConfig,
                                      PointCloudConfig)}


def register_encoder_config(cls: type) -> type:
    """Make a plug-in's encoder config class readable from JSON (`register_modality` calls this)."""
    if not dataclasses.is_dataclass(cls):
        raise ConfigError(f"encoder config {cls!r} must be a dataclass")
    known = _ENCODER_CONFIGS.get(cls.__name__)
    if known is not None and known is not cls:
        raise ConfigError(f"encoder config name {cls.__name__!r} is taken by {known.__module__}.{known.__qualname__}")
    _ENCODER_CONFIGS[cls.__name__] = cls
    return cls


def normalize_modality(m: object) -> str:
    """A modality's canonical name: enum members give their value; `Point-Cloud` -> `point_cloud`."""
    name = m.value if isinstance(m, Enum) else str(m)
    return name.lower().replace("-", "_").replace(" ", "_")


@dataclass(frozen=True)
class ModalityConfig:
    modality: str
    encoder: Any = None  # the encoder family's config dataclass; None for text (tokenizer only)
    labels: tuple[str, ...] = ()  # classification label names
    label_set: str = ""  # the dataset the labels come from, e.g. "NWPU-RESISC45"
    frozen_encoder: bool = False  # RGB's EVA encoder is frozen and shared with Lynx

    def __post_init__(self) -> None:
        object.__setattr__(self, "modality", normalize_modality(self.modality))
        object.__setattr__(self, "labels", tuple(self.labels))


@dataclass(frozen=True)
class AllSparkConfig:
    name: str
    llm: LLMConfig
    bridge: BridgeConfig
    modalities: tuple[ModalityConfig, ...]  # in adapter-set order
    max_prompt_tokens: int = 512

    def __post_init__(self) -> None:
        object.__setattr__(self, "modalities", tuple(self.modalities))
        names = [m.modality for m in self.modalities]
        _require(len(set(names)) == len(names), f"modality listed twice in preset {self.name}")

    def modality(self, m: object) -> ModalityConfig:
        name = normalize_modality(m)
        for mc in self.modalities:
            if mc.modality == name:
                return mc
        raise ConfigError(f"preset {self.name!r} has no {name} modality")

    def to_dict(self) -> dict[str, Any]:
        def enc(obj: Any) -> Any:
            if dataclasses.is_dataclass(obj):
                d = {f.name: enc(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
                if type(obj).__name__ in _ENCODER_CONFIGS:
                    d["type"] = type(obj).__name__
                return d
            if isinstance(obj, Enum):
                return obj.value
            if isinstance(obj, tuple):
                return [enc(x) for x in obj]
            return obj

        return enc(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AllSparkConfig":
        try:
            mods = []
            for m in d["modalities"]:
                m = dict(m)
                if m.get("encoder") is not None:
                    e = dict(m["encoder"])
                    kind = e.pop("type")
                    if kind not in _ENCODER_CONFIGS:
                        raise ConfigError(f"modality {m.get('modality')!r}: unknown encoder config type {kind!r}; "
                                          f"known: {sorted(_ENCODER_CONFIGS)} (is its plug-in installed?)")
                    m["encoder"] = _build(_ENCODER_CONFIGS[kind], e)
                mods.append(_build(ModalityConfig, m))
            return cls(name=d["name"], llm=_build(LLMConfig, d["llm"]),
                       bridge=_build(BridgeConfig, d["bridge"]), modalities=tuple(mods),
                       max_prompt_tokens=d.get("max_prompt_tokens", 512))
        except (KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"malformed model config: {e!r}") from e


def _build(cls: type, d: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
