"""`allspark demo-scene`: a raster modality's synthetic scene (`DemoTask.scene`) as a georeferenced
COG -- UTM 33N, 10 m pixels -- with its truth (label index per cell, -1 nodata) beside it as
`<name>.truth.npy`, for the README's example, the tests and `allspark bench map`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..contract.manifest import read_manifest
from ..model.config import AllSparkConfig
from ..model.presets import get_preset
from ..model.registry import resolve_modality, spec, specs
from .scene import DEMO_CRS, write_scene
from .settings import MapError

DEFAULT_CELLS = {"tile": (12, 16), "pixel": (96, 128)}
PIXEL_SIZE_M = 10.0


def demo_scene_modalities() -> tuple[str, ...]:
    return tuple(n for n, s in specs().items() if s.raster is not None and s.demo is not None and s.demo.scene)


def make_demo_scene(modality: str, out: str | Path, build: str | Path | None = None, rows: int | None = None,
                    cols: int | None = None, seed: int = 0, georeferenced: bool = True) -> tuple[Path, np.ndarray]:
    m = resolve_modality(modality)
    s = spec(m)
    if s.raster is None or s.demo is None or s.demo.scene is None:
        raise MapError(f"{m} has no demo scene; these do: {', '.join(demo_scene_modalities())}")
    config = AllSparkConfig.from_dict(read_manifest(Path(build))["config"]) if build else get_preset("demo")
    mc = config.modality(m)
    r0, c0 = DEFAULT_CELLS[s.raster.unit]
    pixels, truth, nodata = s.demo.scene(mc, np.random.default_rng(seed), rows or r0, cols or c0)
    out = Path(out)
    write_scene(out, pixels, nodata, PIXEL_SIZE_M, crs=DEMO_CRS if georeferenced else None)
    np.save(out.with_suffix(".truth.npy"), truth)
    return out, truth
