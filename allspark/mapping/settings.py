"""What a map run is asked to do (`MapSettings`), and the errors of this part."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import AllSparkError, ConfigError

DEFAULT_BATCH = {"tile": 64, "pixel": 256}


class MapError(AllSparkError):
    """A scene, an output directory or a map run cannot be used as asked."""


@dataclass(frozen=True)
class MapSettings:
    """One map run's settings. Everything here but `batch`'s effect on speed decides the outputs,
    so a run resumes only into a directory written with the same settings (`identity`)."""

    modality: str
    tile: int | None = None  # tile modalities: window side in pixels; None: the model's input size
    stride: int | None = None  # tile modalities: step between windows; None: the tile (no overlap)
    pixels: int | None = None  # pixel modalities: side of the square block read, predicted and committed together (64)
    # tile modalities: windows per model call and per commit; pixel: pixels per model call.
    # None: DEFAULT_BATCH, the best measured on the demo build (docs/benchmarks/map.md)
    batch: int | None = None
    bands: tuple[int, ...] | None = None  # 1-based band numbers, in the order the model takes them
    nodata: float | None = None  # overrides the scene's own nodata value
    scale: float = 1.0  # multiplies every value read (e.g. 1e-4 for Sentinel-2 L2A reflectance)
    per_pixel: bool = False  # tile modalities: rasters on the scene's own pixels (each its covering cell's value)

    def __post_init__(self) -> None:
        for name, low in (("tile", 1), ("stride", 1), ("pixels", 1), ("batch", 1)):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < low):
                raise ConfigError(f"--{name}: expected an integer >= {low}, got {v!r}")
        if self.tile is not None and self.stride is not None and self.stride > self.tile:
            raise ConfigError(f"--stride {self.stride} is larger than --tile {self.tile}: windows would leave "
                              "gaps the class raster claims to cover; expected a stride <= the tile")
        if self.bands is not None:
            if not self.bands or any(not isinstance(b, int) or b < 1 for b in self.bands):
                raise ConfigError(f"--bands: expected 1-based band numbers (1, 2, ...), got {list(self.bands)}")
        if self.nodata is not None and not isinstance(self.nodata, (int, float)):
            raise ConfigError(f"--nodata: expected a number, got {self.nodata!r}")
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale > 0):
            raise ConfigError(f"--scale: expected a finite number > 0, got {self.scale!r}")

    def identity(self) -> dict[str, Any]:
        """What must match for a run to resume into a directory (JSON-safe)."""
        d = asdict(self)
        d["bands"] = list(self.bands) if self.bands else None
        d["nodata"] = None if self.nodata is None else ("nan" if math.isnan(self.nodata) else self.nodata)
        return d
