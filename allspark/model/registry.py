"""The registry of modalities: one `ModalitySpec` per modality says everything modality-specific.

    register_modality(ModalitySpec(
        name="dem", task="terrain classification", metrics=("top-1",), head=HeadKind.CLASSIFICATION,
        prompts=("Which terrain is this?",), schema=..., preprocess=..., sample=...,
        encoder=DEMEncoder, config_type=DEMConfig,
        presets={"tiny": ModalityConfig("dem", DEMConfig(...), labels=("plain", "hill"))}))

or, from an installed package, an entry point in the group `allspark.modalities` naming a module
(that registers on import) or a callable (called with no arguments). The ten built-in modalities
are such a plug-in (`allspark.modalities`): the registry loads it, then the entry points, the first
time it is read. Nothing outside a spec branches on a modality's name.
"""

from __future__ import annotations

import importlib
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable

import numpy as np

from ..errors import ConfigError, UnknownModalityError
from ..plugins import load_entry_points
from .config import (
    HeadKind,
    ModalityConfig,
    normalize_modality,
    register_encoder_config,
)
from .schema import InputSchema

BUILTIN_PLUGIN = "allspark.modalities"
ENTRY_POINT_GROUP = "allspark.modalities"

Schema = Callable[[ModalityConfig], InputSchema]
# validated inputs -> (preprocessed arrays with a batch axis of 1, context for postprocessing)
Preprocess = Callable[[ModalityConfig, dict[str, Any]], tuple[dict[str, np.ndarray], dict[str, Any]]]
# (config, rng, shape variant) -> a valid request; variants > 0 vary sizes (other image sides, ...)
Sample = Callable[[ModalityConfig, np.random.Generator, int], dict[str, Any]]
Reader = Callable[[Path, ModalityConfig], dict[str, Any]]  # a file -> the request's fields
# (encoder weight shapes, keys relative to the encoder; the modality's default config; --config hints)
#   -> (the config those weights need, {field: "value (where it came from)"})
Infer = Callable[[Mapping[str, tuple[int, ...]], ModalityConfig, Mapping[str, Any]],
                 tuple[ModalityConfig, dict[str, str]]]


@dataclass(frozen=True)
class QualityBar:
    """The embedded default's bar for one modality: a rule in words and its test on the metrics."""

    rule: str
    check: Callable[[dict[str, float]], bool]


@dataclass(frozen=True)
class RasterMap:
    """How `allspark map` turns a raster scene (bands x rows x cols) into this modality's requests.

    unit "tile": one request per window of the scene, the window's pixels (rows, cols, bands) in
    `field`; unit "pixel": one request per pixel, its bands (a spectrum) in `field`.
    """

    unit: str  # "tile" | "pixel"
    field: str
    bands: Callable[[ModalityConfig], tuple[int, ...]]  # the band counts the encoder accepts
    tile: Callable[[ModalityConfig], int] = lambda mc: 1  # the default window side: the model's input size

    def __post_init__(self) -> None:
        if self.unit not in ("tile", "pixel"):
            raise ConfigError(f"RasterMap.unit: expected 'tile' or 'pixel', got {self.unit!r}")


# (config, rng, rows, cols) -> (scene: H x W x bands, truth: label index per cell, -1 where nodata,
# the scene's nodata value); a cell is one model-sized tile for tile modalities, one pixel for pixel ones
DemoScene = Callable[[ModalityConfig, np.random.Generator, int, int], tuple[np.ndarray, np.ndarray, float]]


@dataclass(frozen=True)
class DemoTask:
    """Synthetic data for a modality and how its results are judged (`allspark.demo`)."""

    # (config, rng) -> (request inputs, target: label index | array in postprocessed units | text)
    generate: Callable[[ModalityConfig, np.random.Generator], tuple[dict[str, Any], Any]]
    quality_bar: QualityBar
    stream: int | None = None  # the random stream of this modality's samples; None: from its name
    # reference predictors from the inputs alone: name -> (inputs, target shape) -> prediction
    baselines: Mapping[str, Callable[[dict[str, Any], tuple[int, ...]], np.ndarray]] = field(default_factory=dict)
    scene: DemoScene | None = None  # a georeferencable test scene for `allspark map` (raster modalities)

    def stream_id(self, modality: str) -> int:
        return self.stream if self.stream is not None else zlib.crc32(modality.encode())


def _count_labels(mc: ModalityConfig) -> int:
    return len(mc.labels)


def _unchanged(mc: ModalityConfig, y: np.ndarray, context: dict) -> np.ndarray:
    return y


