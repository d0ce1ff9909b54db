"""Image modalities: RGB scenes (Lynx's EVA ViT), multispectral Sentinel-2 (a ViT with a C-band patch
embedding) and SAR chips (a 3-layer CNN). RGB is preprocessed exactly as Lynx's test transform (shorter
side to the model's size, bicubic, centre crop); MSI and SAR are resized to the model's size (the
paper does not say how). Normalisation is inside the encoders, so it lands in the exported graphs."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import CheckpointError, InputError
from ..model.config import HeadKind, ModalityConfig, SARConfig, ViTConfig
from ..model.registry import DemoTask, ModalitySpec, RasterMap
from ..model.schema import Dim, Field, InputSchema, exact
from .common import ACCURACY_BAR, ENCODERS, MAX_IMAGE_SIDE, channels_last, resize
from .labels import EUROSAT, MSTAR_SOC, NWPU_RESISC45
from .synthetic import imagery as synthetic
from .synthetic import scenes

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Sentinel-2 reflectances are stored x10^4; these put typical values near unit scale.
S2_MEAN = (0.13,) * 13
S2_STD = (0.05,) * 13
EVA = dict(width=1408, depth=39, heads=16, mlp_ratio=6144 / 1408)  # EVA ViT-g as Lynx's create_eva_vit_g builds it
VIT_B = dict(width=768, depth=12, heads=12)
RASTER_FILES = (".tif", ".tiff", ".npy")  # GeoTIFF or an array: bands first or last
VIT_L = {"width": 1024, "depth": 24, "heads": 16}  # ViT-L/14 (CLIP's): MLP 4096


def _model_side(mc: ModalityConfig) -> int:
    return mc.encoder.image_size


def _image_schema(mc: ModalityConfig, min_side: int, channels: Dim) -> InputSchema:
    side = Dim(min_side, MAX_IMAGE_SIDE)
    return InputSchema((Field("image", "float", (side, side, channels)),))


def preprocess_image(mc: ModalityConfig, x: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict]:
    """MSI (reflectance): resized to the model's size, bilinear with antialiasing."""
    img = x["image"]
    scale = 1.0 / 255.0 if img.dtype == np.uint8 else 1.0
    return {"image": resize(img, mc.encoder.image_size, scale)}, {}


def resize_shorter_and_crop(img: np.ndarray, size: int) -> np.ndarray:
    """Lynx's test transform without the normalisation (in the encoder): the shorter side to `size`
    (PIL bicubic, as torchvision's Resize on a PIL image), a centre crop to size x size, then
    ToTensor's /255 for 8-bit input. (H, W, C) uint8 or float in [0, 1] -> (1, C, size, size) float32."""
    from PIL import Image

    h, w = img.shape[:2]
    nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)  # torchvision's rounding
    if img.dtype == np.uint8 and img.shape[2] == 3:
        out = np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize((nw, nh), Image.BICUBIC), np.float32) / 255.0
    else:  # floats: each channel as a PIL float image, the same filter
        chans = [np.asarray(Image.fromarray(np.ascontiguousarray(img[..., c], dtype=np.float32), mode="F")
                            .resize((nw, nh), Image.BICUBIC)) for c in range(img.shape[2])]
        out = np.stack(chans, -1).astype(np.float32) / (255.0 if img.dtype == np.uint8 else 1.0)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    out = out[top:top + size, left:left + size]
    return np.ascontiguousarray(out.transpose(2, 0, 1))[None]


# ---- RGB ------------------------------------------------------------------------------------------

def preprocess_rgb(mc: ModalityConfig, x: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict]:
    """RGB (uint8 0..255 or float 0..1) as Lynx's test transform."""
    img = x["image"]
    if img.dtype != np.uint8 and img.size and (img.min() < 0 or img.max() > 1):
        raise InputError("rgb", "image", "a uint8 image, or float values in [0, 1]",
                         f"{img.dtype} values in [{img.min():g}, {img.max():g}]")
    return {"image": resize_shorter_and_crop(img, mc.encoder.image_size)}, {}


# Heads of the ViTs AllSpark's encoders come from, by width: the weights (q_proj is W x W for any
# head count) cannot tell. EVA ViT-g (Lynx) has 88-wide heads; ViT-B/L/H 64, 64, 80.
VIT_HEADS = {1408: 16, 1280: 16, 1024: 16, 768: 12, 384: 6}


