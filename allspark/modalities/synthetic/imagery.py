"""Synthetic rasters and spectra: RGB scenes, Sentinel-2-like MSI, ROSIS-like HSI pixels, SAR chips.

Each class is a small renderer keyed by its label name (`RGB_CLASSES`, ...: the `demo` preset's label
sets); a modality's generator
picks a class, renders it at the preset's resolution and adds the sensor's noise. Classes share
colours and materials on purpose (farmland stripes vs dunes, asphalt vs bitumen under varying
illumination, vehicles that differ in a turret or a blade), so shape, texture or spectral shape
must be learned, not a mean value.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ...model.config import ModalityConfig
from .synth import fbm, grid, pick_class, rotate2d, smooth_noise

Rng = np.random.Generator


# ---- RGB scenes (uint8, H x W x 3) -------------------------------------------------------------

def _colour(rng: Rng, base: tuple[float, float, float], jitter: float = 18.0) -> np.ndarray:
    return np.asarray(base) + rng.normal(0, jitter, 3)


def _field(rng: Rng, s: int, base, texture: float, cells=(3, 8, 16)) -> np.ndarray:
    """A base colour modulated by fractal texture (brightness only)."""
    return _colour(rng, base)[None, None] * (1 + texture * fbm(rng, s, cells))[..., None]


def _rgb_forest(rng: Rng, s: int) -> np.ndarray:
    crowns = fbm(rng, s, (s // 4, s // 2, s - 1), 0.7)  # many small bright/dark tree crowns
    return _colour(rng, (45, 85, 40))[None, None] * (1 + 0.35 * crowns)[..., None]


def _rgb_lake(rng: Rng, s: int) -> np.ndarray:
    y, x = grid(s)
    cy, cx = rng.uniform(0.35, 0.65, 2)
    r = np.hypot(y - cy, x - cx) + 0.12 * smooth_noise(rng, s, 4)
    water = (r < rng.uniform(0.25, 0.4)).astype(float)
    land = _field(rng, s, (95, 120, 70), 0.2)
    lake = _colour(rng, (35, 70, 115))[None, None] * (1 + 0.05 * smooth_noise(rng, s, 10))[..., None]
    return land * (1 - water[..., None]) + lake * water[..., None]


_CROPS = ((110, 150, 60), (170, 160, 90), (130, 100, 70), (80, 130, 50), (190, 180, 110))


def _rgb_striped_farmland(rng: Rng, s: int) -> np.ndarray:
    y, x = grid(s)
    u, _ = rotate2d(y, x, rng.uniform(0, np.pi))
    strip = np.floor((u + 1) * s / rng.uniform(4, 9)).astype(int)
    palette = np.stack([_colour(rng, _CROPS[i]) for i in rng.integers(0, len(_CROPS), strip.max() + 1)])
    return palette[strip] * (1 + 0.08 * fbm(rng, s, (8, 16)))[..., None]


def _rgb_circular_farmland(rng: Rng, s: int) -> np.ndarray:
    """Centre-pivot fields: discs of a crop unlike the background's, each with a dark rim (the
    pivot's track), so the class shows as round shapes, never as an invisible same-colour disc."""
    y, x = grid(s)
    ground = int(rng.integers(1, 3))
    img = _field(rng, s, _CROPS[ground], 0.15)
    crops = [i for i in range(len(_CROPS)) if i != ground]
    for _ in range(int(rng.integers(1, 4))):
        cy, cx, r = *rng.uniform(0.2, 0.8, 2), rng.uniform(0.15, 0.3)
        d = np.hypot(y - cy, x - cx)
        disc = (d < r).astype(float)[..., None]
        rim = (np.abs(d - r) < 0.03)[..., None]
        inner = _colour(rng, _CROPS[int(rng.choice(crops))]) * (1 - 0.4 * rim)
        img = img * (1 - disc) + inner * disc
    return img


