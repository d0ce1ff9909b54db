"""Typed configuration of the AllSpark model: the LLM, the bridge, one encoder per modality.

Everything is a frozen dataclass that validates itself in ``__post_init__``; presets are looked up
by exact name (`tiny`, `demo`, `paper`). Numbers of the `paper` preset are ALLSPARK.md's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable

from ..errors import ConfigError


class Modality(str, Enum):
    LANGUAGE = "language"
    CODE = "code"
    TABLE = "table"
    RGB = "rgb"
    MSI = "msi"
    HSI = "hsi"
    SAR = "sar"
    TRAJECTORY = "trajectory"
    GRAPH = "graph"
    POINT_CLOUD = "point_cloud"


class HeadKind(str, Enum):
    CLASSIFICATION = "classification"
    PIXEL_CLASSIFICATION = "pixel_classification"  # HSI: one pixel's spectrum -> class
    REGRESSION = "regression"
    GENERATION = "generation"  # the LLM's own lm_head, through a generation loop


class Precision(str, Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"


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


EncoderConfig = ViTConfig | TableConfig | HSIConfig | SARConfig | TrajectoryConfig | GraphConfig | PointCloudConfig
_ENCODER_CLASSES = {c.__name__: c for c in
                    (ViTConfig, TableConfig, HSIConfig, SARConfig, TrajectoryConfig, GraphConfig,
                     PointCloudConfig)}


@dataclass(frozen=True)
class ModalityConfig:
    modality: Modality
    encoder: EncoderConfig | None = None  # None for language and code (tokenizer only)
    labels: tuple[str, ...] = ()  # classification label names
    label_set: str = ""  # the dataset the labels come from, e.g. "NWPU-RESISC45"
    frozen_encoder: bool = False  # RGB's EVA encoder is frozen and shared with Lynx

    def __post_init__(self) -> None:
        object.__setattr__(self, "modality", Modality(self.modality))


@dataclass(frozen=True)
class AllSparkConfig:
    name: str
    llm: LLMConfig
    bridge: BridgeConfig
    modalities: tuple[ModalityConfig, ...]
    max_prompt_tokens: int = 512

    def __post_init__(self) -> None:
        names = [m.modality for m in self.modalities]
        _require(len(set(names)) == len(names), f"modality listed twice in preset {self.name}")

    def modality(self, m: Modality | str) -> ModalityConfig:
        from .registry import resolve_modality  # late: registry imports this module

        m = resolve_modality(m)
        for mc in self.modalities:
            if mc.modality == m:
                return mc
        raise ConfigError(f"preset {self.name!r} has no {m.value} modality")

    @property
    def modality_names(self) -> tuple[str, ...]:
        return tuple(m.modality.value for m in self.modalities)

    def to_dict(self) -> dict[str, Any]:
        def enc(obj: Any) -> Any:
            if dataclasses.is_dataclass(obj):
                d = {f.name: enc(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
                if type(obj).__name__ in _ENCODER_CLASSES:
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
                    ecls = _ENCODER_CLASSES[e.pop("type")]
                    m["encoder"] = _build(ecls, e)
                mods.append(_build(ModalityConfig, m))
            return cls(name=d["name"], llm=_build(LLMConfig, d["llm"]),
                       bridge=_build(BridgeConfig, d["bridge"]), modalities=tuple(mods),
                       max_prompt_tokens=d.get("max_prompt_tokens", 512))
        except (KeyError, TypeError) as e:
            raise ConfigError(f"malformed model config: {e!r}") from e


def _build(cls: type, d: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# ---- label sets (the paper's datasets) ---------------------------------------------------------

NWPU_RESISC45 = (
    "airplane", "airport", "baseball_diamond", "basketball_court", "beach", "bridge", "chaparral",
    "church", "circular_farmland", "cloud", "commercial_area", "dense_residential", "desert",
    "forest", "freeway", "golf_course", "ground_track_field", "harbor", "industrial_area",
    "intersection", "island", "lake", "meadow", "medium_residential", "mobile_home_park",
    "mountain", "overpass", "palace", "parking_lot", "railway", "railway_station",
    "rectangular_farmland", "river", "roundabout", "runway", "sea_ice", "ship", "snowberg",
    "sparse_residential", "stadium", "storage_tank", "tennis_court", "terrace",
    "thermal_power_station", "wetland")
EUROSAT = ("AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
           "PermanentCrop", "Residential", "River", "SeaLake")
PAVIA_UNIVERSITY = ("Asphalt", "Meadows", "Gravel", "Trees", "Painted metal sheets", "Bare Soil",
                    "Bitumen", "Self-Blocking Bricks", "Shadows")
MSTAR_SOC = ("2S1", "BMP2", "BRDM_2", "BTR60", "BTR70", "D7", "T62", "T72", "ZIL131", "ZSU_23_4")
MODELNET40 = (
    "airplane", "bathtub", "bed", "bench", "bookshelf", "bottle", "bowl", "car", "chair", "cone",
    "cup", "curtain", "desk", "door", "dresser", "flower_pot", "glass_box", "guitar", "keyboard",
    "lamp", "laptop", "mantel", "monitor", "night_stand", "person", "piano", "plant", "radio",
    "range_hood", "sink", "sofa", "stairs", "stool", "table", "tent", "toilet", "tv_stand", "vase",
    "wardrobe", "xbox")

# The `demo` preset's synthetic label sets (allspark.demo renders one class per name).
DEMO_LABELS: dict[Modality, tuple[str, ...]] = {
    Modality.RGB: ("forest", "lake", "striped_farmland", "circular_farmland", "dense_residential",
                   "highway", "desert_dunes", "cloud"),
    Modality.MSI: ("forest", "grassland", "cropland", "bare_soil", "urban", "water", "wetland", "snow"),
    Modality.HSI: ("asphalt", "meadow", "gravel", "trees", "metal_roof", "bare_soil", "bitumen",
                   "brick", "shadow"),
    Modality.SAR: ("tank", "truck", "bulldozer", "armored_carrier", "rocket_launcher", "jeep", "bus",
                   "corner_reflector"),
    Modality.POINT_CLOUD: ("sphere", "cube", "cylinder", "cone", "torus", "pyramid", "hemisphere",
                           "plane"),
}

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Sentinel-2 reflectances are stored x10^4; these put typical values near unit scale.
S2_MEAN = (0.13,) * 13
S2_STD = (0.05,) * 13


def _modalities(vit: ViTConfig, msi: ViTConfig, table: TableConfig, hsi: HSIConfig, sar: SARConfig,
                traj: TrajectoryConfig, graph: GraphConfig, pc: PointCloudConfig
                ) -> tuple[ModalityConfig, ...]:
    M = Modality
    return (
        ModalityConfig(M.LANGUAGE),
        ModalityConfig(M.CODE),
        ModalityConfig(M.TABLE, table),
        ModalityConfig(M.RGB, vit, NWPU_RESISC45, "NWPU-RESISC45", frozen_encoder=True),
        ModalityConfig(M.MSI, msi, EUROSAT, "EuroSAT"),
        ModalityConfig(M.HSI, hsi, PAVIA_UNIVERSITY, "PaviaU"),
        ModalityConfig(M.SAR, sar, MSTAR_SOC, "MSTAR-SOC"),
        ModalityConfig(M.TRAJECTORY, traj),
        ModalityConfig(M.GRAPH, graph),
        ModalityConfig(M.POINT_CLOUD, pc, MODELNET40, "ModelNet40"),
    )


def _tiny() -> AllSparkConfig:
    w = dict(width=32, depth=1, heads=2)
    return AllSparkConfig(
        name="tiny",
        llm=LLMConfig(vocab_size=512, hidden_size=64, num_layers=4, num_heads=4,
                      intermediate_size=128, adapter_size=16, max_position_embeddings=512),
        bridge=BridgeConfig(num_latents=8, depth=2, heads=2, head_dim=16, ff_mult=2),
        modalities=_modalities(
            vit=ViTConfig(**w, image_size=28, patch_size=14, channels=3, mean=CLIP_MEAN, std=CLIP_STD),
            msi=ViTConfig(**w, image_size=16, patch_size=8, channels=13, mean=S2_MEAN, std=S2_STD),
            table=TableConfig(**w, cardinalities=(24, 12, 16), num_continuous=9),
            hsi=HSIConfig(**w, bands=103),
            sar=SARConfig(width=32, image_size=32, conv_channels=(8, 16)),
            traj=TrajectoryConfig(width=32, depth=2, heads=2),
            graph=GraphConfig(**w, num_nodes=12, in_steps=12, horizon=3),
            pc=PointCloudConfig(**w, num_points=64, num_groups=8, group_size=8),
        ),
        max_prompt_tokens=400,
    )


def _demo() -> AllSparkConfig:
    w = dict(width=64, depth=2, heads=4)
    cfg = AllSparkConfig(
        name="demo",
        llm=LLMConfig(vocab_size=1024, hidden_size=128, num_layers=4, num_heads=4,
                      intermediate_size=344, adapter_size=64, adapter_freq=1, max_position_embeddings=1024),
        bridge=BridgeConfig(num_latents=8, depth=2, heads=4, head_dim=32, ff_mult=4),
        modalities=_modalities(
            vit=ViTConfig(**w, image_size=56, patch_size=14, channels=3, mean=CLIP_MEAN, std=CLIP_STD),
            msi=ViTConfig(**w, image_size=32, patch_size=8, channels=13, mean=S2_MEAN, std=S2_STD),
            table=TableConfig(**w, cardinalities=(24, 12, 16), num_continuous=9),
            hsi=HSIConfig(**w, bands=103),
            sar=SARConfig(width=64, image_size=48, conv_channels=(16, 32)),
            traj=TrajectoryConfig(width=64, depth=2, heads=4),
            graph=GraphConfig(**w, num_nodes=24, in_steps=12, horizon=3),
            pc=PointCloudConfig(**w, num_points=256, num_groups=32, group_size=16),
        ),
        max_prompt_tokens=256,
    )
    # Trained from scratch on synthetic data (allspark.demo): its own label sets, and no frozen
    # pretrained RGB encoder to share.
    mods = tuple(dataclasses.replace(mc, labels=DEMO_LABELS[mc.modality],
                                     label_set=f"synthetic-{mc.modality.value}", frozen_encoder=False)
                 if mc.modality in DEMO_LABELS else mc for mc in cfg.modalities)
    return dataclasses.replace(cfg, modalities=mods)


def _paper() -> AllSparkConfig:
    eva = dict(width=1408, depth=40, heads=16, mlp_ratio=6144 / 1408)  # EVA ViT-g
    vitb = dict(width=768, depth=12, heads=12)
    return AllSparkConfig(
        name="paper",
        # The paper's accounting (Table XV) uses LLaMA's 32000-token vocabulary.
        llm=LLMConfig(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32,
                      intermediate_size=11008, adapter_size=2048, adapter_freq=2),
        bridge=BridgeConfig(num_latents=32, depth=3, heads=8, head_dim=64, ff_mult=4),
        modalities=_modalities(
            vit=ViTConfig(**eva, image_size=420, patch_size=14, channels=3, mean=CLIP_MEAN, std=CLIP_STD),
            msi=ViTConfig(**vitb, image_size=64, patch_size=8, channels=13, mean=S2_MEAN, std=S2_STD),
            table=TableConfig(width=768, depth=1, heads=12, cardinalities=(24, 31, 12, 12, 16),
                              num_continuous=10),
            hsi=HSIConfig(**vitb, bands=103),
            sar=SARConfig(width=768, image_size=128, conv_channels=(64, 256)),
            traj=TrajectoryConfig(width=768, depth=2, heads=12),
            graph=GraphConfig(width=768, depth=1, heads=12, num_nodes=207, in_steps=12, horizon=12),
            pc=PointCloudConfig(**vitb, num_points=1024, num_groups=64, group_size=32),
        ),
    )


PRESETS: dict[str, Callable[[], AllSparkConfig]] = {"tiny": _tiny, "demo": _demo, "paper": _paper}


def get_preset(name: str) -> AllSparkConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; expected one of: {', '.join(PRESETS)}") from None
