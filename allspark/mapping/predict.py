"""One chunk of a scene through a `Runtime`: read its windows, skip nodata, predict, score.

A chunk's result (`ChunkResult`) holds, per cell of the chunk (a tile window, or a block's pixels
row-major): the label index (`NODATA` where the cell held no data, `FAILED` where the model's
values stopped being finite), the top-1 probability, and for tiles the top-k labels and scores.
It is what a worker sends back and what a commit stores; `stage_s` says where the time went.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import NumericsError
from ..model.config import ModalityConfig
from ..model.registry import RasterMap
from ..runtime.runtime import Request, Runtime
from .plan import ScenePlan, Window
from .scene import SceneReader
from .settings import MapError, MapSettings

NODATA, FAILED = -1, -2
TOP_K = 3


@dataclass
class ChunkResult:
    label: np.ndarray  # (cells,) int16
    score: np.ndarray  # (cells,) float32, NaN where no prediction
    top_label: np.ndarray | None = None  # tiles: (cells, TOP_K) int16
    top_score: np.ndarray | None = None  # tiles: (cells, TOP_K) float32
    stage_s: dict[str, float] = field(default_factory=dict)  # read, preprocess, model

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        arrays = {"label": self.label, "score": self.score}
        if self.top_label is not None:
            arrays.update(top_label=self.top_label, top_score=self.top_score)
        np.savez(buf, **arrays, stage_names=np.asarray(list(self.stage_s)),
                 stage_s=np.asarray(list(self.stage_s.values()), np.float64))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "ChunkResult":
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return cls(z["label"], z["score"], z["top_label"] if "top_label" in z else None,
                       z["top_score"] if "top_score" in z else None,
                       dict(zip(z["stage_names"].tolist(), z["stage_s"].tolist())))


class ChunkPredictor:
    """Predicts chunks of one run's scenes; one per process (or Ray actor), readers opened lazily."""

    def __init__(self, runtime: Runtime, plans: list[ScenePlan], rmap: RasterMap, mc: ModalityConfig,
                 settings: MapSettings):
        self.runtime, self.plans, self.rmap, self.mc, self.settings = runtime, plans, rmap, mc, settings
        self.labels = {name: i for i, name in enumerate(mc.labels)}
        self._readers: dict[int, SceneReader] = {}

    def close(self) -> None:
        for r in self._readers.values():
            r.close()
        self._readers.clear()

    def __call__(self, scene: int, chunk: int) -> ChunkResult:
        plan = self.plans[scene]
        if scene not in self._readers:
            self._readers[scene] = SceneReader(plan.scene, self.settings)
        reader = self._readers[scene]
        windows = plan.chunks[chunk]
        t0 = time.perf_counter()
        if plan.unit == "tile":
            return self._tiles(reader, windows, t0)
        return self._pixels(reader, windows[0], t0)

    def _tiles(self, reader: SceneReader, windows: tuple[Window, ...], t0: float) -> ChunkResult:
        n = len(windows)
        label, score = np.full(n, NODATA, np.int16), np.full(n, np.nan, np.float32)
        top_label, top_score = np.full((n, TOP_K), NODATA, np.int16), np.full((n, TOP_K), np.nan, np.float32)
        requests, where = [], []
        for i, w in enumerate(windows):
            px, valid = reader.read(w.x, w.y, w.w, w.h)
            if valid.any():
                requests.append(Request(self.mc.modality, {self.rmap.field: px}))
                where.append(i)
        t1 = time.perf_counter()
        stages = {"read": t1 - t0, "preprocess": 0.0, "model": 0.0}
        for i, p in zip(where, self._predict(requests, windows, where, stages)):
            if p is None:
                label[i] = FAILED
                continue
            order = sorted(p.scores.items(), key=lambda kv: -kv[1])[:TOP_K]
            top_label[i, :len(order)] = [self.labels[k] for k, _ in order]
            top_score[i, :len(order)] = [v for _, v in order]
            label[i], score[i] = top_label[i, 0], top_score[i, 0]
        return ChunkResult(label, score, top_label, top_score, stages)

    def _pixels(self, reader: SceneReader, w: Window, t0: float) -> ChunkResult:
        px, valid = reader.read(w.x, w.y, w.w, w.h)
        label, score = np.full(w.w * w.h, NODATA, np.int16), np.full(w.w * w.h, np.nan, np.float32)
        flat, idx = px.reshape(-1, px.shape[-1]), np.flatnonzero(valid.reshape(-1))
        stages = {"read": time.perf_counter() - t0, "preprocess": 0.0, "model": 0.0}
        b = self.settings.batch
        for s in range(0, len(idx), b):
            part = idx[s:s + b]
            requests = [Request(self.mc.modality, {self.rmap.field: flat[i]}) for i in part]
            for i, p in zip(part, self._predict(requests, (w,) * len(part), None, stages)):
                if p is None:
                    label[i] = FAILED
                else:
                    label[i] = self.labels[p.label]
                    score[i] = p.scores[p.label]
        return ChunkResult(label, score, stage_s=stages)

    def _predict(self, requests: list[Request], windows, where, stages: dict[str, float]) -> list:
        """Predictions (None where the values stopped being finite); any other error ends the run."""
        if not requests:
            return []
        t = time.perf_counter()
        out = self.runtime.predict_batch(requests)
        elapsed = time.perf_counter() - t
        pre = next((p.timings_ms.get("preprocess", 0.0) for p in out if not isinstance(p, Exception)), 0.0) / 1e3
        stages["preprocess"] += pre
        stages["model"] += elapsed - pre
        results = []
        for k, p in enumerate(out):
            if isinstance(p, NumericsError):
                results.append(None)
            elif isinstance(p, Exception):
                w = windows[where[k]] if where is not None else windows[k]
                raise MapError(f"{self.mc.modality}: the window at x={w.x}, y={w.y} ({w.w} x {w.h} px) was refused: {p}")
            else:
                results.append(p)
        return results
