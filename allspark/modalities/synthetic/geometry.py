"""Synthetic geometry: point clouds of primitive shapes, and pedestrian trajectories.

Point clouds: points sampled uniformly by area on a primitive's surface, stretched per axis,
turned to any heading and slightly tilted, jittered, and of varying count (the preprocessing
resamples).
Trajectories: ETH-like pedestrians at 2.5 Hz (dt = 0.4 s) who walk straight, turn at a constant
rate or slow down to a stop; the observed points carry position noise.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ...model.config import ModalityConfig
from .synth import pick_class

Rng = np.random.Generator


# ---- point clouds --------------------------------------------------------------------------------

def _by_area(rng: Rng, n: int, areas: list[float]) -> np.ndarray:
    """How many of n points land on each part, proportional to its area."""
    return rng.multinomial(n, np.asarray(areas) / sum(areas))


def _disc(rng: Rng, n: int, r: float, z: float) -> np.ndarray:
    rad, th = r * np.sqrt(rng.random(n)), rng.uniform(0, 2 * np.pi, n)
    return np.stack([rad * np.cos(th), rad * np.sin(th), np.full(n, z)], -1)


def _triangles(rng: Rng, n: int, tris: np.ndarray) -> np.ndarray:
    """Uniform points on triangles (T, 3, 3), chosen by area."""
    area = 0.5 * np.linalg.norm(np.cross(tris[:, 1] - tris[:, 0], tris[:, 2] - tris[:, 0]), axis=-1)
    t = rng.choice(len(tris), n, p=area / area.sum())
    a, b = rng.random(n), rng.random(n)
    flip = a + b > 1
    a, b = np.where(flip, 1 - a, a), np.where(flip, 1 - b, b)
    p0, p1, p2 = tris[t, 0], tris[t, 1], tris[t, 2]
    return p0 + a[:, None] * (p1 - p0) + b[:, None] * (p2 - p0)


def _sphere(rng: Rng, n: int) -> np.ndarray:
    p = rng.normal(size=(n, 3))
    return p / np.linalg.norm(p, axis=-1, keepdims=True)


def _cube(rng: Rng, n: int) -> np.ndarray:
    p = rng.uniform(-1, 1, (n, 3))
    axis, sign = rng.integers(0, 3, n), rng.choice([-1.0, 1.0], n)
    p[np.arange(n), axis] = sign
    return p


def _cylinder(rng: Rng, n: int) -> np.ndarray:
    r, h = 1.0, rng.uniform(2.8, 3.8)  # taller than wide, unlike the cube
    side, top, bottom = _by_area(rng, n, [2 * np.pi * r * h, np.pi * r * r, np.pi * r * r])
    th = rng.uniform(0, 2 * np.pi, side)
    wall = np.stack([r * np.cos(th), r * np.sin(th), rng.uniform(-h / 2, h / 2, side)], -1)
    return np.concatenate([wall, _disc(rng, top, r, h / 2), _disc(rng, bottom, r, -h / 2)])


def _cone(rng: Rng, n: int) -> np.ndarray:
    r, h = 1.0, rng.uniform(1.5, 2.5)
    side, base = _by_area(rng, n, [np.pi * r * np.hypot(r, h), np.pi * r * r])
    t = np.sqrt(rng.random(side))  # uniform on the lateral surface: radius grows with sqrt
    th = rng.uniform(0, 2 * np.pi, side)
    wall = np.stack([r * t * np.cos(th), r * t * np.sin(th), h / 2 - h * t], -1)
    return np.concatenate([wall, _disc(rng, base, r, -h / 2)])


def _torus(rng: Rng, n: int) -> np.ndarray:
    big, small = 1.0, rng.uniform(0.25, 0.45)
    u = rng.uniform(0, 2 * np.pi, 4 * n)
    v = rng.uniform(0, 2 * np.pi, 4 * n)
    keep = rng.random(4 * n) < (big + small * np.cos(v)) / (big + small)  # area weighting
    u, v = np.resize(u[keep], n), np.resize(v[keep], n)  # >= 1.5 n kept in practice
    ring = big + small * np.cos(v)
    return np.stack([ring * np.cos(u), ring * np.sin(u), small * np.sin(v)], -1)


def _pyramid(rng: Rng, n: int) -> np.ndarray:
    h = rng.uniform(1.2, 2.0)
    c = np.array([[1, 1, 0], [-1, 1, 0], [-1, -1, 0], [1, -1, 0]], float)
    apex = np.array([0, 0, h])
    tris = [np.stack([c[i], c[(i + 1) % 4], apex]) for i in range(4)] + [c[[0, 1, 2]], c[[0, 2, 3]]]
    return _triangles(rng, n, np.stack(tris))


def _hemisphere(rng: Rng, n: int) -> np.ndarray:
    p = _sphere(rng, n)
    p[:, 2] = np.abs(p[:, 2])  # an open bowl
    return p


def _plane(rng: Rng, n: int) -> np.ndarray:
    return np.stack([rng.uniform(-1, 1, n), rng.uniform(-1, 1, n) * rng.uniform(0.5, 1), np.zeros(n)], -1)


_SHAPES: dict[str, Callable[[Rng, int], np.ndarray]] = {
    "sphere": _sphere, "cube": _cube, "cylinder": _cylinder, "cone": _cone, "torus": _torus,
    "pyramid": _pyramid, "hemisphere": _hemisphere, "plane": _plane}
POINT_CLOUD_CLASSES = tuple(_SHAPES)


def upright_rotation(rng: Rng) -> np.ndarray:
    """Any heading about the vertical axis and a tilt of up to ~10 degrees: objects stand upright,
    as in ModelNet40 (whose usual augmentation is the same)."""
    a = rng.uniform(0, 2 * np.pi)
    yaw = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    t, b = rng.normal(0, 0.1), rng.uniform(0, 2 * np.pi)
    axis = np.array([np.cos(b), np.sin(b), 0.0])
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    tilt = np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k  # Rodrigues
    return tilt @ yaw


def point_cloud(mc: ModalityConfig, rng: Rng) -> tuple[dict[str, Any], int]:
    c, name = pick_class(mc, tuple(_SHAPES), rng)
    e = mc.encoder
    n = int(rng.integers(int(0.6 * e.num_points), int(1.75 * e.num_points) + 1))
    xyz = _SHAPES[name](rng, n) * rng.uniform(0.85, 1.15, 3)  # per-axis stretch
    xyz = xyz @ upright_rotation(rng).T * rng.uniform(0.5, 2.0) + rng.normal(0, 1, 3)
    xyz = xyz + rng.normal(0, 0.015 * np.abs(xyz).max(), xyz.shape)
    extra = rng.uniform(0, 1, (n, e.extra_features))  # e.g. intensity, if the preset asks for it
    return {"points": np.concatenate([xyz, extra], 1).astype(np.float32)}, c


# ---- pedestrian trajectories ---------------------------------------------------------------------
DT = 0.4  # seconds per step (ETH at 2.5 Hz)
MOTIONS = ("walk", "turn", "stop")


def _speeds(rng: Rng, motion: str, steps: int, obs_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Speed (m/s) and heading rate (rad/s) of each of `steps` steps."""
    v0 = rng.uniform(0.8, 1.8)
    speed, omega = np.full(steps, v0), np.zeros(steps)
    if motion == "turn":
        omega[:] = rng.choice([-1, 1]) * rng.uniform(0.15, 0.45)
    elif motion == "stop":  # braking starts while observed, so it can be seen coming
        start, decel = int(rng.integers(2, obs_len)), rng.uniform(0.25, 0.6)
        t = np.maximum(np.arange(steps) - start, 0) * DT
        speed = np.maximum(v0 - decel * t, 0.0)
    return speed, omega + rng.normal(0, 0.03, steps)


def trajectory(mc: ModalityConfig, rng: Rng) -> tuple[dict[str, Any], np.ndarray]:
    """Observed (obs_len, 2) metres, target: the next pred_len positions (pred_len, 2)."""
    e = mc.encoder
    steps = e.obs_len + e.pred_len
    speed, omega = _speeds(rng, str(rng.choice(MOTIONS, p=[0.4, 0.35, 0.25])), steps, e.obs_len)
    heading = rng.uniform(0, 2 * np.pi) + np.cumsum(omega * DT)
    vel = speed[:, None] * np.stack([np.cos(heading), np.sin(heading)], -1)
    path = rng.uniform(-8, 8, 2) + np.cumsum(vel * DT, axis=0)  # (steps, 2)
    observed = path[:e.obs_len] + rng.normal(0, 0.03, (e.obs_len, 2))  # tracker noise
    return {"observed": observed.astype(np.float32)}, path[e.obs_len:].astype(np.float32)
