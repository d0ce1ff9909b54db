"""Scenes: open and check a raster (GeoTIFF, COG, any GDAL format) and read it window by window.

A scene is never read whole: `SceneReader.read` returns one window's pixels (rows x cols x bands,
the selected bands in the order asked) and which of them hold data. A pixel is nodata when every
selected band is masked (the scene's nodata value, its mask band or alpha, or `--nodata`) or not
finite. Inside a window that is predicted, the masked values of a band are replaced by the mean of
that band's valid values in the window, so the model never sees a nodata sentinel or a NaN.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .settings import MapError, MapSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SceneInfo:
    path: str
    id: str  # names the scene's outputs: the file name without its extension
    width: int
    height: int
    count: int  # bands in the file
    dtype: str
    crs: str | None  # WKT; None: not georeferenced (outputs in pixel coordinates)
    transform: tuple[float, ...]  # the affine pixel -> CRS transform (a, b, c, d, e, f)
    nodata: float | None  # the value that marks missing data (the scene's, or --nodata)
    bands: tuple[int, ...]  # the bands read (1-based)
    size_bytes: int
    mtime_ns: int

    def identity(self) -> dict[str, Any]:
        """What must not change under a run that resumes."""
        return {"path": self.path, "size_bytes": self.size_bytes, "mtime_ns": self.mtime_ns}


def _rasterio():
    try:
        import rasterio
    except ImportError as e:  # an optional extra
        raise MapError(f"allspark map needs rasterio ({e}); install it: pip install 'allspark-runtime[geo]'") from None
    return rasterio


def open_scene(path: str | Path, settings: MapSettings, allowed_bands: tuple[int, ...], tile: int | None) -> SceneInfo:
    """Check `path` against the run: readable, the band count the modality takes, large enough."""
    rasterio = _rasterio()
    path = Path(path)
    try:
        with rasterio.open(path) as ds:
            info = _describe(ds, path, settings)
    except rasterio.errors.RasterioError as e:
        raise MapError(f"{path}: not a readable raster ({e}); expected a GeoTIFF, COG or another GDAL raster") from None
    n = len(info.bands)
    if n not in allowed_bands:
        hint = ",".join(str(i) for i in range(1, min(allowed_bands) + 1))
        raise MapError(f"{path}: {settings.modality} takes {' or '.join(map(str, allowed_bands))} band(s); "
                       f"{'--bands selects' if settings.bands else 'the scene has'} {n}"
                       f"{'' if settings.bands else '; choose them with --bands (e.g. --bands ' + hint + ')'}")
    if tile is not None and tile > min(info.width, info.height):
        raise MapError(f"{path}: a {tile} px tile is larger than the scene ({info.width} x {info.height} px); "
                       f"expected --tile <= {min(info.width, info.height)}")
    if info.crs is None:
        log.warning("%s has no CRS: its outputs are in pixel coordinates (row, column), not georeferenced", path)
    return info


def _describe(ds, path: Path, settings: MapSettings) -> SceneInfo:
    bands = settings.bands or tuple(range(1, ds.count + 1))
    bad = [b for b in bands if b > ds.count]
    if bad:
        raise MapError(f"{path}: --bands {','.join(map(str, bad))}: the scene has bands 1..{ds.count}")
    if ds.width < 1 or ds.height < 1:
        raise MapError(f"{path}: an empty raster ({ds.width} x {ds.height} px)")
    nodata = settings.nodata if settings.nodata is not None else ds.nodata
    st = path.stat()
    return SceneInfo(str(path.resolve()), path.name.split(".")[0], ds.width, ds.height, ds.count, str(ds.dtypes[0]),
                     ds.crs.to_wkt() if ds.crs else None, tuple(ds.transform)[:6],
                     None if nodata is None else float(nodata), tuple(bands), st.st_size, st.st_mtime_ns)


class SceneReader:
    """Windows of one scene; keeps the file open (GDAL's block cache serves overlapping windows)."""

    def __init__(self, info: SceneInfo, settings: MapSettings):
        self.info, self.settings = info, settings
        self._override = settings.nodata is not None
        self._ds = _rasterio().open(info.path)

    def close(self) -> None:
        self._ds.close()

    def read(self, x: int, y: int, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
        """(pixels h x w x bands: uint8 as stored when unscaled, else float32 times --scale;
        valid h x w bool)."""
        from rasterio.windows import Window

        win = Window(x, y, w, h)
        try:
            data = self._ds.read(list(self.info.bands), window=win)  # (B, h, w)
            masked = self._masked(data, win)
        except Exception as e:  # truncated or corrupt blocks surface here, not at open
            raise MapError(f"{self.info.path}: cannot read the window at x={x}, y={y} ({w} x {h} px): {e}") from None
        if data.dtype.kind == "f":
            masked |= ~np.isfinite(data)
        valid = ~masked.all(axis=0)
        keep_uint8 = data.dtype == np.uint8 and self.settings.scale == 1.0
        px = data if keep_uint8 else data.astype(np.float32) * np.float32(self.settings.scale)
        if valid.any() and masked.any():
            px = _fill(px, masked, valid)
        return np.ascontiguousarray(np.moveaxis(px, 0, -1)), valid

    def _masked(self, data: np.ndarray, win) -> np.ndarray:
        """(B, h, w) bool: values that are missing."""
        if self._override:
            v = self.settings.nodata
            return np.isnan(data) if math.isnan(v) else data == np.asarray(v).astype(data.dtype)
        with warnings.catch_warnings():  # a nodata value shadowing an alpha band is GDAL's rule, and ours
            warnings.simplefilter("ignore", category=UserWarning)
            return self._ds.read_masks(list(self.info.bands), window=win) == 0


def _fill(px: np.ndarray, masked: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Masked values of each band -> that band's mean over the window's unmasked values (0 if none)."""
    px = px.copy()
    for b in range(px.shape[0]):
        m = masked[b]
        if m.any():
            good = px[b][~m]
            fill = good.astype(np.float64).mean() if good.size else 0.0
            px[b][m] = np.round(fill) if px.dtype == np.uint8 else fill
    return px


# ---- writing a scene (the demo's synthetic scenes, tests) ---------------------------------------

DEMO_CRS = "EPSG:32633"  # UTM zone 33N (Pavia and much of central Europe)


def write_scene(path: str | Path, pixels: np.ndarray, nodata: float | None, pixel_size: float = 10.0,
                origin: tuple[float, float] = (500000.0, 5000000.0), crs: str | None = DEMO_CRS,
                cog: bool = True) -> Path:
    """Write an (H, W, bands) array as a (cloud-optimised) GeoTIFF, north up, atomically."""
    rasterio = _rasterio()
    from rasterio.transform import Affine

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w, b = pixels.shape
    profile = dict(driver="GTiff", width=w, height=h, count=b, dtype=pixels.dtype.name, nodata=nodata,
                   transform=Affine(pixel_size, 0.0, origin[0], 0.0, -pixel_size, origin[1]), tiled=True,
                   blockxsize=256, blockysize=256, compress="deflate", interleave="pixel",
                   photometric="RGB" if b == 3 and pixels.dtype == np.uint8 else "MINISBLACK")  # no band is alpha
    if crs:
        profile["crs"] = crs
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(np.moveaxis(pixels, -1, 0))
        if cog:
            from rasterio.shutil import copy

            cog_tmp = tmp.with_name(tmp.name + ".cog")
            copy(tmp, cog_tmp, driver="COG", COMPRESS="DEFLATE")
            os.replace(cog_tmp, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
