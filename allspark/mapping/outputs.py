"""A scene's outputs, assembled from its committed parts in chunk order (so a resumed run writes
exactly what an uninterrupted one does):

    <scene>.classes.tif       label index per cell (uint8, 255 = nodata; uint16, 65535, past 255
                              labels), with a colour table and the label names in its tags; COG
    <scene>.confidence.tif    top-1 probability per cell (float32, NaN = nodata); COG
    <scene>.tiles.geojson     tile modalities: one feature per window predicted -- its footprint
                              (WGS84, as RFC 7946 asks; pixel coordinates for a scene without a CRS),
                              label, score, top-3
    <scene>.preview.png       the class map with a legend (`preview`)

Both rasters carry the scene's CRS and end where the scene ends: their grid is the scene's own for
pixel modalities (and tiles with `--per-pixel`), else the coarsest square grid on which every tile
cell, clipped to the scene, is whole (`plan.ScenePlan.cell`). An output pixel whose scene pixels are
all nodata is nodata, whatever the window around it predicted. Tile footprints are the cells, as
painted in the rasters (the window read is a property). Every file is written to a temporary name
and renamed when complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .plan import ScenePlan
from .predict import FAILED, NODATA
from .preview import palette, write_preview
from .settings import MapSettings
from .store import RunStore, write_atomic


def class_dtype(labels: tuple[str, ...]) -> tuple[str, int]:
    return ("uint8", 255) if len(labels) < 255 else ("uint16", 65535)


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_scene_outputs(plan: ScenePlan, store: RunStore, labels: tuple[str, ...], tags: dict[str, str],
                        settings: MapSettings) -> dict[str, Any]:
    """Rasters, vector (tiles) and preview of one scene; returns its counts and output paths."""
    from rasterio.crs import CRS

    sid = plan.scene.id
    counts = np.zeros(len(labels), np.int64)
    stats = {"nodata": 0, "failed": 0}
    features: list[dict] = []
    crs = CRS.from_wkt(plan.scene.crs) if plan.scene.crs else None
    cls_path, conf_path = store.output(sid, ".classes.tif"), store.output(sid, ".confidence.tif")
    dtype, nodata = class_dtype(labels)
    with _GridWriter(cls_path, plan, crs, dtype, nodata, labels, tags) as cls_w, \
            _GridWriter(conf_path, plan, crs, "float32", float("nan"), None, tags) as conf_w:
        empty = _nodata_cells(plan, settings) if plan.unit == "tile" else None
        for k, chunk in enumerate(plan.chunks):
            res = store.load(sid, k)
            lab = res.label.astype(np.int64)
            counts += np.bincount(lab[lab >= 0], minlength=len(labels))
            stats["nodata"] += int((lab == NODATA).sum())
            stats["failed"] += int((lab == FAILED).sum())
            cls = np.where(lab >= 0, lab, nodata)
            if plan.unit == "tile":
                for i, w in enumerate(chunk):
                    cls_w.cell(plan.cell_box(w), cls[i])
                    conf_w.cell(plan.cell_box(w), res.score[i])
                    if lab[i] != NODATA and not cls_w.covers(empty, plan.cell_box(w)):
                        features.append(_feature(plan, w, res, i, labels))  # a cell that shows on the map
            else:
                w = chunk[0]
                cls_w.block(w.x, w.y, cls.reshape(w.h, w.w))
                conf_w.block(w.x, w.y, res.score.reshape(w.h, w.w))
        if empty is not None:  # nodata stays nodata, whatever the window around it predicted
            cls_w.grid[empty], conf_w.grid[empty] = nodata, np.nan
    outputs = {"classes": cls_path.name, "confidence": conf_path.name}
    if plan.unit == "tile":
        path = store.output(sid, ".tiles.geojson")
        write_atomic(path, json.dumps(_collection(features, crs), separators=(",", ":")).encode())
        outputs["tiles"] = path.name
    preview = store.output(sid, ".preview.png")
    write_preview(cls_path, preview, labels, nodata, f"{sid}: the scene and its {tags.get('MODALITY', '')} classes",
                  plan.scene)
    outputs["preview"] = preview.name
    return {"counts": {labels[i]: int(n) for i, n in enumerate(counts)}, "predicted": int(counts.sum()),
            **stats, "outputs": outputs}


class _GridWriter:
    """One band over the plan's output grid: tiles collect in memory (a grid of cells is small),
    blocks go straight to a tiled GeoTIFF; closing converts it to a COG and renames it into place."""

    def __init__(self, path: Path, plan: ScenePlan, crs, dtype: str, nodata: float, labels, tags: dict[str, str]):
        self.path, self.plan, self.crs, self.dtype, self.nodata = path, plan, crs, dtype, nodata
        self.labels, self.tags = labels, tags
        self.grid = np.full((plan.rows, plan.cols), nodata, dtype) if plan.unit == "tile" else None

    def __enter__(self) -> "_GridWriter":
        import rasterio
        from rasterio.transform import Affine

        self.tmp = _tmp(self.path)
        profile = dict(driver="GTiff", width=self.plan.cols, height=self.plan.rows, count=1, dtype=self.dtype,
                       nodata=self.nodata, transform=Affine(*self.plan.transform), tiled=True, blockxsize=256,
                       blockysize=256, compress="deflate")
        if self.crs is not None:
            profile["crs"] = self.crs
        self.ds = rasterio.open(self.tmp, "w", **profile)
        if self.labels is not None:  # before any pixels: the colour table sets the photometric tag
            self.ds.write_colormap(1, {i: (*rgb, 255) for i, rgb in enumerate(palette(len(self.labels)))})
        return self

    def _cells(self, box: tuple[int, int, int, int]) -> tuple[slice, slice]:
        g = self.plan.cell
        x0, y0, x1, y1 = box  # scene px, whole multiples of g (plan_scene chose g so)
        return slice(y0 // g, y1 // g), slice(x0 // g, x1 // g)

    def cell(self, box: tuple[int, int, int, int], value) -> None:
        self.grid[self._cells(box)] = value

    def covers(self, mask: np.ndarray, box: tuple[int, int, int, int]) -> bool:
        """Whether `mask` (rows x cols) holds over the whole of the cell `box`."""
        return bool(mask[self._cells(box)].all())

    def block(self, x: int, y: int, values: np.ndarray) -> None:
        from rasterio.windows import Window

        self.ds.write(values.astype(self.dtype), 1, window=Window(x, y, values.shape[1], values.shape[0]))

    def __exit__(self, kind, *_) -> None:
        from rasterio.shutil import copy

        try:
            if kind is None:
                if self.grid is not None:
                    self.ds.write(self.grid, 1)
                if self.labels is not None:
                    self.ds.set_band_description(1, "label index")
                    self.ds.update_tags(LABELS=json.dumps(list(self.labels)), **self.tags)
                else:
                    self.ds.set_band_description(1, "top-1 probability")
                    self.ds.update_tags(**self.tags)
            self.ds.close()
            if kind is None:
                cog = self.tmp.with_name(self.tmp.name + ".cog")
                try:
                    copy(self.tmp, cog, driver="COG", COMPRESS="DEFLATE",
                         RESAMPLING="NEAREST" if self.labels is not None else "AVERAGE")
                    os.replace(cog, self.path)
                finally:
                    cog.unlink(missing_ok=True)
        finally:
            self.tmp.unlink(missing_ok=True)


def _nodata_cells(plan: ScenePlan, settings: MapSettings, rows: int = 128) -> np.ndarray:
    """Output pixels (rows x cols bool) none of whose scene pixels holds data (as the windows were
    read: the same reader and settings); read in strips of about `rows` scene rows."""
    from .scene import SceneReader

    g, width = plan.cell, plan.scene.width
    empty = np.zeros((plan.rows, plan.cols), bool)
    reader = SceneReader(plan.scene, settings)
    try:
        step = max(g, rows // g * g)
        for y in range(0, plan.scene.height, step):
            h = min(step, plan.scene.height - y)
            _, valid = reader.read(0, y, width, h)  # (h, width)
            empty[y // g:(y + h) // g] = ~valid.reshape(h // g, g, width // g, g).any(axis=(1, 3))
    finally:
        reader.close()
    return empty


def _feature(plan: ScenePlan, w, res, i: int, labels: tuple[str, ...]) -> dict[str, Any]:
    a, b, c, d, e, f = plan.scene.transform
    x0, y0, x1, y1 = plan.cell_box(w)  # the cell, as the rasters paint it
    corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]
    xy = [(a * x + b * y + c, d * x + e * y + f) for x, y in corners]
    ok = res.label[i] >= 0
    top = [{"label": labels[int(li)], "score": round(float(s), 6)}
           for li, s in zip(res.top_label[i], res.top_score[i]) if li >= 0] if ok else []
    props = {"row": w.row, "col": w.col, "cell": [x0, y0, x1 - x0, y1 - y0], "window": [w.x, w.y, w.w, w.h],
             "label": labels[int(res.label[i])] if ok else None,
             "score": round(float(res.score[i]), 6) if ok else None, "top": top}
    if not ok:
        props["error"] = "non-finite values in the model (NumericsError)"
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [xy]}, "properties": props}


def _collection(features: list[dict], crs) -> dict[str, Any]:
    """RFC 7946 wants WGS84 longitude, latitude: footprints are reprojected (corners; tile edges are
    short enough that the projection's curvature does not matter at 7 decimals, about 1 cm)."""
    meta = {"coordinates": "longitude, latitude (EPSG:4326)"}
    if crs is None:
        meta = {"coordinates": "pixel column, row (the scene has no CRS)"}
    elif features:
        from rasterio.warp import transform

        ring = [p for ft in features for p in ft["geometry"]["coordinates"][0]]
        lon, lat = transform(crs, "EPSG:4326", [p[0] for p in ring], [p[1] for p in ring])
        k = 0
        for ft in features:
            n = len(ft["geometry"]["coordinates"][0])
            ft["geometry"]["coordinates"] = [[[round(x, 7), round(y, 7)] for x, y in zip(lon[k:k + n], lat[k:k + n])]]
            k += n
    return {"type": "FeatureCollection", "allspark": meta, "features": features}
