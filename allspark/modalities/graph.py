"""Traffic graphs (METR-LA): a window of sensor readings with time of day and day of week -> each
node's next `horizon` readings. With `GraphConfig.residual` (the presets the demo trainer trains:
tiny, demo) the head predicts each node's change from its last speed reading and postprocessing
adds that reading back, so a head that outputs zeros is the last-value forecast, the baseline the
model has to beat. `base` and `paper` keep the paper's head, which predicts the speeds."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..model.config import GraphConfig, HeadKind, ModalityConfig
from ..model.registry import DemoTask, ModalitySpec
from ..model.schema import Field, InputSchema, exact
from .common import ENCODERS, R2_BAR, batch_of_one
from .synthetic import records

NAME = "graph"


def schema(mc: ModalityConfig) -> InputSchema:
    e = mc.encoder
    return InputSchema((
        Field("series", "float", (exact(e.num_nodes, "nodes"), exact(e.in_steps, "steps"), exact(e.features, "features"))),
        Field("time_of_day", "int", (), (0, e.steps_per_day - 1)),
        Field("day_of_week", "int", (), (0, 6))))


def preprocess(mc: ModalityConfig, x: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict]:
    series = batch_of_one(x["series"], np.float32)  # (1, nodes, steps, features)
    context = {"last": series[0, :, -1, 0].copy()} if mc.encoder.residual else {}  # (nodes,) speed, mph
    return {"series": series,
            "time_of_day": np.asarray(x["time_of_day"], dtype=np.int64).reshape(1),
            "day_of_week": np.asarray(x["day_of_week"], dtype=np.int64).reshape(1)}, context


def postprocess(mc: ModalityConfig, y: np.ndarray, context: dict) -> np.ndarray:
    """The head's (nodes * horizon,) output -> speeds (nodes, horizon) in mph."""
    out = np.asarray(y, dtype=np.float32).reshape(mc.encoder.num_nodes, mc.encoder.horizon)
    return out + context["last"][:, None] if mc.encoder.residual else out


def sample(mc: ModalityConfig, rng: np.random.Generator, v: int = 0) -> dict[str, Any]:
    e = mc.encoder
    return {"series": rng.uniform(0, 70, (e.num_nodes, e.in_steps, e.features)).astype(np.float32),
            "time_of_day": int(rng.integers(0, e.steps_per_day)), "day_of_week": int(rng.integers(0, 7))}


def last_value(inputs: dict[str, Any], shape: tuple[int, ...]) -> np.ndarray:
    """Each node keeps its last reading: (nodes, horizon)."""
    return np.repeat(inputs["series"][:, -1, :1], shape[1], 1)


SPEC = ModalitySpec(
    name=NAME, task="traffic forecasting (METR-LA)", metrics=("RMSE", "MAE", "R2"), head=HeadKind.REGRESSION,
    prompts=("Given the current traffic data including vehicle flow rate, average speed, and time of day "
             "from the METR-LA dataset, predict the traffic flow",),
    schema=schema, preprocess=preprocess, postprocess=postprocess, sample=sample, file_types=(".npz",),
    quantity="speed per sensor (nodes x horizon)", unit="mph",
    encoder=ENCODERS + "GraphEncoder", config_type=GraphConfig, out_dim=lambda mc: mc.encoder.num_nodes * mc.encoder.horizon,
    presets={"tiny": ModalityConfig(NAME, GraphConfig(width=32, depth=1, heads=2, num_nodes=12, in_steps=12, horizon=3,
                                                      residual=True)),
             "demo": ModalityConfig(NAME, GraphConfig(width=64, depth=2, heads=4, num_nodes=24, in_steps=12, horizon=3,
                                                      residual=True)),
             # base and paper: the paper's head, which predicts the speeds themselves (`allspark convert`
             # reads an AllSpark training checkpoint's graph pack with the paper's defaults)
             "base": ModalityConfig(NAME, GraphConfig(width=768, depth=1, heads=12, num_nodes=207, in_steps=12,
                                                      horizon=12)),
             "paper": ModalityConfig(NAME, GraphConfig(width=768, depth=1, heads=12, num_nodes=207, in_steps=12,
                                                       horizon=12))},
    demo=DemoTask(records.graph, R2_BAR, stream=8, baselines={"last value": last_value}))
