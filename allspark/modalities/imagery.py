"""Image modalities: RGB scenes (Lynx's EVA ViT), multispectral Sentinel-2 (a ViT with a C-band patch
embedding) and SAR chips (a 3-layer CNN). Images of any size are resized to the model's resolution;
normalisation is inside the encoders, so it lands in the exported graphs."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..demo.synthetic import imagery as synthetic
from ..model.config import HeadKind, ModalityConfig, SARConfig, ViTConfig
from ..model.encoders import SAREncoder, ViTEncoder
from ..model.registry import DemoTask, ModalitySpec
from ..model.schema import Dim, Field, InputSchema, exact
from .common import ACCURACY_BAR, MAX_IMAGE_SIDE, resize
from .labels import EUROSAT, MSTAR_SOC, NWPU_RESISC45

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Sentinel-2 reflectances are stored x10^4; these put typical values near unit scale.
S2_MEAN = (0.13,) * 13
S2_STD = (0.05,) * 13
EVA = dict(width=1408, depth=40, heads=16, mlp_ratio=6144 / 1408)  # EVA ViT-g
VIT_B = dict(width=768, depth=12, heads=12)


def _image_schema(mc: ModalityConfig, min_side: int, channels: Dim) -> InputSchema:
    side = Dim(min_side, MAX_IMAGE_SIDE)
    return InputSchema((Field("image", "float", (side, side, channels)),))


def preprocess_image(mc: ModalityConfig, x: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict]:
    """RGB (uint8 0..255 or float 0..1) and MSI (reflectance) images."""
    img = x["image"]
    scale = 1.0 / 255.0 if img.dtype == np.uint8 else 1.0
    return {"image": resize(img, mc.encoder.image_size, scale)}, {}


# ---- RGB ------------------------------------------------------------------------------------------

def rgb_sample(mc: ModalityConfig, rng: np.random.Generator, v: int = 0) -> dict[str, Any]:
    side = mc.encoder.image_size + 7 * v
    return {"image": rng.integers(0, 256, (side, side + 3 * v, 3), dtype=np.uint8)}


def _rgb(vit: dict, image_size: int, labels=NWPU_RESISC45, label_set="NWPU-RESISC45", frozen=True) -> ModalityConfig:
    return ModalityConfig("rgb", ViTConfig(**vit, image_size=image_size, patch_size=14, channels=3,
                                           mean=CLIP_MEAN, std=CLIP_STD), labels, label_set, frozen)


RGB = ModalitySpec(
    name="rgb", task="scene classification (NWPU-RESISC45)", metrics=("top-1",), head=HeadKind.CLASSIFICATION,
    prompts=("This remote sensing image belongs to which of the following categories: [category list]",),
    schema=lambda mc: _image_schema(mc, mc.encoder.patch_size, exact(3, "channels")),
    preprocess=preprocess_image, sample=rgb_sample, encoder=ViTEncoder, config_type=ViTConfig,
    presets={"tiny": _rgb(dict(width=32, depth=1, heads=2), 28),
             # trained from scratch on synthetic data: its own labels, no frozen pretrained encoder
             "demo": _rgb(dict(width=64, depth=2, heads=4), 56, synthetic.RGB_CLASSES, "synthetic-rgb", False),
             "paper": _rgb(EVA, 420)},
    label_sets={"NWPU-RESISC45": NWPU_RESISC45}, lynx_prefix="vision_encoder.",
    demo=DemoTask(synthetic.rgb, ACCURACY_BAR, stream=3))


# ---- MSI ------------------------------------------------------------------------------------------

def msi_sample(mc: ModalityConfig, rng: np.random.Generator, v: int = 0) -> dict[str, Any]:
    side = mc.encoder.image_size + 4 * v
    return {"image": rng.uniform(0.0, 0.4, (side, side, mc.encoder.channels)).astype(np.float32)}


def _msi(vit: dict, image_size: int, labels=EUROSAT, label_set="EuroSAT") -> ModalityConfig:
    return ModalityConfig("msi", ViTConfig(**vit, image_size=image_size, patch_size=8, channels=13,
                                           mean=S2_MEAN, std=S2_STD), labels, label_set)


MSI = ModalitySpec(
    name="msi", task="land-cover classification (EuroSAT)", metrics=("top-1",), head=HeadKind.CLASSIFICATION,
    prompts=("Based on the multi-spectral imagery feature description, please classify this object",),
    schema=lambda mc: _image_schema(mc, mc.encoder.patch_size, exact(mc.encoder.channels, "bands")),
    preprocess=preprocess_image, sample=msi_sample, encoder=ViTEncoder, config_type=ViTConfig,
    presets={"tiny": _msi(dict(width=32, depth=1, heads=2), 16),
             "demo": _msi(dict(width=64, depth=2, heads=4), 32, synthetic.MSI_CLASSES, "synthetic-msi"),
             "paper": _msi(VIT_B, 64)},
    label_sets={"EuroSAT": EUROSAT}, demo=DemoTask(synthetic.msi, ACCURACY_BAR, stream=4))


# ---- SAR ------------------------------------------------------------------------------------------

def preprocess_sar(mc: ModalityConfig, x: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict]:
    img = x["image"]
    want = mc.encoder.channels
    if img.shape[-1] < want:  # single polarisation: repeat it to fill the encoder's channels
        img = np.repeat(img, want // img.shape[-1], axis=-1)
    return {"image": resize(img, mc.encoder.image_size)}, {}


def sar_sample(mc: ModalityConfig, rng: np.random.Generator, v: int = 0) -> dict[str, Any]:
    side = mc.encoder.image_size + 8 * v
    ch = 1 if v % 2 else mc.encoder.channels
    return {"image": rng.gamma(1.0, 1.0, (side, side, ch)).astype(np.float32)}


def _sar(cfg: SARConfig, labels=MSTAR_SOC, label_set="MSTAR-SOC") -> ModalityConfig:
    return ModalityConfig("sar", cfg, labels, label_set)


SAR = ModalitySpec(
    name="sar", task="target recognition (MSTAR SOC)", metrics=("top-1",), head=HeadKind.CLASSIFICATION,
    prompts=("Based on the SAR imagery feature description, please classify this object",),
    schema=lambda mc: _image_schema(mc, 8, Dim(0, choices=(1, mc.encoder.channels))),
    preprocess=preprocess_sar, sample=sar_sample, encoder=SAREncoder, config_type=SARConfig,
    presets={"tiny": _sar(SARConfig(width=32, image_size=32, conv_channels=(8, 16))),
             "demo": _sar(SARConfig(width=64, image_size=48, conv_channels=(16, 32)), synthetic.SAR_CLASSES,
                          "synthetic-sar"),
             "paper": _sar(SARConfig(width=768, image_size=128, conv_channels=(64, 256)))},
    label_sets={"MSTAR-SOC": MSTAR_SOC}, demo=DemoTask(synthetic.sar, ACCURACY_BAR, stream=6))
