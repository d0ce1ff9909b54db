"""Hyperspectral: one pixel's spectrum (103 ROSIS bands for Pavia University) -> its class."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..model.config import HeadKind, HSIConfig, ModalityConfig
from ..model.readers import read_fields
from ..model.registry import DemoTask, ModalitySpec, RasterMap
from ..model.schema import Field, InputSchema, exact
from .common import ACCURACY_BAR, ENCODERS, batch_of_one
from .labels import PAVIA_UNIVERSITY
from .synthetic import imagery as synthetic
from .synthetic import scenes

NAME = "hsi"


def schema(mc: ModalityConfig) -> InputSchema:
    return InputSchema((Field("spectrum", "float", (exact(mc.encoder.bands, "bands"),)),))


def preprocess(mc: ModalityConfig, x: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict]:
    return {"spectrum": batch_of_one(x["spectrum"], np.float32)}, {}


def layout(mc: ModalityConfig, inputs: dict[str, Any]) -> dict[str, Any]:
    """One pixel given as 1 x 1 x C, C x 1 x 1 or 1 x C: the spectrum."""
    a = inputs.get("spectrum")
    if isinstance(a, np.ndarray) and a.ndim > 1 and a.size == mc.encoder.bands:
        return {**inputs, "spectrum": a.reshape(-1)}
    return inputs


def sample(mc: ModalityConfig, rng: np.random.Generator, v: int = 0) -> dict[str, Any]:
    return {"spectrum": rng.uniform(0.0, 1.0, mc.encoder.bands).astype(np.float32)}


def read(path: Path, mc: ModalityConfig) -> dict[str, Any]:
    """One pixel from any raster file: 1 x 1 x C (GeoTIFF, .npy) or C."""
    x = read_fields(path, schema(mc).names)
    return {**x, "spectrum": np.asarray(x["spectrum"]).reshape(-1)} if "spectrum" in x else x


def _config(labels=PAVIA_UNIVERSITY, label_set="PaviaU", **kw) -> ModalityConfig:
    return ModalityConfig(NAME, HSIConfig(**kw, bands=103), labels, label_set)


SPEC = ModalitySpec(
    name=NAME, task="per-pixel classification (Pavia University)", metrics=("OA", "AA", "kappa"),
    head=HeadKind.PIXEL_CLASSIFICATION,
    prompts=("Given the spectral information, can you help determine which class this pixel belongs to?",),
    schema=schema, preprocess=preprocess, sample=sample, read=read, file_types=(".tif", ".tiff", ".npy", ".npz"),
    layout=layout, encoder=ENCODERS + "HSIEncoder", config_type=HSIConfig,
    presets={"tiny": _config(width=32, depth=1, heads=2),
             "demo": _config(synthetic.HSI_CLASSES, "synthetic-hsi", width=64, depth=2, heads=4),
             "base": _config(width=768, depth=12, heads=12),
             "paper": _config(width=768, depth=12, heads=12)},
    label_sets={"PaviaU": PAVIA_UNIVERSITY}, raster=RasterMap("pixel", "spectrum", lambda mc: (mc.encoder.bands,)),
    demo=DemoTask(synthetic.hsi, ACCURACY_BAR, stream=5, scene=scenes.hsi_scene))