def _rgb_dense_residential(rng: Rng, s: int) -> np.ndarray:
    y, x = grid(s)
    u, v = rotate2d(y, x, rng.uniform(0, np.pi / 2))
    pitch = rng.uniform(0.1, 0.16)
    cu, cv = np.floor(u / pitch), np.floor(v / pitch)
    fu, fv = u / pitch - cu, v / pitch - cv
    house = (np.abs(fu - 0.5) < 0.32) & (np.abs(fv - 0.5) < rng.uniform(0.22, 0.35))
    roofs = np.stack([_colour(rng, c, 25) for c in ((160, 70, 60), (120, 120, 125), (150, 110, 80))])
    which = ((cu * 7 + cv * 13).astype(int)) % 3
    img = _field(rng, s, (165, 160, 150), 0.08)
    return np.where(house[..., None], roofs[which], img)


def _rgb_highway(rng: Rng, s: int) -> np.ndarray:
    y, x = grid(s)
    u, v = rotate2d(y, x, rng.uniform(0, np.pi), *rng.uniform(0.35, 0.65, 2))
    img = _field(rng, s, (100, 125, 70) if rng.random() < 0.5 else (150, 130, 90), 0.25)
    half = rng.uniform(0.06, 0.1)
    road = np.abs(v) < half
    lines = (np.abs(v) < 0.012) & (np.mod(u * 12, 1) < 0.5)
    img = np.where(road[..., None], _colour(rng, (95, 95, 100), 8), img)
    img = np.where(lines[..., None], 235.0, img)
    cars = road & (smooth_noise(rng, s, s // 3) > 1.6)
    return np.where(cars[..., None], _colour(rng, (200, 40, 40), 60), img)


def _rgb_desert_dunes(rng: Rng, s: int) -> np.ndarray:
    y, x = grid(s)
    u, v = rotate2d(y, x, rng.uniform(0, np.pi))
    k = rng.uniform(12, 22)
    dune = np.sin(k * u + 2.0 * np.sin(rng.uniform(4, 8) * v + rng.uniform(0, 6)))
    shade = 1 + 0.18 * dune + 0.05 * smooth_noise(rng, s, 6)
    return _colour(rng, (205, 175, 125), 12)[None, None] * shade[..., None]


def _rgb_cloud(rng: Rng, s: int) -> np.ndarray:
    under = _RGB[str(rng.choice(["forest", "lake", "striped_farmland", "desert_dunes"]))](rng, s)
    cover = np.clip((fbm(rng, s, (2, 4, 8)) + rng.uniform(0.2, 1.0)) * 1.2, 0, 1)[..., None]
    return under * (1 - cover) + _colour(rng, (235, 235, 240), 8) * cover


_RGB: dict[str, Callable[[Rng, int], np.ndarray]] = {
    "forest": _rgb_forest, "lake": _rgb_lake, "striped_farmland": _rgb_striped_farmland,
    "circular_farmland": _rgb_circular_farmland, "dense_residential": _rgb_dense_residential,
    "highway": _rgb_highway, "desert_dunes": _rgb_desert_dunes, "cloud": _rgb_cloud}
RGB_CLASSES = tuple(_RGB)


def rgb_chip(mc: ModalityConfig, rng: Rng, name: str) -> np.ndarray:
    """One scene of class `name` at the model's size: (s, s, 3) uint8."""
    s = mc.encoder.image_size
    img = _RGB[name](rng, s) * rng.uniform(0.85, 1.15) + rng.normal(0, 6, (s, s, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def rgb(mc: ModalityConfig, rng: Rng) -> tuple[dict[str, Any], int]:
    c, name = pick_class(mc, tuple(_RGB), rng)
    return {"image": rgb_chip(mc, rng, name)}, c


# ---- MSI: 13 Sentinel-2 bands (reflectance, H x W x 13) -----------------------------------------
# Bands B1..B12 incl. B8A: 443 490 560 665 705 740 783 842 865 945 1375 1610 2190 nm.
_S2 = {
    "vegetation": (0.03, 0.045, 0.085, 0.04, 0.11, 0.26, 0.32, 0.35, 0.36, 0.30, 0.005, 0.19, 0.09),
    "conifer": (0.02, 0.03, 0.05, 0.025, 0.07, 0.17, 0.22, 0.25, 0.26, 0.21, 0.004, 0.12, 0.055),
    "dry_grass": (0.05, 0.065, 0.095, 0.09, 0.13, 0.2, 0.24, 0.26, 0.27, 0.23, 0.006, 0.28, 0.18),
    "soil": (0.07, 0.09, 0.13, 0.18, 0.2, 0.22, 0.24, 0.26, 0.27, 0.26, 0.008, 0.34, 0.3),
    "concrete": (0.12, 0.13, 0.15, 0.17, 0.18, 0.19, 0.2, 0.21, 0.21, 0.19, 0.01, 0.24, 0.22),
    "roof": (0.08, 0.08, 0.09, 0.1, 0.1, 0.11, 0.11, 0.12, 0.12, 0.11, 0.006, 0.14, 0.13),
    "water": (0.06, 0.06, 0.05, 0.03, 0.02, 0.015, 0.012, 0.01, 0.009, 0.005, 0.001, 0.003, 0.002),
    "snow": (0.85, 0.86, 0.84, 0.8, 0.78, 0.76, 0.74, 0.72, 0.71, 0.55, 0.05, 0.12, 0.08),
}


def _mix(rng: Rng, weights: dict[str, np.ndarray]) -> np.ndarray:
    """Per-pixel linear mixture of endmembers, each jittered per sample: (S, S, 13)."""
    out = 0.0
    for name, w in weights.items():
        em = np.asarray(_S2[name]) * (1 + rng.normal(0, 0.05, 13))
        out = out + w[..., None] * em
    return out


def _msi_stripes(rng: Rng, s: int) -> np.ndarray:
    y, x = grid(s)
    u, _ = rotate2d(y, x, rng.uniform(0, np.pi))
    return (np.floor((u + 1) * s / rng.uniform(3, 6)) % 2).astype(float)


def _msi_blobs(rng: Rng, s: int, cells: int, frac: float) -> np.ndarray:
    n = smooth_noise(rng, s, cells)
    return (n > np.quantile(n, 1 - frac)).astype(float)


def _msi_class(name: str, rng: Rng, s: int) -> np.ndarray:
    t = 0.5 + 0.5 * np.tanh(fbm(rng, s, (4, 8, 16)))  # soft texture in [0, 1]
    if name == "forest":
        canopy = np.clip(0.5 + 0.5 * fbm(rng, s, (s // 3, s // 2)), 0, 1)
        return _mix(rng, {"conifer": canopy, "vegetation": 0.6 * (1 - canopy)}) * (0.8 + 0.2 * canopy)[..., None]
    if name == "grassland":
        return _mix(rng, {"vegetation": 0.65 + 0.3 * t, "dry_grass": 0.35 - 0.3 * t})
    if name == "cropland":
        st = _msi_stripes(rng, s)
        return _mix(rng, {"vegetation": st, "soil": (1 - st) * (0.6 + 0.4 * t), "dry_grass": (1 - st) * 0.4 * (1 - t)})
    if name == "bare_soil":
        return _mix(rng, {"soil": 0.8 + 0.2 * t, "dry_grass": 0.2 * (1 - t)})
    if name == "urban":
        y, x = grid(s)
        u, v = rotate2d(y, x, rng.uniform(0, np.pi / 2))
        blocks = ((np.mod(u * 5, 1) < 0.7) & (np.mod(v * 5, 1) < 0.7)).astype(float)
        green = _msi_blobs(rng, s, 6, 0.15) * (1 - blocks)
        return _mix(rng, {"roof": blocks, "concrete": (1 - blocks) * (1 - green), "vegetation": green})
    if name == "water":
        return _mix(rng, {"water": 0.97 + 0.03 * t, "soil": 0.03 * (1 - t)})
    if name == "wetland":
        wet = _msi_blobs(rng, s, 5, rng.uniform(0.35, 0.6))
        return _mix(rng, {"water": wet, "vegetation": (1 - wet) * (0.5 + 0.5 * t), "dry_grass": (1 - wet) * 0.5 * (1 - t)})
    if name == "snow":
        rock = _msi_blobs(rng, s, 4, rng.uniform(0.05, 0.3))
        return _mix(rng, {"snow": (1 - rock) * (0.85 + 0.15 * t), "soil": rock})
    raise KeyError(name)


MSI_CLASSES = ("forest", "grassland", "cropland", "bare_soil", "urban", "water", "wetland", "snow")


def msi_chip(mc: ModalityConfig, rng: Rng, name: str) -> np.ndarray:
    """One patch of class `name` at the model's size: (s, s, bands) reflectance, float32."""
    s, bands = mc.encoder.image_size, mc.encoder.channels
    img = _msi_class(name, rng, s) * rng.uniform(0.85, 1.15) + rng.normal(0, 0.008, (s, s, 13))
    img = img[..., np.arange(bands) % 13]  # presets with other band counts reuse the 13
    return np.clip(img, 0, 1).astype(np.float32)


def msi(mc: ModalityConfig, rng: Rng) -> tuple[dict[str, Any], int]:
    c, name = pick_class(mc, MSI_CLASSES, rng)
    return {"image": msi_chip(mc, rng, name)}, c


# ---- HSI: one pixel's spectrum, ROSIS 430-860 nm -----------------------------------------------

def _sig(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def _gauss(x: np.ndarray, mu: float, sd: float) -> np.ndarray:
    return np.exp(-0.5 * ((x - mu) / sd) ** 2)


def _veg(lam: np.ndarray, green: float, nir: float, edge: float) -> np.ndarray:
    return 0.03 + green * _gauss(lam, 550, 30) - 0.015 * _gauss(lam, 670, 20) + nir * _sig((lam - edge) / 12)


_HSI: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "asphalt": lambda l: 0.08 + 0.05 * (l - 430) / 430,
    "meadow": lambda l: _veg(l, 0.06, 0.45, 715),
    "gravel": lambda l: 0.15 + 0.14 * ((l - 430) / 430) ** 0.7 + 0.02 * _gauss(l, 600, 60),
    "trees": lambda l: _veg(l, 0.02, 0.28, 732) - 0.01 * _gauss(l, 480, 30),
    "metal_roof": lambda l: 0.42 + 0.08 * np.cos((l - 430) / 430 * 3.0),
    "bare_soil": lambda l: 0.09 + 0.26 * ((l - 430) / 430) ** 0.6 - 0.03 * _gauss(l, 860, 40),
    "bitumen": lambda l: 0.06 + 0.02 * (l - 430) / 430 + 0.012 * _gauss(l, 700, 50),
    "brick": lambda l: 0.1 + 0.2 * _sig((l - 590) / 25),
    "shadow": lambda l: 0.035 - 0.018 * (l - 430) / 430,
}
HSI_CLASSES = tuple(_HSI)


def hsi_spectra(mc: ModalityConfig, rng: Rng, names: list[str]) -> np.ndarray:
    """One spectrum per entry of `names` (vectorised `hsi`, same distribution): (n, bands) float32."""
    lam = np.linspace(430, 860, mc.encoder.bands)
    table = np.stack([_HSI[k](lam) for k in _HSI])  # (classes, bands)
    index = {k: i for i, k in enumerate(_HSI)}
    n = len(names)
    own = table[[index[k] for k in names]]
    other = table[rng.integers(len(_HSI), size=n)]
    frac = rng.uniform(0, 0.15, (n, 1))
    tilt = 1 + rng.normal(0, 0.05, (n, 1)) * (lam - 645) / 215
    spec = ((1 - frac) * own + frac * other) * tilt * rng.uniform(0.8, 1.2, (n, 1)) + rng.normal(0, 0.004, own.shape)
    return np.clip(spec, 0, None).astype(np.float32)


def hsi(mc: ModalityConfig, rng: Rng) -> tuple[dict[str, Any], int]:
    c, name = pick_class(mc, tuple(_HSI), rng)
    lam = np.linspace(430, 860, mc.encoder.bands)
    other = _HSI[str(rng.choice(list(_HSI)))](lam)
    frac = rng.uniform(0, 0.15)  # sub-pixel mixing with a neighbouring material
    spec = (1 - frac) * _HSI[name](lam) + frac * other
    tilt = 1 + rng.normal(0, 0.05) * (lam - 645) / 215  # smooth illumination/BRDF slope
    spec = spec * tilt * rng.uniform(0.8, 1.2) + rng.normal(0, 0.004, lam.shape)
    return {"spectrum": np.clip(spec, 0, None).astype(np.float32)}, c


# ---- SAR: target chips under multiplicative speckle (amplitude, H x W x {1,2}) ------------------
# Parts in the target's frame, in pixels at 48 px: ("rect", u0, v0, half_u, half_v, reflectivity)
# or ("disc", u0, v0, radius, 0, reflectivity). u runs along the vehicle.
_SAR: dict[str, tuple[tuple, ...]] = {
    "tank": (("rect", 0, 0, 8, 5, 1.0), ("disc", -1, 0, 3.5, 0, 3.0), ("rect", 8, 0, 6, 0.8, 4.0)),
    "truck": (("rect", -9, 0, 2.5, 4, 3.0), ("rect", 3, 0, 8, 4, 0.6)),
    "bulldozer": (("rect", 0, 0, 6, 5, 1.0), ("rect", -8, 0, 1.2, 7.5, 5.0)),
    "armored_carrier": (("rect", 0, 0, 10, 4.5, 1.0), ("rect", 0, 4, 10, 0.8, 3.5), ("rect", 0, -4, 10, 0.8, 3.5)),
    "rocket_launcher": (("rect", 0, 0, 9, 4.5, 0.8), ("rect", 3, 0, 6, 3.5, 4.0)),
    "jeep": (("rect", 0, 0, 4.5, 2.5, 1.0),),
    "bus": (("rect", 0, 0, 14, 4, 0.5),),
    "corner_reflector": (("disc", 0, 0, 1.8, 0, 12.0),),
}
SAR_CLASSES = tuple(_SAR)


def _sar_reflectivity(name: str, rng: Rng, s: int) -> tuple[np.ndarray, np.ndarray]:
    """Target reflectivity map and its radar shadow mask, both (s, s)."""
    y, x = grid(s)
    scale = s / 48 * rng.uniform(0.9, 1.1)
    u, v = rotate2d(y * s, x * s, rng.uniform(0, 2 * np.pi), *(s / 2 + rng.uniform(-4, 4, 2) * s / 48))
    refl = np.zeros((s, s))
    for kind, u0, v0, a, b, r in _SAR[name]:
        du, dv = u - u0 * scale, v - v0 * scale
        if kind == "disc":
            part = (du / (a * scale)) ** 2 + (dv / max(a * scale, 1e-6)) ** 2 <= 1
        else:
            part = (np.abs(du) <= a * scale) & (np.abs(dv) <= b * scale)
        refl = np.maximum(refl, part * r)
    body = refl > 0
    shadow = np.zeros_like(body)
    for k in range(1, int(6 * s / 48) + 1):  # radar looks from the top: shadow falls below
        shadow[k:] |= body[:-k]
    return refl, shadow & ~body


def sar_chip(mc: ModalityConfig, rng: Rng, name: str, maybe_single: bool = False) -> np.ndarray:
    """One chip of target `name`: (s, s, 2) amplitude (HH, HV), float32; with `maybe_single`, a
    quarter of chips are single polarisation (s, s, 1), as MSTAR's."""
    s = mc.encoder.image_size
    refl, shadow = _sar_reflectivity(name, rng, s)
    clutter = 0.08 * np.exp(0.4 * smooth_noise(rng, s, 6))
    sigma0 = np.where(refl > 0, refl, np.where(shadow, 0.008, clutter))  # intensity, HH
    looks = int(rng.integers(4, 11))  # multi-look: speckle std 1/sqrt(looks)
    chans = [sigma0, sigma0 * np.where(refl > 0, 0.5, 0.35)]  # HV: weaker, depolarised by the target
    if maybe_single and rng.random() < 0.25:
        chans = chans[:1]  # single polarisation, as MSTAR
    amp = [np.sqrt(ch * rng.gamma(looks, 1 / looks, ch.shape)) for ch in chans]  # speckle
    return np.stack(amp, -1).astype(np.float32)


def sar(mc: ModalityConfig, rng: Rng) -> tuple[dict[str, Any], int]:
    c, name = pick_class(mc, tuple(_SAR), rng)
    return {"image": sar_chip(mc, rng, name, maybe_single=True)}, c
