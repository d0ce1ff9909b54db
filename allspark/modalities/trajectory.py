"""Pedestrian trajectories (ETH): 8 observed (x, y) positions -> the next 12, in world coordinates.
Inputs are centred on the last observed point; postprocessing adds it back."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..model.config import HeadKind, ModalityConfig, TrajectoryConfig
from ..model.registry import DemoTask, ModalitySpec, QualityBar
from ..model.schema import Field, InputSchema, exact
from .common import ENCODERS
from .synthetic import geometry

NAME = "trajectory"


def schema(mc: ModalityConfig) -> InputSchema:
    # world coordinates in metres: projected systems (UTM) reach millions
    return InputSchema((Field("observed", "float", (exact(mc.encoder.obs_len, "steps"), exact(2, "xy")), max_abs=1e8),))


def preprocess(mc: ModalityConfig, x: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict]:
    obs = np.asarray(x["observed"], dtype=np.float64)  # (obs_len, 2) in metres; centred in float64
    origin = obs[-1].copy()
    return {"observed": np.ascontiguousarray(obs - origin, dtype=np.float32)[None]}, {"origin": origin}


def postprocess(mc: ModalityConfig, y: np.ndarray, context: dict) -> np.ndarray:
    return y.reshape(mc.encoder.pred_len, 2).astype(np.float64) + context["origin"]


def sample(mc: ModalityConfig, rng: np.random.Generator, v: int = 0) -> dict[str, Any]:
    steps = np.cumsum(rng.normal(0.4, 0.1, (mc.encoder.obs_len, 2)), axis=0) + rng.normal(0, 5, 2)
    return {"observed": steps.astype(np.float32)}


def stay(inputs: dict[str, Any], shape: tuple[int, ...]) -> np.ndarray:
    """Stay in place: (pred_len, 2)."""
    return np.repeat(inputs["observed"][-1:], shape[0], 0)


def constant_velocity(inputs: dict[str, Any], shape: tuple[int, ...]) -> np.ndarray:
    obs = inputs["observed"]
    return obs[-1] + np.arange(1, shape[0] + 1)[:, None] * (obs[-1] - obs[-2])


BAR = QualityBar("ADE <= 0.5 x stay-in-place and <= 1.1 x constant velocity",
                 lambda r: r["ADE"] <= 0.5 * r["ADE (stay)"] and r["ADE"] <= 1.1 * r["ADE (const-vel)"])

SPEC = ModalitySpec(
    name=NAME, task="pedestrian trajectory prediction (ETH)", metrics=("ADE", "FDE"), head=HeadKind.REGRESSION,
    prompts=("Based on their past positions and movements in a crowded environment, predict the future "
             "trajectory of a selected pedestrian",),
    schema=schema, preprocess=preprocess, postprocess=postprocess, sample=sample,
    file_types=(".csv", ".txt", ".npy"), quantity="future positions (x, y)", unit="m",
    encoder=ENCODERS + "TrajectoryEncoder", config_type=TrajectoryConfig, out_dim=lambda mc: mc.encoder.pred_len * 2,
    presets={"tiny": ModalityConfig(NAME, TrajectoryConfig(width=32, depth=2, heads=2)),
             "demo": ModalityConfig(NAME, TrajectoryConfig(width=64, depth=2, heads=4)),
             "base": ModalityConfig(NAME, TrajectoryConfig(width=768, depth=2, heads=12)),
             "paper": ModalityConfig(NAME, TrajectoryConfig(width=768, depth=2, heads=12))},
    demo=DemoTask(geometry.trajectory, BAR, stream=7, baselines={"stay": stay, "const-vel": constant_velocity}))
