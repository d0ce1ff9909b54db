"""Whole scenes in, georeferenced maps out: `allspark map` over GeoTIFF/COG scenes of any size,
windowed and resumable, in one process or on Ray Data (see `job` for the flow)."""

from .job import Execution, run_map
from .plan import raster_modalities
from .settings import MapError, MapSettings

__all__ = ["Execution", "MapError", "MapSettings", "raster_modalities", "run_map"]
