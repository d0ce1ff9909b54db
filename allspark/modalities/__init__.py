"""The ten built-in modalities of AllSpark, registered like any plug-in.

Importing this package registers them, in the order that is also the adapter-set order of every
preset: language, code, table, rgb, msi, hsi, sar, trajectory, graph, point_cloud. The registry
(`allspark.model.registry`) imports it the first time it is read; code elsewhere never branches on
these names. `Modality` lists the built-in names for convenience (members compare and hash as their
string values, so `Modality.RGB` and `"rgb"` are the same key).
"""

from enum import Enum

from ..model.registry import register_modality
from . import graph, hsi, imagery, point_cloud, table, text, trajectory


class Modality(str, Enum):
    LANGUAGE = "language"
    CODE = "code"
    TABLE = "table"
    RGB = "rgb"
    MSI = "msi"
    HSI = "hsi"
    SAR = "sar"
    TRAJECTORY = "trajectory"
    GRAPH = "graph"
    POINT_CLOUD = "point_cloud"

    __hash__ = str.__hash__

    def __str__(self) -> str:
        return self.value


BUILTIN = (text.LANGUAGE, text.CODE, table.SPEC, imagery.RGB, imagery.MSI, hsi.SPEC, imagery.SAR,
           trajectory.SPEC, graph.SPEC, point_cloud.SPEC)
for _spec in BUILTIN:
    register_modality(_spec)

__all__ = ["BUILTIN", "Modality"]