def infer_vit(shapes: Mapping[str, tuple[int, ...]], default: ModalityConfig, hints: Mapping[str, Any]
              ) -> tuple[ModalityConfig, dict[str, str]]:
    """A ViT's config from its weights (EVA/Lynx names): everything but the head count and the
    normalisation, which come from `hints` or, failing that, the defaults (said in the notes)."""
    try:
        width, channels, patch, _ = shapes["patch_embed.proj.weight"]
        tokens = shapes["pos_embed"][1]
        hidden = shapes["blocks.0.mlp.fc1.weight"][0]
    except KeyError as e:
        raise CheckpointError(f"vision encoder: no {e.args[0]!r} among its weights; is this a ViT?") from None
    depth = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("blocks."))
    grid = math.isqrt(tokens - 1)
    if grid * grid != tokens - 1:
        raise CheckpointError(f"vision encoder: pos_embed has {tokens} tokens; expected 1 + a square grid")
    notes = {"width": f"{width} (weights)", "depth": f"{depth} (weights)", "patch_size": f"{patch} (weights)",
             "channels": f"{channels} (weights)", "mlp hidden": f"{hidden} (weights)",
             "image_size": f"{grid * patch} (weights: {grid}x{grid} positions)"}
    heads = hints.get("heads")
    if heads is not None:
        notes["heads"] = f"{heads} (--config)"
    elif width in VIT_HEADS or width % 88 == 0:
        heads = VIT_HEADS.get(width, width // 88)
        notes["heads"] = f"{heads} (width {width}: {width // heads}-wide heads, as EVA/ViT; --config heads overrides)"
    else:
        raise CheckpointError(f"vision encoder: the weights cannot tell the number of heads of a {width}-wide ViT; "
                              f"pass --config '{{\"encoder\": {{\"heads\": N}}}}'")
    d = default.encoder
    mean, std = tuple(hints.get("mean", d.mean)), tuple(hints.get("std", d.std))
    if len(mean) != channels:
        raise CheckpointError(f"vision encoder: {channels} input channels but {len(mean)} normalisation means; "
                              "pass --config encoder.mean and encoder.std")
    notes["mean/std"] = "--config" if "mean" in hints else f"{default.modality} default"
    cfg = ViTConfig(width=width, depth=depth, heads=int(heads), mlp_ratio=hidden / width,
                    image_size=int(hints.get("image_size", grid * patch)), patch_size=patch, channels=channels,
                    mean=mean, std=std)
    if "image_size" in hints:
        notes["image_size"] = f"{cfg.image_size} (--config)"
    return ModalityConfig(default.modality, cfg, default.labels, default.label_set, default.frozen_encoder), notes

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
    preprocess=preprocess_rgb, sample=rgb_sample, file_types=(".png", ".jpg", ".jpeg", ".tif", ".tiff", ".npy"),
    layout=channels_last("image", lambda mc: (3,)), encoder=ENCODERS + "ViTEncoder", config_type=ViTConfig, infer=infer_vit,
    presets={"tiny": _rgb(dict(width=32, depth=1, heads=2), 28),
             # trained from scratch on synthetic data: its own labels, no frozen pretrained encoder
             "demo": _rgb(dict(width=64, depth=2, heads=4), 56, synthetic.RGB_CLASSES, "synthetic-rgb", False),
             "base": _rgb(VIT_L, 224),
             "paper": _rgb(EVA, 420)},
    label_sets={"NWPU-RESISC45": NWPU_RESISC45}, lynx_prefix="vision_encoder.",
    raster=RasterMap("tile", "image", lambda mc: (3,), _model_side),
    demo=DemoTask(synthetic.rgb, ACCURACY_BAR, stream=3, scene=scenes.RGB_SCENE))


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
    preprocess=preprocess_image, sample=msi_sample, file_types=RASTER_FILES, layout=channels_last("image", lambda mc: (mc.encoder.channels,)), encoder=ENCODERS + "ViTEncoder", config_type=ViTConfig, infer=infer_vit,
    presets={"tiny": _msi(dict(width=32, depth=1, heads=2), 16),
             "demo": _msi(dict(width=64, depth=2, heads=4), 32, synthetic.MSI_CLASSES, "synthetic-msi"),
             "base": _msi(VIT_B, 64),
             "paper": _msi(VIT_B, 64)},
    label_sets={"EuroSAT": EUROSAT},
    raster=RasterMap("tile", "image", lambda mc: (mc.encoder.channels,), _model_side),
    demo=DemoTask(synthetic.msi, ACCURACY_BAR, stream=4, scene=scenes.MSI_SCENE))


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
    preprocess=preprocess_sar, sample=sar_sample, file_types=RASTER_FILES,
    layout=channels_last("image", lambda mc: (1, mc.encoder.channels), add_axis=True), encoder=ENCODERS + "SAREncoder", config_type=SARConfig,
    presets={"tiny": _sar(SARConfig(width=32, image_size=32, conv_channels=(8, 16))),
             "demo": _sar(SARConfig(width=64, image_size=48, conv_channels=(16, 32)), synthetic.SAR_CLASSES,
                          "synthetic-sar"),
             "base": _sar(SARConfig(width=768, image_size=128, conv_channels=(64, 256))),
             "paper": _sar(SARConfig(width=768, image_size=128, conv_channels=(64, 256)))},
    label_sets={"MSTAR-SOC": MSTAR_SOC},
    raster=RasterMap("tile", "image", lambda mc: (1, mc.encoder.channels), _model_side),
    demo=DemoTask(synthetic.sar, ACCURACY_BAR, stream=6, scene=scenes.SAR_SCENE))