_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class ModalitySpec:
    name: str
    task: str
    metrics: tuple[str, ...]
    head: HeadKind
    prompts: tuple[str, ...]  # the paper's Table XVI; prompts[0] is used at inference
    schema: Schema
    preprocess: Preprocess
    sample: Sample  # what export traces and validates with, and what tests and benchmarks send
    presets: Mapping[str, ModalityConfig]  # preset name -> this modality's config in it
    # the encoder's nn.Module class (its __init__ takes the config), or "module:Class" so that the
    # registry (and the onnxruntime path) never imports torch; None: text
    encoder: Any = None
    config_type: type | None = None  # the encoder's config dataclass
    out_dim: Callable[[ModalityConfig], int] = _count_labels  # the head's output size
    # head output (out_dim,) + preprocessing context -> value in the task's own shape and units
    postprocess: Callable[[ModalityConfig, np.ndarray, dict], np.ndarray] = _unchanged
    read: Reader | None = None  # `allspark run` file reader; None: the generic readers by extension
    # the file extensions `allspark run` reads for this modality (lower case, with the dot); empty: any
    file_types: tuple[str, ...] = ()
    # a regression head's answer in words and units, said once here: printed by `allspark run`,
    # the client and `Prediction.to_json` (e.g. "PM2.5", "ug/m3")
    quantity: str = ""
    unit: str = ""
    # inputs -> their canonical layout before validation (e.g. bands first -> bands last)
    layout: Callable[[ModalityConfig, dict[str, Any]], dict[str, Any]] | None = None
    label_sets: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # datasets' label names
    lynx_prefix: str = "encoder."  # the encoder's key prefix in a Lynx/AllSpark training checkpoint
    infer: Infer | None = None  # read the encoder's config from its weights (`allspark convert`)
    raster: RasterMap | None = None  # whole scenes through `allspark map`; None: not a raster modality
    # the fewest bits the encoder's weights keep in a quantized build: 8 keeps it int8 in an int4 build,
    # where int4 weight noise moves the answer itself (measured: docs/benchmarks/quantized.md)
    encoder_min_bits: int = 4
    demo: DemoTask | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "head", HeadKind(self.head))
        object.__setattr__(self, "prompts", tuple(self.prompts))
        object.__setattr__(self, "metrics", tuple(self.metrics))
        object.__setattr__(self, "file_types", tuple(t.lower() for t in self.file_types))
        if any(not t.startswith(".") for t in self.file_types):
            raise ConfigError(f"modality {self.name!r}: file_types are extensions with the dot, got {self.file_types}")
        if not _NAME.match(self.name):
            raise ConfigError(f"modality name {self.name!r}: expected lower case letters, digits and '_'")
        if (self.encoder is None) != (self.config_type is None):
            raise ConfigError(f"modality {self.name!r}: give both encoder and config_type, or neither (text)")
        for preset, mc in self.presets.items():
            if mc.modality != self.name:
                raise ConfigError(f"modality {self.name!r}: its {preset!r} preset config is for {mc.modality!r}")
            if self.config_type is not None and not isinstance(mc.encoder, self.config_type):
                raise ConfigError(f"modality {self.name!r}: its {preset!r} preset's encoder config is "
                                  f"{type(mc.encoder).__name__}, expected {self.config_type.__name__}")
            if self.head.classifies and not mc.labels:
                raise ConfigError(f"modality {self.name!r}: its {preset!r} preset has no labels to classify into")

    @property
    def has_encoder(self) -> bool:
        return self.encoder is not None

    @property
    def encoder_class(self) -> Any:
        """The encoder's class, imported on first use when named as "module:Class"."""
        if not isinstance(self.encoder, str):
            return self.encoder
        module, _, name = self.encoder.partition(":")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"modality {self.name!r}: cannot import its encoder {self.encoder} ({e})") from None

    @property
    def default_prompt(self) -> str:
        return self.prompts[0] if self.prompts else ""


# ---- the registry ---------------------------------------------------------------------------------

_SPECS: dict[str, ModalitySpec] = {}
_loaded = False


def register_modality(spec: ModalitySpec, replace: bool = False) -> ModalitySpec:
    """Add a modality (after the built-in ones, so their adapter-set order never moves)."""
    load_plugins()
    if not isinstance(spec, ModalitySpec):
        raise ConfigError(f"register_modality: expected a ModalitySpec, got {type(spec).__name__}")
    if spec.name in _SPECS and not replace and _SPECS[spec.name] is not spec:
        raise ConfigError(f"modality {spec.name!r} is already registered (pass replace=True to override)")
    if spec.config_type is not None:
        register_encoder_config(spec.config_type)
    _SPECS[spec.name] = spec
    return spec


def unregister_modality(name: str) -> None:
    """Remove a plug-in modality (tests; a process that reconfigures itself)."""
    _SPECS.pop(normalize_modality(name), None)


def load_plugins() -> None:
    """Load the built-in modalities, then every `allspark.modalities` entry point, once."""
    global _loaded
    if _loaded:
        return
    _loaded = True  # first: the plug-ins call register_modality while they load
    try:
        importlib.import_module(BUILTIN_PLUGIN)
    except BaseException:
        _loaded = False
        raise
    load_entry_points(ENTRY_POINT_GROUP, _call_if_callable, ConfigError, skip_module=BUILTIN_PLUGIN)


def _call_if_callable(obj: Any) -> None:
    """A modality entry point names a module (registered on import) or a function that registers."""
    if callable(obj):
        obj()


def specs() -> Mapping[str, ModalitySpec]:
    """Every registered modality, in registration order (built-ins first); a read-only view."""
    load_plugins()
    return MappingProxyType(_SPECS)


def modality_names() -> tuple[str, ...]:
    return tuple(specs())


def resolve_modality(m: object) -> str:
    """The canonical name of a registered modality, or UnknownModalityError listing the known ones."""
    name = normalize_modality(m)
    if name not in specs():
        raise UnknownModalityError(m, modality_names())
    return name


def spec(m: object) -> ModalitySpec:
    return _SPECS[resolve_modality(m)]


def random_inputs(mc: ModalityConfig, rng: np.random.Generator, shape_variant: int = 0) -> dict[str, Any]:
    """A valid request for `mc`'s modality, drawn from `rng` (the spec's sample factory)."""
    return spec(mc.modality).sample(mc, rng, shape_variant)
