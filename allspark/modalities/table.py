"""Table: one row of discrete and continuous columns -> a regression target (PM2.5, PRSA Beijing)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..model.config import HeadKind, ModalityConfig, TableConfig
from ..model.readers import check_file_size, numeric_text, read_fields
from ..model.registry import DemoTask, ModalitySpec
from ..model.schema import Field, InputSchema, exact
from .common import ENCODERS, R2_BAR, batch_of_one
from .synthetic import records

NAME = "table"


def schema(mc: ModalityConfig) -> InputSchema:
    e = mc.encoder
    return InputSchema((Field("discrete", "int", (exact(len(e.cardinalities), "columns"),)),
                        Field("continuous", "float", (exact(e.num_continuous, "columns"),))))


def preprocess(mc: ModalityConfig, x: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict]:
    for i, (v, card) in enumerate(zip(x["discrete"], mc.encoder.cardinalities)):
        if not 0 <= v < card:
            raise InputError(NAME, f"discrete[{i}]", f"a category in [0, {card - 1}]", str(v))
    return {"discrete": batch_of_one(x["discrete"], np.int64),
            "continuous": batch_of_one(x["continuous"], np.float32)}, {}


def sample(mc: ModalityConfig, rng: np.random.Generator, v: int = 0) -> dict[str, Any]:
    e = mc.encoder
    return {"discrete": np.array([rng.integers(0, c) for c in e.cardinalities], dtype=np.int64),
            "continuous": rng.normal(size=e.num_continuous).astype(np.float32)}


def read(path: Path, mc: ModalityConfig) -> dict[str, Any]:
    """A CSV of one data row (after an optional header): discrete columns, then continuous."""
    if path.suffix.lower() != ".csv":
        return read_fields(path, schema(mc).names)
    check_file_size(path, 1 << 20)  # one row
    row = numeric_text(path)
    if row.shape[0] != 1:
        raise InputError(NAME, "<file>", "a CSV with one data row (after an optional header)", f"{row.shape[0]} rows")
    n_disc, n_cont = len(mc.encoder.cardinalities), mc.encoder.num_continuous
    if row.shape[1] != n_disc + n_cont:
        raise InputError(NAME, "<file>", f"a table row of {n_disc} discrete + {n_cont} continuous = {n_disc + n_cont} "
                         "columns", f"{row.shape[1]} columns")
    disc = row[0][:n_disc]
    if not np.all(disc == np.round(disc)):
        raise InputError(NAME, "discrete", f"integers in the first {n_disc} columns", str(disc.tolist()))
    return {"discrete": disc.astype(np.int64), "continuous": row[0][n_disc:]}


def _config(**kw) -> ModalityConfig:
    return ModalityConfig(NAME, TableConfig(**kw))


SPEC = ModalitySpec(
    name=NAME, task="PM2.5 regression (PRSA Beijing)", metrics=("RMSE", "MAE", "R2"), head=HeadKind.REGRESSION,
    prompts=("Please utilize the provided air quality indicators to accurately predict the "
             "concentrations of PM2.5 in the atmosphere",),
    schema=schema, preprocess=preprocess, sample=sample, read=read, file_types=(".csv", ".npz"),
    quantity="PM2.5", unit="ug/m3",
    encoder=ENCODERS + "TableEncoder", config_type=TableConfig, out_dim=lambda mc: mc.encoder.target_dims,
    presets={"tiny": _config(width=32, depth=1, heads=2, cardinalities=(24, 12, 16), num_continuous=9),
             "demo": _config(width=64, depth=2, heads=4, cardinalities=(24, 12, 16), num_continuous=9),
             "base": _config(width=768, depth=1, heads=12, cardinalities=(24, 31, 12, 12, 16), num_continuous=10),
             "paper": _config(width=768, depth=1, heads=12, cardinalities=(24, 31, 12, 12, 16), num_continuous=10)},
    demo=DemoTask(records.table, R2_BAR, stream=2))
