"""Point clouds (ModelNet40): K points of x, y, z (+ d features) -> the object's class. Clouds of any
size up to the preset's limit are centred, scaled to the unit sphere and resampled to its count."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..model.config import HeadKind, ModalityConfig, PointCloudConfig
from ..model.registry import DemoTask, ModalitySpec
from ..model.schema import Dim, Field, InputSchema, exact
from .common import ACCURACY_BAR, ENCODERS
from .labels import MODELNET40
from .synthetic import geometry

NAME = "point_cloud"


def schema(mc: ModalityConfig) -> InputSchema:
    e = mc.encoder
    return InputSchema((Field("points", "float", (Dim(1, e.max_points, name="points"),
                                                  exact(3 + e.extra_features, "xyz+features")), max_abs=1e9),))


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


def preprocess(mc: ModalityConfig, x: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict]:
    """Centre, scale to the unit sphere, resample to `num_points` (FPS down, cyclic repeat up)."""
    pts = np.asarray(x["points"], dtype=np.float64)  # (K, 3 + d); centred in float64 (georeferenced clouds)
    xyz = pts[:, :3] - pts[:, :3].mean(0)
    radius = float(np.sqrt((xyz ** 2).sum(-1)).max()) or 1.0
    pts = np.concatenate([xyz / radius, pts[:, 3:]], axis=1).astype(np.float32)
    n = mc.encoder.num_points
    if len(pts) > n:
        pts = pts[farthest_point_indices(pts[:, :3], n)]
    elif len(pts) < n:
        pts = pts[np.arange(n) % len(pts)]  # duplicates change neither max-pooling nor FPS much
    return {"points": np.ascontiguousarray(pts)[None]}, {}


def sample(mc: ModalityConfig, rng: np.random.Generator, v: int = 0) -> dict[str, Any]:
    e = mc.encoder
    n = max(8, e.num_points + (-e.num_points // 3 if v % 2 else 37 * v))
    return {"points": rng.normal(size=(n, 3 + e.extra_features)).astype(np.float32)}


def _config(cfg: PointCloudConfig, labels=MODELNET40, label_set="ModelNet40") -> ModalityConfig:
    return ModalityConfig(NAME, cfg, labels, label_set)


SPEC = ModalitySpec(
    name=NAME, task="object classification (ModelNet40)", metrics=("top-1",), head=HeadKind.CLASSIFICATION,
    prompts=("Look at the point cloud data characteristics and classify the object",),
    schema=schema, preprocess=preprocess, sample=sample, file_types=(".npy", ".ply", ".xyz", ".txt", ".csv"),
    encoder=ENCODERS + "PointCloudEncoder", config_type=PointCloudConfig,
    # its two max-pools over each group's points pass one point's int4 error through whole: at int4 the
    # demo's top-1 agreement with fp32 is 0.96, with this encoder at int8 0.995 (+42 MB at paper size)
    encoder_min_bits=8,
    presets={"tiny": _config(PointCloudConfig(width=32, depth=1, heads=2, num_points=64, num_groups=8, group_size=8)),
             "demo": _config(PointCloudConfig(width=64, depth=2, heads=4, num_points=256, num_groups=32, group_size=16),
                             geometry.POINT_CLOUD_CLASSES, "synthetic-point_cloud"),
             "base": _config(PointCloudConfig(width=768, depth=12, heads=12, num_points=1024, num_groups=64,
                                              group_size=32)),
             "paper": _config(PointCloudConfig(width=768, depth=12, heads=12, num_points=1024, num_groups=64,
                                               group_size=32))},
    label_sets={"ModelNet40": MODELNET40}, demo=DemoTask(geometry.point_cloud, ACCURACY_BAR, stream=9))
