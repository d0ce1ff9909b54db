"""Shared primitives of the synthetic generators: smooth random fields, 2-D rotation, class picking.

Everything takes an explicit `np.random.Generator`, so a generator's output is a pure function of
its seed.
"""

from __future__ import annotations

import numpy as np

from ...model.config import ModalityConfig


def upsample(grid: np.ndarray, h: int, w: int | None = None) -> np.ndarray:
    """Bilinear upsampling of a (k, l) grid to (h, w), corners aligned."""
    w = h if w is None else w
    k, l = grid.shape
    y, x = np.linspace(0, k - 1, h), np.linspace(0, l - 1, w)
    y0, x0 = np.minimum(y.astype(int), k - 2), np.minimum(x.astype(int), l - 2)
    fy, fx = (y - y0)[:, None], (x - x0)[None, :]
    g00, g01 = grid[y0][:, x0], grid[y0][:, x0 + 1]
    g10, g11 = grid[y0 + 1][:, x0], grid[y0 + 1][:, x0 + 1]
    return (1 - fy) * ((1 - fx) * g00 + fx * g01) + fy * ((1 - fx) * g10 + fx * g11)


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """(size, size) field of unit-variance-ish noise correlated over ~size/cells pixels."""
    return upsample(rng.normal(size=(cells + 1, cells + 1)), size)


def fbm(rng: np.random.Generator, size: int, octaves: tuple[int, ...] = (3, 6, 12),
        gain: float = 0.5) -> np.ndarray:
    """Fractal noise: octaves of `smooth_noise`, amplitude multiplied by `gain` per octave."""
    out = np.zeros((size, size))
    for i, cells in enumerate(octaves):
        out += gain ** i * smooth_noise(rng, size, min(cells, size - 1))
    return out / np.sqrt(sum(gain ** (2 * i) for i in range(len(octaves))))


def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x) in [0, 1), each (size, size)."""
    c = (np.arange(size) + 0.5) / size
    return np.meshgrid(c, c, indexing="ij")


def rotate2d(y: np.ndarray, x: np.ndarray, angle: float, cy: float = 0.5, cx: float = 0.5
             ) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (u, v) of the frame rotated by `angle` about (cy, cx): u along, v across."""
    dy, dx = y - cy, x - cx
    c, s = np.cos(angle), np.sin(angle)
    return c * dx + s * dy, -s * dx + c * dy


def pick_class(mc: ModalityConfig, names: tuple[str, ...], rng: np.random.Generator) -> tuple[int, str]:
    """A label index of `mc` and the synthetic class rendered for it.

    The `demo` preset's label set is exactly `names`. Other presets (`tiny` keeps the paper's label
    sets) get their labels mapped onto the synthetic classes cyclically: inputs of the right shape,
    whose classes are only learnable up to that aliasing.
    """
    c = int(rng.integers(len(mc.labels or names)))
    return c, class_name(mc, names, c)


def class_name(mc: ModalityConfig, names: tuple[str, ...], c: int) -> str:
    """The synthetic class rendered for label index `c` of `mc` (see `pick_class`)."""
    labels = mc.labels or names
    return labels[c] if set(labels) == set(names) else names[c % len(names)]
