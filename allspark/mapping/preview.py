"""A PNG preview of a class raster beside the scene it maps, with a legend: nearest-neighbour, at most ~1024 px a side
(a large map is read decimated from the COG, never whole), colours as in the raster's colour table.
The legend lists the classes present with their cell counts (names only when decimated)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

# Tableau's 20 categorical colours: distinct for the first ten, then their light variants.
_COLOURS = ("1f77b4", "ff7f0e", "2ca02c", "d62728", "9467bd", "8c564b", "e377c2", "7f7f7f", "bcbd22", "17becf",
            "aec7e8", "ffbb78", "98df8a", "ff9896", "c5b0d5", "c49c94", "f7b6d2", "c7c7c7", "dbdb8d", "9edae5")
NODATA_COLOUR = (235, 235, 235)
MAX_SIDE, MIN_SIDE, LEGEND_W, ROW_H = 1024, 384, 220, 18


def palette(n: int) -> list[tuple[int, int, int]]:
    return [tuple(int(_COLOURS[i % 20][k:k + 2], 16) for k in (0, 2, 4)) for i in range(n)]


def scene_thumbnail(scene, height: int) -> np.ndarray:
    """The scene as an RGB picture `height` px high (bands: below),
    decimated by GDAL (overviews where the file has them), stretched between the 2nd and 98th
    percentiles of its valid values; nodata in the legend's colour."""
    import rasterio
    from rasterio.enums import Resampling

    with rasterio.open(scene.path) as ds:
        n = len(scene.bands)
        # three bands as they are; more (multi-, hyperspectral, ordered by wavelength): a false-colour
        # composite of the bands at 3/4, 1/2 and 1/4 of the range; fewer: the first as grey
        pick = [0, 1, 2] if n == 3 else [3 * n // 4, n // 2, n // 4] if n > 3 else [0, 0, 0]
        bands = [scene.bands[i] for i in pick]
        width = max(1, round(height * ds.width / ds.height))
        px = ds.read(bands, out_shape=(3, height, width), resampling=Resampling.nearest).astype(np.float64)
        with warnings.catch_warnings():  # nodata shadowing an alpha band: GDAL's rule, and ours
            warnings.simplefilter("ignore", category=UserWarning)
            mask = ds.read_masks(bands, out_shape=(3, height, width)) == 0
    if scene.nodata is not None:
        mask |= np.isnan(px) if np.isnan(scene.nodata) else px == scene.nodata
    mask |= ~np.isfinite(px)
    invalid = mask.all(axis=0)
    good = px[:, ~invalid]
    lo, hi = (np.percentile(good, (2, 98), axis=1) if good.size else (np.zeros(3), np.ones(3)))
    rgb = np.clip((px - np.reshape(lo, (3, 1, 1))) / np.maximum(np.reshape(hi - lo, (3, 1, 1)), 1e-12), 0, 1)
    img = (np.nan_to_num(np.moveaxis(rgb, 0, -1)) * 255).astype(np.uint8)
    img[invalid] = NODATA_COLOUR
    return img


def write_preview(classes_tif: Path, out: Path, labels: tuple[str, ...], nodata: int, title: str, scene=None) -> None:
    """[the scene (when given) | the class map | legend]."""
    import rasterio
    from PIL import Image, ImageDraw, ImageFont
    from rasterio.enums import Resampling

    with rasterio.open(classes_tif) as ds:
        h, w = ds.height, ds.width
        shrink = max(1.0, max(h, w) / MAX_SIDE)
        grid = ds.read(1, out_shape=(max(1, int(h / shrink)), max(1, int(w / shrink))), resampling=Resampling.nearest)
    colours = np.asarray(palette(len(labels)) + [NODATA_COLOUR], np.uint8)
    rgb = colours[np.where(grid == nodata, len(labels), np.minimum(grid, len(labels)))]
    k = max(1, MIN_SIDE // max(grid.shape))  # small grids (tiles) are enlarged to be seen
    img = Image.fromarray(rgb).resize((grid.shape[1] * k, grid.shape[0] * k), Image.NEAREST)
    present = np.bincount(grid[grid != nodata].ravel().astype(np.int64), minlength=len(labels))
    rows = [(labels[i], colours[i], int(n)) for i, n in enumerate(present[:len(labels)]) if n] + \
           [("nodata", colours[-1], int((grid == nodata).sum()))]
    thumb = Image.fromarray(scene_thumbnail(scene, img.height)) if scene is not None else None
    left = 8 + (thumb.width + 8 if thumb is not None else 0)
    height = max(img.height, ROW_H * (len(rows) + 2)) + 32
    canvas = Image.new("RGB", (left + img.width + LEGEND_W + 16, height), (255, 255, 255))
    if thumb is not None:
        canvas.paste(thumb, (8, 24))
    canvas.paste(img, (left, 24))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    draw.text((8, 6), title, fill=(0, 0, 0), font=font)
    x0 = left + img.width + 8
    for j, (name, colour, n) in enumerate(rows):
        y = 24 + j * ROW_H
        draw.rectangle((x0, y + 2, x0 + 12, y + 14), fill=tuple(int(c) for c in colour), outline=(0, 0, 0))
        draw.text((x0 + 18, y + 2), name if shrink > 1 else f"{name} ({n})", fill=(0, 0, 0), font=font)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        canvas.save(tmp, format="PNG")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
