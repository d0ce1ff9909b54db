"""Pieces several built-in modalities share: size limits, the text schema, image resizing, and the
embedded default's standard quality bars."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..model.config import ModalityConfig
from ..model.registry import QualityBar
from ..model.schema import Field, InputSchema

ENCODERS = "allspark.model.encoders:"  # specs name encoder classes lazily: no torch until a model is built
MAX_TEXT_CHARS = 100_000
MAX_IMAGE_SIDE = 8192

# Quality bars of the embedded default (metrics in percent for accuracies).
ACCURACY_BAR = QualityBar("accuracy >= 90%", lambda r: r.get("top-1", r.get("OA", -1.0)) >= 90.0)
EXACT_MATCH_BAR = QualityBar("exact match >= 90%", lambda r: r["exact match"] >= 90.0)
R2_BAR = QualityBar("R2 >= 0.8", lambda r: r["R2"] >= 0.8)


def text_schema(mc: ModalityConfig) -> InputSchema:
    return InputSchema((Field("text", "text", max_chars=MAX_TEXT_CHARS),))


def resize(img: np.ndarray, size: int, scale: float = 1.0) -> np.ndarray:
    """(H, W, C) array -> (1, C, size, size) float32, bilinear with antialiasing: each channel as a
    PIL float image (the same filter as torch's `interpolate(antialias=True)`, to 1e-6; no torch)."""
    from PIL import Image

    x = np.ascontiguousarray(img, dtype=np.float32) * np.float32(scale)
    if x.shape[:2] != (size, size):
        x = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(x[..., c]), mode="F")
                                 .resize((size, size), Image.BILINEAR)) for c in range(x.shape[2])], -1)
    return np.ascontiguousarray(x.transpose(2, 0, 1))[None]


def batch_of_one(x: Any, dtype: Any) -> np.ndarray:
    """An input as a contiguous array of `dtype` with a leading batch axis of 1."""
    return np.ascontiguousarray(np.asarray(x, dtype=dtype))[None]


def channels_last(field: str, channels: Callable[[ModalityConfig], tuple[int, ...]], add_axis: bool = False
                  ) -> Callable[[ModalityConfig, dict[str, Any]], dict[str, Any]]:
    """A layout hook: an (C, H, W) array whose first axis is a valid channel count and whose last is
    not gets its channels moved last (bands-first GeoTIFFs, torch tensors); with `add_axis`, an
    (H, W) array gets a channel axis. When both ends are valid counts, the last axis is taken."""
    def layout(mc: ModalityConfig, inputs: dict[str, Any]) -> dict[str, Any]:
        a = inputs.get(field)
        if not isinstance(a, np.ndarray):
            return inputs
        valid = channels(mc)
        if a.ndim == 2 and add_axis:
            return {**inputs, field: a[..., None]}
        if a.ndim == 3 and a.shape[-1] not in valid and a.shape[0] in valid:
            return {**inputs, field: np.moveaxis(a, 0, -1)}
        return inputs

    return layout
