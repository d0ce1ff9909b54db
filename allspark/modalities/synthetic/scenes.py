"""Synthetic whole scenes for `allspark map`: mosaics of the demo's classes with a nodata corner.

A scene is a grid of cells: for tile modalities (RGB, MSI, SAR) a cell is one chip at the model's
input size, rendered by the same generator as the training data; for HSI a cell is one pixel. The
classes come in patches (as land cover does), and a corner of the scene is nodata (as the edge of a
satellite swath is), so a map run meets skipped windows. Each function returns
(scene rows x cols x bands, truth: label index per cell, -1 where nodata, the nodata value).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ...model.config import ModalityConfig
from . import imagery
from .synth import class_name, upsample

Rng = np.random.Generator
Chip = Callable[[ModalityConfig, Rng, str], np.ndarray]


def class_patches(rng: Rng, rows: int, cols: int, n: int, patch: float = 3.0) -> np.ndarray:
    """(rows, cols) label indices in patches of about `patch` cells: the arg-max of n smooth fields."""
    k, l = max(2, int(np.ceil(rows / patch)) + 1), max(2, int(np.ceil(cols / patch)) + 1)
    fields = np.stack([upsample(rng.normal(size=(k, l)), rows, cols) for _ in range(n)])
    return fields.argmax(0).astype(np.int64)


def nodata_corner(rows: int, cols: int) -> np.ndarray:
    """(rows, cols) bool: the cells of a triangle in the top-right corner (about 1/8 of the scene)."""
    r, c = np.mgrid[0:rows, 0:cols]
    return (c / max(cols, 1) - r / max(rows, 1)) > 0.5


def mosaic(chip: Chip, names: tuple[str, ...], nodata: float) -> Callable:
    """A tile modality's scene: rows x cols chips, each of its cell's class."""
    def scene(mc: ModalityConfig, rng: Rng, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray, float]:
        labels = mc.labels or names
        truth = class_patches(rng, rows, cols, len(labels))
        truth[nodata_corner(rows, cols)] = -1
        s = mc.encoder.image_size
        out = None
        for r in range(rows):
            for c in range(cols):
                if truth[r, c] < 0:
                    continue
                x = chip(mc, rng, class_name(mc, names, int(truth[r, c])))
                if out is None:
                    out = np.full((rows * s, cols * s, x.shape[-1]), nodata, x.dtype)
                out[r * s:(r + 1) * s, c * s:(c + 1) * s] = x
        if out is None:
            raise ValueError(f"a {rows} x {cols} scene is all nodata")
        return out, truth, nodata

    return scene


def _sar_chip(mc: ModalityConfig, rng: Rng, name: str) -> np.ndarray:
    return imagery.sar_chip(mc, rng, name)  # both polarisations: a scene has one band count


RGB_SCENE = mosaic(imagery.rgb_chip, imagery.RGB_CLASSES, 0)
MSI_SCENE = mosaic(imagery.msi_chip, imagery.MSI_CLASSES, -1.0)
SAR_SCENE = mosaic(_sar_chip, imagery.SAR_CLASSES, -1.0)
HSI_NODATA = -9999.0


def hsi_scene(mc: ModalityConfig, rng: Rng, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray, float]:
    """A hyperspectral cube: rows x cols pixels of the demo's materials, in patches of ~8 pixels."""
    names = imagery.HSI_CLASSES
    labels = mc.labels or names
    truth = class_patches(rng, rows, cols, len(labels), patch=8.0)
    truth[nodata_corner(rows, cols)] = -1
    out = np.full((rows, cols, mc.encoder.bands), HSI_NODATA, np.float32)
    valid = truth >= 0
    out[valid] = imagery.hsi_spectra(mc, rng, [class_name(mc, names, int(c)) for c in truth[valid]])
    return out, truth, HSI_NODATA
