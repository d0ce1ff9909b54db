"""An eleventh modality defined entirely outside the package: a digital elevation model (DEM).

H x W x 1 float heights (metres) -> terrain class. It uses only the public plug-in surface: a
`ModalitySpec` (schema, preprocessing, sample factory, file reader, encoder, head kind, prompts,
label set, a `tiny` preset, a demo task) registered with `register_modality`, or through the
`allspark.modalities` entry point (`register` below).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from allspark.model.readers import read_fields
from allspark.model import HeadKind, ModalityConfig, ModalitySpec, register_modality
from allspark.model.registry import DemoTask, QualityBar
from allspark.model.schema import Dim, Field, InputSchema, exact

NAME = "dem"
TERRAIN = ("plain", "hills", "mountains", "canyon")


@dataclass(frozen=True)
class DEMConfig:
    width: int
    image_size: int = 16  # heights are resampled to this many cells a side
    patch: int = 4


class DEMEncoder(nn.Module):
    """Relief relative to the tile's mean, a patch embedding, and slopes as extra channels."""

    def __init__(self, cfg: DEMConfig):
        super().__init__()
        self.embed = nn.Conv2d(3, cfg.width, cfg.patch, cfg.patch)
        self.mlp = nn.Sequential(nn.GELU(), nn.Linear(cfg.width, cfg.width))
        self.register_buffer("scale", torch.tensor(100.0))  # metres per unit of relief

    def forward(self, heights: torch.Tensor) -> torch.Tensor:
        z = (heights - heights.mean(dim=(2, 3), keepdim=True)) / self.scale  # (B, 1, S, S)
        dy = torch.diff(z, dim=2, append=z[:, :, -1:])  # slopes along each axis
        dx = torch.diff(z, dim=3, append=z[:, :, :, -1:])
        x = self.embed(torch.cat([z, dy, dx], dim=1)).flatten(2).transpose(1, 2)  # (B, P, W)
        return x + self.mlp(x)


def schema(mc: ModalityConfig) -> InputSchema:
    side = Dim(mc.encoder.patch, 4096)
    return InputSchema((Field("heights", "float", (side, side, exact(1, "channels"))),))


def preprocess(mc: ModalityConfig, x: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict]:
    h = np.asarray(x["heights"], np.float64)[..., 0]
    s = mc.encoder.image_size
    rows = np.linspace(0, h.shape[0] - 1, s).round().astype(int)  # nearest-cell resampling
    cols = np.linspace(0, h.shape[1] - 1, s).round().astype(int)
    return {"heights": h[np.ix_(rows, cols)][None, None].astype(np.float32)}, {}


def _terrain(rng: np.random.Generator, kind: int, side: int) -> np.ndarray:
    y, x = np.mgrid[0:side, 0:side] / side
    relief = (5.0, 80.0, 900.0, 300.0)[kind]
    h = relief * np.sin(rng.uniform(2, 6) * x + rng.uniform(0, 6)) * np.cos(rng.uniform(2, 6) * y)
    if kind == 3:  # a canyon: a deep cut across the tile
        h -= 600.0 * np.exp(-((x - rng.uniform(0.3, 0.7)) / 0.06) ** 2)
    return (h + rng.uniform(0, 2000) + rng.normal(0, 1, h.shape))[..., None].astype(np.float32)


def sample(mc: ModalityConfig, rng: np.random.Generator, v: int = 0) -> dict[str, Any]:
    return {"heights": _terrain(rng, int(rng.integers(4)), mc.encoder.image_size + 3 * v)}


def generate(mc: ModalityConfig, rng: np.random.Generator) -> tuple[dict[str, Any], int]:
    kind = int(rng.integers(len(TERRAIN)))
    return {"heights": _terrain(rng, kind, 24)}, kind


def read(path: Path, mc: ModalityConfig) -> dict[str, Any]:
    """Any raster the generic readers take; a 2-D array gets its channel axis."""
    x = read_fields(path, ("heights",))
    h = np.asarray(x["heights"])
    return {"heights": h[..., None] if h.ndim == 2 else h}


SPEC = ModalitySpec(
    name=NAME, task="terrain classification from elevation", metrics=("top-1",), head=HeadKind.CLASSIFICATION,
    prompts=("This elevation model shows which kind of terrain: [category list]",),
    schema=schema, preprocess=preprocess, sample=sample, read=read, encoder=DEMEncoder, config_type=DEMConfig,
    presets={"tiny": ModalityConfig(NAME, DEMConfig(width=32), TERRAIN, "synthetic-terrain")},
    label_sets={"synthetic-terrain": TERRAIN},
    demo=DemoTask(generate, QualityBar("accuracy >= 90%", lambda r: r["top-1"] >= 90.0)))


def register() -> None:
    """The entry point: `[project.entry-points."allspark.modalities"] dem = "dem_plugin:register"`."""
    register_modality(SPEC)
