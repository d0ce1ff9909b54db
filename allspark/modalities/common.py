"""Pieces several built-in modalities share: size limits, the text schema, image resizing, and the
embedded default's standard quality bars."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..model.config import ModalityConfig
from ..model.registry import QualityBar
from ..model.schema import Field, InputSchema

MAX_TEXT_CHARS = 100_000
MAX_IMAGE_SIDE = 8192

# Quality bars of the embedded default (metrics in percent for accuracies).
ACCURACY_BAR = QualityBar("accuracy >= 90%", lambda r: r.get("top-1", r.get("OA", -1.0)) >= 90.0)
EXACT_MATCH_BAR = QualityBar("exact match >= 90%", lambda r: r["exact match"] >= 90.0)
R2_BAR = QualityBar("R2 >= 0.8", lambda r: r["R2"] >= 0.8)


def text_schema(mc: ModalityConfig) -> InputSchema:
    return InputSchema((Field("text", "text", max_chars=MAX_TEXT_CHARS),))


def resize(img: np.ndarray, size: int, scale: float = 1.0) -> np.ndarray:
    """(H, W, C) array -> (1, C, size, size) float32, bilinear with antialiasing."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)).permute(2, 0, 1)[None] * scale
    if t.shape[-2:] != (size, size):
        t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return t.contiguous().numpy()


def batch_of_one(x: Any, dtype: Any) -> np.ndarray:
    """An input as a contiguous array of `dtype` with a leading batch axis of 1."""
    return np.ascontiguousarray(np.asarray(x, dtype=dtype))[None]
