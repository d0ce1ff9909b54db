"""The one registry of modalities. Each entry says everything modality-specific: the input schema,
preprocessing, encoder class, head kind and output size, prompts, and postprocessing.

Adding an eleventh modality means a `Modality` member, one `ModalitySpec` here and its encoder
config in the presets; nothing else in the package branches on modality names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from torch import nn

from ..errors import UnknownModalityError
from . import encoders as E
from . import preprocess as P
from .config import HeadKind, Modality, ModalityConfig
from .schema import Dim, Field, InputSchema, exact

MAX_TEXT_CHARS = 100_000
MAX_IMAGE_SIDE = 8192


@dataclass(frozen=True)
class ModalitySpec:
    modality: Modality
    task: str
    metrics: tuple[str, ...]
    head: HeadKind
    prompts: tuple[str, ...]  # the paper's Table XVI; prompts[0] is used at inference
    schema: Callable[[ModalityConfig], InputSchema]
    preprocess: Callable[[ModalityConfig, dict[str, Any]], tuple[dict, dict]]
    encoder: type[nn.Module] | None = None
    out_dim: Callable[[ModalityConfig], int] = lambda mc: len(mc.labels)
    # head output (out_dim,) + preprocessing context -> value in the task's own shape and units
    postprocess: Callable[[ModalityConfig, np.ndarray, dict], np.ndarray] = lambda mc, y, ctx: y

    @property
    def has_encoder(self) -> bool:
        return self.encoder is not None

    @property
    def default_prompt(self) -> str:
        return self.prompts[0] if self.prompts else ""


def _image_schema(channels: tuple[int, ...]) -> Callable[[ModalityConfig], InputSchema]:
    def schema(mc: ModalityConfig) -> InputSchema:
        side = Dim(mc.encoder.patch_size if hasattr(mc.encoder, "patch_size") else 8, MAX_IMAGE_SIDE)
        ch = Dim(0, choices=channels) if len(channels) > 1 else exact(channels[0], "channels")
        return InputSchema((Field("image", "float", (side, side, ch)),))
    return schema


def _text_schema(mc: ModalityConfig) -> InputSchema:
    return InputSchema((Field("text", "text", max_chars=MAX_TEXT_CHARS),))


M = Modality
_SPECS = (
    ModalitySpec(
        M.LANGUAGE, "sentiment (IMDB)", ("accuracy",), HeadKind.GENERATION,
        ("Please determine if this movie review is positive or negative?",),
        _text_schema, P.text, out_dim=lambda mc: 0),
    ModalitySpec(
        M.CODE, "code -> documentation (CodeSearchNet)", ("MRR", "exact match"), HeadKind.GENERATION,
        (), _text_schema, P.text, out_dim=lambda mc: 0),
    ModalitySpec(
        M.TABLE, "PM2.5 regression (PRSA Beijing)", ("RMSE", "MAE", "R2"), HeadKind.REGRESSION,
        ("Please utilize the provided air quality indicators to accurately predict the "
         "concentrations of PM2.5 in the atmosphere",),
        lambda mc: InputSchema((
            Field("discrete", "int", (exact(len(mc.encoder.cardinalities), "columns"),)),
            Field("continuous", "float", (exact(mc.encoder.num_continuous, "columns"),)))),
        P.table, E.TableEncoder, out_dim=lambda mc: mc.encoder.target_dims,
        postprocess=lambda mc, y, ctx: y),
    ModalitySpec(
        M.RGB, "scene classification (NWPU-RESISC45)", ("top-1",), HeadKind.CLASSIFICATION,
        ("This remote sensing image belongs to which of the following categories: [category list]",),
        _image_schema((3,)), P.image, E.ViTEncoder),
    ModalitySpec(
        M.MSI, "land-cover classification (EuroSAT)", ("top-1",), HeadKind.CLASSIFICATION,
        ("Based on the multi-spectral imagery feature description, please classify this object",),
        lambda mc: InputSchema((Field("image", "float", (Dim(mc.encoder.patch_size, MAX_IMAGE_SIDE),
                                                          Dim(mc.encoder.patch_size, MAX_IMAGE_SIDE),
                                                          exact(mc.encoder.channels, "bands"))),)),
        P.image, E.ViTEncoder),
    ModalitySpec(
        M.HSI, "per-pixel classification (Pavia University)", ("OA", "AA", "kappa"),
        HeadKind.PIXEL_CLASSIFICATION,
        ("Given the spectral information, can you help determine which class this pixel belongs to?",),
        lambda mc: InputSchema((Field("spectrum", "float", (exact(mc.encoder.bands, "bands"),)),)),
        P.spectrum, E.HSIEncoder),
    ModalitySpec(
        M.SAR, "target recognition (MSTAR SOC)", ("top-1",), HeadKind.CLASSIFICATION,
        ("Based on the SAR imagery feature description, please classify this object",),
        lambda mc: InputSchema((Field("image", "float", (Dim(8, MAX_IMAGE_SIDE), Dim(8, MAX_IMAGE_SIDE),
                                                          Dim(0, choices=(1, mc.encoder.channels)))),)),
        P.sar, E.SAREncoder),
    ModalitySpec(
        M.TRAJECTORY, "pedestrian trajectory prediction (ETH)", ("ADE", "FDE"), HeadKind.REGRESSION,
        ("Based on their past positions and movements in a crowded environment, predict the future "
         "trajectory of a selected pedestrian",),
        lambda mc: InputSchema((Field("observed", "float", (exact(mc.encoder.obs_len, "steps"),
                                                             exact(2, "xy"))),)),
        P.trajectory, E.TrajectoryEncoder, out_dim=lambda mc: mc.encoder.pred_len * 2,
        postprocess=lambda mc, y, ctx: y.reshape(mc.encoder.pred_len, 2) + ctx["origin"]),
    ModalitySpec(
        M.GRAPH, "traffic forecasting (METR-LA)", ("RMSE", "MAE", "R2"), HeadKind.REGRESSION,
        ("Given the current traffic data including vehicle flow rate, average speed, and time of day "
         "from the METR-LA dataset, predict the traffic flow",),
        lambda mc: InputSchema((
            Field("series", "float", (exact(mc.encoder.num_nodes, "nodes"), exact(mc.encoder.in_steps, "steps"),
                                      exact(mc.encoder.features, "features"))),
            Field("time_of_day", "int", (), (0, mc.encoder.steps_per_day - 1)),
            Field("day_of_week", "int", (), (0, 6)))),
        P.graph, E.GraphEncoder, out_dim=lambda mc: mc.encoder.num_nodes * mc.encoder.horizon,
        postprocess=lambda mc, y, ctx: y.reshape(mc.encoder.num_nodes, mc.encoder.horizon)),
    ModalitySpec(
        M.POINT_CLOUD, "object classification (ModelNet40)", ("top-1",), HeadKind.CLASSIFICATION,
        ("Look at the point cloud data characteristics and classify the object",),
        lambda mc: InputSchema((Field("points", "float", (Dim(1, mc.encoder.max_points, name="points"),
                                                           exact(3 + mc.encoder.extra_features, "xyz+features"))),)),
        P.point_cloud, E.PointCloudEncoder),
)

REGISTRY: dict[Modality, ModalitySpec] = {s.modality: s for s in _SPECS}
assert set(REGISTRY) == set(Modality), "every Modality needs exactly one registry entry"


def resolve_modality(m: Modality | str) -> Modality:
    if isinstance(m, Modality):
        return m
    try:
        return Modality(str(m).lower().replace("-", "_").replace(" ", "_"))
    except ValueError:
        raise UnknownModalityError(m, tuple(x.value for x in Modality)) from None


def spec(m: Modality | str) -> ModalitySpec:
    return REGISTRY[resolve_modality(m)]



def build_question(m: Modality, mc: ModalityConfig, prompt: str | None, context: dict) -> str:
    """The question put into Lynx's template: the prompt, plus the text for text modalities."""
    p = spec(m).default_prompt if prompt is None else prompt
    if mc.labels:
        p = p.replace("[category list]", ", ".join(mc.labels))
    if "text" in context:
        return f"{p} {context['text']}".strip()
    return p
