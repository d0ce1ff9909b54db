"""`allspark bench map BUILD`: throughput of `allspark map` on the demo scenes of every raster
modality of a build -- windows/s (tiles) and pixels/s (per-pixel modalities) -- single process at
several batch sizes (the best is the recommended default), then Ray Data (local cluster, one
single-threaded Runtime per worker) at that batch size, with the per-stage split (read, preprocess,
model, write) and the maps' agreement with the scenes' truth. Runs are interleaved, medians reported.

    allspark export allspark/demo/checkpoint --out build/demo --modalities rgb hsi
    allspark bench map build/demo            # -> docs/benchmarks/map.{json,md}
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..commands import at_least
from ..contract.manifest import read_manifest
from ..model.registry import spec
from .demo_scene import demo_scene_modalities, make_demo_scene
from .job import Execution, run_map
from .settings import MapSettings

BATCHES = {"tile": (4, 16, 64), "pixel": (64, 256, 1024)}
CELLS = {"tile": (48, 64), "pixel": (96, 128)}  # rows x cols of the test scene (tiles, or pixels)
BLOCK = 32  # --pixels: 12 blocks of 1024 pixels, so the steady rate has chunks to measure


def _agreement(out: Path, scene: Path, truth: np.ndarray) -> float:
    import rasterio

    with rasterio.open(out / f"{scene.stem}.classes.tif") as ds:
        classes = ds.read(1)
    valid = truth >= 0
    return float((classes[valid] == truth[valid]).mean())


def _one(build: Path, scene: Path, truth: np.ndarray, settings: MapSettings, ex: Execution, work: Path) -> dict:
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    s = run_map(build, scene, out, settings, ex)
    wall = time.perf_counter() - t
    tp = s["throughput"]
    unit = "windows" if "windows" in tp else "pixels"
    return {"units": tp[unit], "rate": tp[f"{unit}_per_s"], "steady": tp["steady_per_s"], "wall_s": wall,
            "load_s": tp["load_s"],
            "stage_s": tp["stage_s"], "agreement": _agreement(out, scene, truth)}


def _median(runs: list[dict]) -> dict:
    mid = sorted(runs, key=lambda r: r["rate"])[len(runs) // 2]
    return {**mid, "rate": statistics.median(r["rate"] for r in runs), "rates": [round(r["rate"], 1) for r in runs],
            "steady": statistics.median(r["steady"] for r in runs)}


def _settings(modality: str, unit: str, batch: int) -> MapSettings:
    return MapSettings(modality, batch=batch, pixels=BLOCK if unit == "pixel" else None)


def measure(build: Path, modality: str, repeat: int, workers: int, ray: bool, work: Path, progress: bool) -> dict:
    unit = spec(modality).raster.unit
    rows, cols = CELLS[unit]
    scene, truth = make_demo_scene(modality, work / f"{modality}.tif", build, rows, cols, seed=11)
    runs: dict[str, list[dict]] = {f"batch {b}": [] for b in BATCHES[unit]}
    for _ in range(repeat):  # interleaved: each round runs every batch size once
        for b in BATCHES[unit]:
            runs[f"batch {b}"].append(_one(build, scene, truth, _settings(modality, unit, b),
                                           Execution(progress=progress), work))
    single = {k: _median(v) for k, v in runs.items()}
    best = max(single, key=lambda k: single[k]["rate"])
    result = {"unit": "windows" if unit == "tile" else "pixels", "scene": [rows, cols], "single": single, "best": best}
    if ray:
        b = int(best.split()[1])
        r = [_one(build, scene, truth, _settings(modality, unit, b), Execution(ray="", workers=workers,
                                                                                progress=progress), work)
             for _ in range(repeat)]
        result["ray"] = _median(r)
        result["ray"]["workers"] = workers
    return result


def markdown(res: dict[str, Any]) -> str:
    lines = ["# `allspark map` throughput", "",
             (f"Build `{res['build']}` ({res['precision']}), onnxruntime, on {res['machine']['cpu']} "
             f"({res['machine']['cores']} cores), load average before {res['machine']['load_average']}. "
             f"Medians of {res['repeat']} interleaved runs per row. `rate`: units per second of prediction "
             "(excluding the one-off Runtime load; Ray's includes starting the cluster and its actors); "
             "`steady`: units per second from the first committed chunk on (no start-up at all). Stage "
             "seconds are summed over the run (over every worker for Ray). `agreement`: the map against "
             "the synthetic scene's truth."), ""]
    for m, r in res["modalities"].items():
        u = r["unit"]
        lines += [f"## {m}: {r['scene'][0]} x {r['scene'][1]} {'tiles' if u == 'windows' else 'pixels'}", "",
                  f"| run | {u}/s | runs | steady {u}/s | wall s | read s | preprocess s | model s | write s | agreement |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        rows = list(r["single"].items()) + ([(f"Ray, {r['ray']['workers']} workers, {r['best']}", r["ray"])]
                                            if "ray" in r else [])
        for name, x in rows:
            st = x["stage_s"]
            mark = " (best)" if name == r["best"] else ""
            lines.append(f"| {name}{mark} | {x['rate']:.1f} | {', '.join(map(str, x['rates']))} | {x['steady']:.1f} | "
                         f"{x['wall_s']:.1f} | "
                         f"{st['read']:.2f} | {st['preprocess']:.2f} | {st['model']:.2f} | {st['write']:.2f} | "
                         f"{x['agreement']:.3f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def add_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("build", help="a build with raster modalities (e.g. the demo checkpoint exported)")
    s.add_argument("--modalities", default="", help="comma-separated; default: every raster modality of the build")
    s.add_argument("--repeat", type=at_least(1), default=3)
    s.add_argument("--workers", type=at_least(1), default=2)
    s.add_argument("--no-ray", action="store_true")
    s.add_argument("--out", default="docs/benchmarks/map.json", help="JSON; the .md is written beside it")
    s.add_argument("--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError

    build = Path(args.build)
    manifest = read_manifest(build)
    have = [m for m in demo_scene_modalities() if m in manifest["modalities"]]
    wanted = [m for m in args.modalities.split(",") if m] or have
    if bad := [m for m in wanted if m not in have]:
        raise ConfigError(f"--modalities {bad}: this build's raster modalities with a demo scene are {have}")
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "load_average": [round(x, 2) for x in os.getloadavg()]}
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        machine["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), machine["cpu"])
    with tempfile.TemporaryDirectory(prefix="allspark-bench-map-") as tmp:
        res = {"build": str(build), "precision": manifest.get("precision"), "machine": machine, "repeat": args.repeat,
               "modalities": {m: measure(build, m, args.repeat, args.workers, not args.no_ray, Path(tmp), not args.quiet)
                              for m in wanted}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(res))
    for m, r in res["modalities"].items():
        x = r["single"][r["best"]]
        ray = f"; Ray ({args.workers} workers) {r['ray']['rate']:.1f} ({r['ray']['steady']:.1f} steady)" if "ray" in r else ""
        print(f"{m}: {x['rate']:.1f} {r['unit']}/s at {r['best']}{ray}; agreement with truth {x['agreement']:.3f}")
    print(f"wrote {out}, {out.with_suffix('.md')}")
    return 0
