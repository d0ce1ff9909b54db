"""`allspark map`: scenes in, georeferenced maps out -- in one process or on a Ray cluster.

    scenes -> open_scene (checks) -> plan_scene (windows, chunks) -> RunStore.begin (new or resume)
      -> every pending chunk: ChunkPredictor (read, skip nodata, Runtime.predict_batch) -> commit
      -> per scene: write_scene_outputs (COGs, GeoJSON, preview) -> summary.json

Chunks are committed as they finish, so a killed run resumes where it stopped and writes the same
outputs. `ALLSPARK_MAP_KILL_AFTER=N` makes the process kill itself (SIGKILL) after its N-th commit:
the resumption test's fault, injected at an exact point.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..fsutil import sha256_file
from ..model.registry import RasterMap, resolve_modality, spec
from .plan import ScenePlan, plan_run
from .settings import DEFAULT_BATCH, MapError, MapSettings
from .store import SUMMARY, RunStore, write_atomic

log = logging.getLogger(__name__)
RASTER_EXT = (".tif", ".tiff", ".vrt", ".jp2", ".img")


@dataclass(frozen=True)
class Execution:
    backend: str = "onnxruntime"
    threads: int = 0  # onnxruntime intra-op threads per process (0: its default)
    ray: str | None = None  # None: this process; "": a local Ray cluster; else a Ray address
    workers: int = 2  # Ray actors (one Runtime each)
    progress: bool = True


def resolve_inputs(inputs: str | Path | list) -> list[Path]:
    """A file, a directory (its rasters), a glob pattern, or a list of those -> scene paths, sorted."""
    out: list[Path] = []
    for item in inputs if isinstance(inputs, list) else [inputs]:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in RASTER_EXT and not q.name.startswith("."))
            if not found:
                raise MapError(f"{p}: a directory with no rasters ({', '.join(RASTER_EXT)})")
            out += found
        elif p.is_file():
            out.append(p)
        elif any(ch in str(item) for ch in "*?["):
            found = sorted(Path(q) for q in glob.glob(str(item)) if Path(q).is_file())
            if not found:
                raise MapError(f"--input {item}: the pattern matches no file")
            out += found
        else:
            raise MapError(f"--input {item}: no such file or directory")
    return out


def run_map(build: str | Path, inputs: str | Path | list, out: str | Path, settings: MapSettings,
            execution: Execution = Execution(), overwrite: bool = False) -> dict[str, Any]:
    """Map every scene of `inputs` into `out`; returns the run summary (also written to out/summary.json)."""
    build = Path(build)
    settings = _canonical(settings, spec(resolve_modality(settings.modality)).raster)
    paths = resolve_inputs(inputs)
    manifest, rmap, mc, plans = plan_run(build, paths, settings)
    identity = {"settings": settings.identity(), "build": sha256_file(build / "manifest.json"),
                "backend": execution.backend, "scenes": [p.scene.identity() for p in plans]}
    store = RunStore(out)
    resumed = store.begin(identity, overwrite)
    pending = [(s, c) for s, p in enumerate(plans) for c in sorted(set(range(len(p.chunks))) - store.done(p.scene.id))]
    if resumed:
        log.info("resuming %s: %d of %d chunks to do", out, len(pending), sum(len(p.chunks) for p in plans))
    stats = _run_chunks(build, plans, pending, rmap, mc, settings, execution, store)
    t = time.perf_counter()
    tags = {"MODALITY": settings.modality, "BUILD": str(build.resolve())}
    scenes = [{**_describe(p), **_write_outputs(p, store, mc.labels, tags, settings)} for p in plans]
    stats["stage_s"]["write"] += time.perf_counter() - t
    summary = _summary(build, manifest, settings, execution, mc, scenes, stats, resumed)
    write_atomic(store.out / SUMMARY, json.dumps(summary, indent=1).encode())
    return summary


def _write_outputs(plan: ScenePlan, store: RunStore, labels, tags: dict[str, str], settings: MapSettings
                   ) -> dict[str, Any]:
    from .outputs import write_scene_outputs

    return write_scene_outputs(plan, store, tuple(labels), tags, settings)


def _canonical(s: MapSettings, rmap: RasterMap | None) -> MapSettings:
    """The modality by its registered name, the default batch size resolved (both name the run)."""
    batch = s.batch or (DEFAULT_BATCH[rmap.unit] if rmap is not None else None)
    return replace(s, modality=resolve_modality(s.modality), batch=batch)


def _run_chunks(build: Path, plans: list[ScenePlan], pending: list[tuple[int, int]], rmap, mc, settings: MapSettings,
                ex: Execution, store: RunStore) -> dict[str, Any]:
    from tqdm import tqdm

    pixel = plans[0].unit == "pixel"
    size = (lambda s, c: sum(w.w * w.h for w in plans[s].chunks[c])) if pixel else (lambda s, c: len(plans[s].chunks[c]))
    total = sum(size(s, c) for s, p in enumerate(plans) for c in range(len(p.chunks)))
    todo = sum(size(s, c) for s, c in pending)
    stage_s = {"read": 0.0, "preprocess": 0.0, "model": 0.0, "write": 0.0}
    kill_after = int(os.environ.get("ALLSPARK_MAP_KILL_AFTER", "0") or 0)
    bar = tqdm(total=total, initial=total - todo, unit="px" if pixel else "window", unit_scale=pixel,
               desc=f"map {settings.modality}", disable=not ex.progress, dynamic_ncols=True, mininterval=1.0)
    commits = 0
    first: list[float] = []  # (time, units done) at the first commit: the steady rate starts there

    def on_result(s: int, c: int, result) -> None:
        nonlocal commits
        t = time.perf_counter()
        if not first:
            first.extend((t, size(s, c)))
        store.commit(plans[s].scene.id, c, result)
        stage_s["write"] += time.perf_counter() - t
        for k, v in result.stage_s.items():
            stage_s[k] = stage_s.get(k, 0.0) + v
        commits += 1
        bar.update(size(s, c))
        if kill_after and commits >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    t0 = time.perf_counter()
    try:
        if pending:
            runner: Callable = _run_local if ex.ray is None else _run_ray
            extra = runner(build, plans, pending, rmap, mc, settings, ex, on_result)
        else:
            extra = {}
    finally:
        bar.close()
    end = time.perf_counter()
    steady = (todo - first[1]) / (end - first[0]) if first and end > first[0] and todo > first[1] else None
    return {"stage_s": stage_s, "seconds": end - t0, "units": todo, "unit": "pixel" if pixel else "window",
            "chunks": len(pending), "steady_per_s": steady, **extra}


def _run_local(build, plans, pending, rmap, mc, settings, ex: Execution, on_result) -> dict[str, Any]:
    from ..runtime.runtime import Runtime
    from .predict import ChunkPredictor

    # one modality's route, not every component of the build (as `allspark run` loads it); its
    # sessions share one CPU arena, so the peak is the largest one's working set, not the sum of theirs
    options = ({"threads": ex.threads, "modalities": [mc.modality], "shared_arena": True}
               if ex.backend == "onnxruntime" else {})
    t = time.perf_counter()
    predictor = ChunkPredictor(Runtime.load(build, backend=ex.backend, **options), plans, rmap, mc, settings)
    load_s = time.perf_counter() - t
    try:
        for s, c in pending:
            on_result(s, c, predictor(s, c))
    finally:
        predictor.close()
    return {"load_s": load_s}


def _run_ray(build, plans, pending, rmap, mc, settings, ex: Execution, on_result) -> dict[str, Any]:
    from .ray_runner import run_on_ray

    return run_on_ray(build, plans, pending, settings, ex, on_result)


def _describe(p: ScenePlan) -> dict[str, Any]:
    crs = None
    if p.scene.crs:
        from rasterio.crs import CRS

        c = CRS.from_wkt(p.scene.crs)
        crs = c.to_string() if c.to_epsg() else p.scene.crs
    return {"id": p.scene.id, "path": p.scene.path, "width": p.scene.width, "height": p.scene.height,
            "bands": list(p.scene.bands), "crs": crs, "nodata_value": p.scene.nodata, "unit": p.unit,
            "window": p.tile, "stride": p.stride, "grid": [p.rows, p.cols], "cell_px": p.cell,
            "windows": p.windows, "cells": p.cells}


def _summary(build: Path, manifest: dict, settings: MapSettings, ex: Execution, mc, scenes: list[dict],
             stats: dict, resumed: bool) -> dict[str, Any]:
    counts = {label: sum(s["counts"][label] for s in scenes) for label in mc.labels}
    units, seconds = stats["units"], stats["seconds"]
    busy = seconds - stats.get("load_s", 0.0)  # Ray: actor start-up stays in (it is the cluster's cost)
    return {
        "format": "allspark-map-summary", "modality": settings.modality, "settings": settings.identity(),
        "labels": list(mc.labels), "label_set": mc.label_set,
        "build": {"path": str(build.resolve()), "manifest_sha256": sha256_file(build / "manifest.json"),
                  "created": manifest.get("created"), "precision": manifest.get("precision"),
                  "provenance": manifest.get("provenance", {})},
        "execution": {"backend": ex.backend, "threads": ex.threads,
                      "ray": None if ex.ray is None else {"address": ex.ray or "local", "workers": ex.workers}},
        "scenes": scenes,
        "totals": {"counts": counts, "predicted": sum(s["predicted"] for s in scenes),
                   "nodata": sum(s["nodata"] for s in scenes), "failed": sum(s["failed"] for s in scenes)},
        "throughput": {"resumed": resumed, "chunks_run": stats["chunks"], f"{stats['unit']}s": units,
                       "seconds": round(seconds, 3), "load_s": round(stats.get("load_s", 0.0), 3),
                       f"{stats['unit']}s_per_s": round(units / busy, 2) if busy > 0 and units else None,
                       # after the first commit: without start-up (Runtime load, Ray's cluster and actors)
                       "steady_per_s": round(stats["steady_per_s"], 2) if stats.get("steady_per_s") else None,
                       "stage_s": {k: round(v, 3) for k, v in stats["stage_s"].items()},
                       **({"ray": stats["ray"]} if "ray" in stats else {})},
    }
