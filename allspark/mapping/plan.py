"""A run's plan: the model's raster route, every scene checked (`plan_run`), and where each scene is
read -- its windows, how they group into chunks, and the output grid they fill (`plan_scene`).

Tile modalities (one prediction per window): windows of `tile` px every `stride` px, row-major; the
last row and column are moved in to end at the scene's edge, so every window is whole. Cell (r, c)
is the `stride` x `stride` square at the centre of the regular window (r, c) (offset by
(tile - stride) // 2 px; with the default stride == tile, exactly the window), clipped to the scene:
the last row and column of cells end at the scene's edge, never past it. The output raster is on the
scene's grid, `cell` px to its side: the coarsest square grid on which every cell, the clipped ones
included, is whole (gcd of stride, offset, width and height), or 1 (`--per-pixel`); either way its
bounds are the scene's. A chunk is `batch` consecutive windows.

Pixel modalities (one prediction per pixel): square blocks of `pixels` px (smaller at the edges);
the output grid is the scene's own. A chunk is one block.

Chunks are the unit of prediction, commit and resumption; they depend only on the scene's size and
the settings, so an interrupted run, its resumption, and a run on Ray see the same chunks -- and
make the same model calls.

    tile 4, stride 2 over a 9 px row:  windows at 0, 2, 4, 5 (moved in);  cells [1,3) [3,5) [5,7) [7,9)
    tile 56 over a 420 px row:  windows at 0 .. 336, 364 (moved in);  cells [0,56) .. [336,392) [392,420)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..contract.manifest import read_manifest
from ..model.config import AllSparkConfig
from ..model.registry import RasterMap, resolve_modality, spec, specs
from .scene import SceneInfo, open_scene
from .settings import MapError, MapSettings

DEFAULT_PIXELS = 64


@dataclass(frozen=True)
class Window:
    row: int  # output cell (tile) or block (pixel) index
    col: int
    x: int  # pixel window in the scene
    y: int
    w: int
    h: int


@dataclass(frozen=True)
class ScenePlan:
    scene: SceneInfo
    unit: str  # "tile" | "pixel"
    tile: int  # window side (tile) or block side (pixel)
    stride: int
    rows: int  # the output raster: rows x cols pixels of `cell` scene px a side
    cols: int
    transform: tuple[float, ...]  # the output raster's affine transform (origin: the scene's)
    chunks: tuple[tuple[Window, ...], ...]
    cell: int = 1  # output pixel side in scene px
    offset: int = 0  # tile modalities: where cell (0, 0) starts, px from the scene's origin

    def cell_box(self, w: Window) -> tuple[int, int, int, int]:
        """Window `w`'s cell in scene px, (x0, y0, x1, y1), clipped to the scene."""
        if self.unit == "pixel":
            return w.x, w.y, w.x + w.w, w.y + w.h
        x0, y0 = self.offset + w.col * self.stride, self.offset + w.row * self.stride
        return x0, y0, min(x0 + self.stride, self.scene.width), min(y0 + self.stride, self.scene.height)

    @property
    def windows(self) -> int:
        return sum(len(c) for c in self.chunks)

    @property
    def cells(self) -> int:
        return self.rows * self.cols


def _starts(size: int, tile: int, stride: int) -> list[int]:
    n = 1 + math.ceil(max(size - tile, 0) / stride)
    return [min(i * stride, size - tile) for i in range(n)]


def plan_scene(scene: SceneInfo, unit: str, tile: int, stride: int, batch: int, per_pixel: bool = False) -> ScenePlan:
    a, b, c, d, e, f = scene.transform
    if unit == "tile":
        xs, ys = _starts(scene.width, tile, stride), _starts(scene.height, tile, stride)
        wins = [Window(r, k, x, y, tile, tile) for r, y in enumerate(ys) for k, x in enumerate(xs)]
        chunks = tuple(tuple(wins[i:i + batch]) for i in range(0, len(wins), batch))
        off = (tile - stride) // 2  # cells sit at the centre of their windows (a whole pixel in)
        g = 1 if per_pixel else math.gcd(stride, off, scene.width, scene.height)
        t = (a * g, b * g, c, d * g, e * g, f)
        return ScenePlan(scene, unit, tile, stride, scene.height // g, scene.width // g, t, chunks, g, off)
    blocks = tuple((Window(r, k, x, y, min(tile, scene.width - x), min(tile, scene.height - y)),)
                   for r, y in enumerate(range(0, scene.height, tile))
                   for k, x in enumerate(range(0, scene.width, tile)))
    return ScenePlan(scene, unit, tile, tile, scene.height, scene.width, scene.transform, blocks)


# ---- a run's plan: the model's raster route, the scenes checked, their windows ---------------------

def raster_modalities() -> tuple[str, ...]:
    return tuple(n for n, s in specs().items() if s.raster is not None)


def _model(build: Path, modality: str) -> tuple[dict, str, RasterMap, Any]:
    manifest = read_manifest(build)
    m = resolve_modality(modality)
    rmap = spec(m).raster
    if rmap is None:
        raise MapError(f"{m} is not a raster modality; allspark map takes: {', '.join(raster_modalities())}")
    if m not in manifest["modalities"]:
        raise MapError(f"{build}: the build has no {m} route (it has {', '.join(manifest['modalities'])})")
    mc = AllSparkConfig.from_dict(manifest["config"]).modality(m)
    return manifest, m, rmap, mc


def plan_run(build: Path, paths: list[Path], settings: MapSettings) -> tuple[dict, RasterMap, Any, list[ScenePlan]]:
    manifest, m, rmap, mc = _model(build, settings.modality)
    if rmap.unit == "pixel" and (settings.tile is not None or settings.stride is not None):
        raise MapError(f"{m} is mapped per pixel: --tile and --stride do not apply; --pixels sets the block side")
    if rmap.unit == "tile" and settings.pixels is not None:
        raise MapError(f"{m} is mapped per tile: --pixels does not apply; --tile and --stride set the windows")
    tile = (settings.tile or rmap.tile(mc)) if rmap.unit == "tile" else (settings.pixels or DEFAULT_PIXELS)
    stride = settings.stride or tile
    if settings.tile is None and settings.stride is not None and settings.stride > tile:
        raise MapError(f"--stride {settings.stride} is larger than the tile ({tile} px, the model's input size)")
    infos: list[SceneInfo] = [open_scene(p, settings, rmap.bands(mc), tile if rmap.unit == "tile" else None)
                              for p in paths]
    ids = [i.id for i in infos]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise MapError(f"several scenes are named {', '.join(dup)}: their outputs would collide; rename them")
    if rmap.unit == "pixel" and settings.per_pixel:
        raise MapError(f"{m} is mapped per pixel already: --per-pixel applies to tile modalities")
    plans = [plan_scene(i, rmap.unit, tile, stride, settings.batch, settings.per_pixel) for i in infos]
    return manifest, rmap, mc, plans
