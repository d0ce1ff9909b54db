"""Preprocessing: one validated request -> the fixed-shape tensors its encoder takes (batch of 1).

These do the data-dependent work that has no place in an exported graph (resizing to the model's
resolution, resampling a point cloud to a fixed count, centring a trajectory). Normalisation with
learned or configured statistics is inside the encoders. Each returns ``(tensors, context)``; the
context is what postprocessing needs (e.g. a trajectory's origin).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from .config import ModalityConfig

Tensors = dict[str, torch.Tensor]


def _resize(img: np.ndarray, size: int, scale: float = 1.0) -> torch.Tensor:
    """(H, W, C) array -> (1, C, size, size) float32, bilinear with antialiasing."""
    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)).permute(2, 0, 1)[None] * scale
    if t.shape[-2:] != (size, size):
        t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return t.contiguous()


def image(mc: ModalityConfig, x: dict[str, Any]) -> tuple[Tensors, dict]:
    """RGB (uint8 0..255 or float 0..1) and MSI (reflectance) images."""
    img = x["image"]
    scale = 1.0 / 255.0 if img.dtype == np.uint8 else 1.0
    return {"image": _resize(img, mc.encoder.image_size, scale)}, {}


def sar(mc: ModalityConfig, x: dict[str, Any]) -> tuple[Tensors, dict]:
    img = x["image"]
    want = mc.encoder.channels
    if img.shape[-1] < want:  # single polarisation: repeat it to fill the encoder's channels
        img = np.repeat(img, want // img.shape[-1], axis=-1)
    return {"image": _resize(img, mc.encoder.image_size)}, {}


def spectrum(mc: ModalityConfig, x: dict[str, Any]) -> tuple[Tensors, dict]:
    return {"spectrum": torch.tensor(x["spectrum"], dtype=torch.float32)[None]}, {}


def table(mc: ModalityConfig, x: dict[str, Any]) -> tuple[Tensors, dict]:
    for i, (v, card) in enumerate(zip(x["discrete"], mc.encoder.cardinalities)):
        if not 0 <= v < card:
            raise InputError(mc.modality.value, f"discrete[{i}]", f"a category in [0, {card - 1}]", str(v))
    return {"discrete": torch.tensor(x["discrete"], dtype=torch.int64)[None],
            "continuous": torch.tensor(x["continuous"], dtype=torch.float32)[None]}, {}


def trajectory(mc: ModalityConfig, x: dict[str, Any]) -> tuple[Tensors, dict]:
    obs = np.asarray(x["observed"], dtype=np.float32)  # (obs_len, 2) in metres
    origin = obs[-1].copy()
    return {"observed": torch.from_numpy(obs - origin)[None]}, {"origin": origin}


def graph(mc: ModalityConfig, x: dict[str, Any]) -> tuple[Tensors, dict]:
    return {"series": torch.tensor(x["series"], dtype=torch.float32)[None],
            "time_of_day": torch.tensor(x["time_of_day"], dtype=torch.int64).reshape(1),
            "day_of_week": torch.tensor(x["day_of_week"], dtype=torch.int64).reshape(1)}, {}


def farthest_point_indices(xyz: np.ndarray, n: int) -> np.ndarray:
    """Deterministic farthest point sampling (start at point 0), O(n * K)."""
    dist = np.full(len(xyz), np.inf, dtype=np.float64)
    idx = np.empty(n, dtype=np.int64)
    cur = 0
    for i in range(n):
        idx[i] = cur
        dist = np.minimum(dist, ((xyz - xyz[cur]) ** 2).sum(-1))
        cur = int(dist.argmax())
    return idx


def point_cloud(mc: ModalityConfig, x: dict[str, Any]) -> tuple[Tensors, dict]:
    """Centre, scale to the unit sphere, resample to `num_points` (FPS down, cyclic repeat up)."""
    pts = np.asarray(x["points"], dtype=np.float32)  # (K, 3 + d)
    xyz = pts[:, :3] - pts[:, :3].mean(0)
    radius = float(np.sqrt((xyz ** 2).sum(-1)).max()) or 1.0
    pts = np.concatenate([xyz / radius, pts[:, 3:]], axis=1)
    n = mc.encoder.num_points
    if len(pts) > n:
        pts = pts[farthest_point_indices(pts[:, :3], n)]
    elif len(pts) < n:
        pts = pts[np.arange(n) % len(pts)]  # duplicates change neither max-pooling nor FPS much
    return {"points": torch.from_numpy(np.ascontiguousarray(pts))[None]}, {}


def text(mc: ModalityConfig, x: dict[str, Any]) -> tuple[Tensors, dict]:
    return {}, {"text": x["text"]}
