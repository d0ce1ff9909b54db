"""`allspark map` (whole scenes to georeferenced maps), `allspark demo-scene` (a synthetic test
scene), and the `map` benchmark target."""

from __future__ import annotations

import argparse

from ..commands import Command, at_least, positive_float


def _bands(text: str) -> tuple[int, ...]:
    try:
        bands = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 1-based band numbers like 1,2,3, got {text!r}") from None
    if not bands or min(bands) < 1:
        raise argparse.ArgumentTypeError(f"expected 1-based band numbers like 1,2,3, got {text!r}")
    return bands


def _number(text: str) -> float:
    try:
        return float(text)  # "nan" is a valid nodata value
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number (or nan), got {text!r}") from None


def _raster_listing() -> str:
    from ..model.registry import specs

    by_unit: dict[str, list[str]] = {}
    for name, sp in specs().items():
        if sp.raster is not None:
            by_unit.setdefault(sp.raster.unit, []).append(name)
    return "; ".join(f"{unit}s: {', '.join(names)}" for unit, names in by_unit.items())


def _map_arguments(s: argparse.ArgumentParser) -> None:
    from ..runtime.backend import backend_names

    s.add_argument("build")
    s.add_argument("--modality", required=True, help=f"a raster modality of the build ({_raster_listing()})")
    s.add_argument("--input", required=True, nargs="+",
                   help="scene file(s), a directory of rasters, or a quoted glob; many scenes are one job")
    s.add_argument("--out", required=True, help="output directory (resumable: rerun the same command to continue)")
    s.add_argument("--tile", type=at_least(1), help="tile modalities: window side in px (default: the model's input size)")
    s.add_argument("--stride", type=at_least(1), help="tile modalities: step between windows in px (default: the tile)")
    s.add_argument("--pixels", type=at_least(1), help="pixel modalities: side of the block of pixels read and committed together (default 64)")
    s.add_argument("--per-pixel", action="store_true",
                   help="tile modalities: rasters on the scene's own pixels, each its covering cell's value "
                        "(default: the coarsest grid the cells fit, edge cells clipped to the scene)")
    s.add_argument("--batch", type=at_least(1),
                   help="tiles per model call and per commit (default 64); pixel modalities: pixels per model call "
                        "(default 256; each is one LLM pass, so it sets the peak memory: ~610 MB for the demo's HSI, "
                        "~430 MB at 32)")
    s.add_argument("--bands", type=_bands, help="1-based bands to read, in the model's order (e.g. 4,3,2)")
    s.add_argument("--nodata", type=_number, help="the value marking missing data (default: the scene's own)")
    s.add_argument("--scale", type=positive_float, default=1.0, help="multiply values read by this (e.g. 0.0001)")
    s.add_argument("--backend", choices=backend_names(), default="onnxruntime")
    s.add_argument("--threads", type=at_least(0), default=0, help="onnxruntime intra-op threads (0: its default)")
    s.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run on Ray Data: a local cluster, or the cluster at ADDRESS")
    s.add_argument("--workers", type=at_least(1), default=2, help="Ray actors, one Runtime each (default 2)")
    s.add_argument("--overwrite", action="store_true", help="replace a run in --out made with other settings")
    s.add_argument("--quiet", action="store_true", help="no progress bar")


def cmd_map(args: argparse.Namespace) -> int:
    from .job import Execution, run_map
    from .settings import MapSettings

    settings = MapSettings(args.modality, args.tile, args.stride, args.pixels, args.batch, args.bands, args.nodata,
                           args.scale, args.per_pixel)
    ex = Execution(args.backend, args.threads, args.ray, args.workers, not args.quiet)
    summary = run_map(args.build, args.input, args.out, settings, ex, args.overwrite)
    for sc in summary["scenes"]:
        print(f"{sc['id']}: {sc['width']} x {sc['height']} px, {sc['crs'] or 'no CRS'}; {sc['predicted']} predicted, "
              f"{sc['nodata']} nodata, {sc['failed']} failed; " + class_counts(sc["counts"]))
    t = summary["throughput"]
    rate = next((v for k, v in t.items() if k.endswith("_per_s")), None)
    unit = "windows" if "windows" in t else "pixels"
    print(f"{t.get(unit, 0)} {unit} in {t['seconds']} s" + (f" ({rate} {unit}/s)" if rate else "")
          + (" (resumed)" if t["resumed"] else "") + f"; outputs and summary.json in {args.out}")
    return 0


def class_counts(counts: dict[str, int], shown: int = 4) -> str:
    """The most frequent classes and their counts; "…" says how many cells the cut classes hold, so
    the printed counts are never mistaken for all of them."""
    ranked = [(k, v) for k, v in sorted(counts.items(), key=lambda kv: -kv[1]) if v]
    text = ", ".join(f"{k} {v}" for k, v in ranked[:shown])
    rest = ranked[shown:]
    if rest:
        text += f", … ({sum(v for _, v in rest)} more in {len(rest)} other class{'es' if len(rest) > 1 else ''})"
    return text


def _scene_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("modality", help=f"a raster modality with a demo scene ({_raster_listing()})")
    s.add_argument("out", help="the GeoTIFF (COG) to write")
    s.add_argument("--build", help="take the model's sizes and labels from this build (default: the demo preset)")
    s.add_argument("--rows", type=at_least(1), help="cells down (tiles or pixels; default 12 tiles, 96 pixels)")
    s.add_argument("--cols", type=at_least(1), help="cells across (default 16 tiles, 128 pixels)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-crs", action="store_true", help="write it without georeferencing")


def cmd_scene(args: argparse.Namespace) -> int:
    from .demo_scene import make_demo_scene

    path, truth = make_demo_scene(args.modality, args.out, args.build, args.rows, args.cols, args.seed, not args.no_crs)
    valid = truth[truth >= 0]
    print(f"wrote {path}: {truth.shape[0]} x {truth.shape[1]} cells, {valid.size} with data, "
          f"{len(set(valid.tolist()))} classes (truth in {path.with_suffix('.truth.npy').name})")
    return 0


COMMANDS = (
    Command("map", "whole scenes (GeoTIFF/COG) to georeferenced class maps, resumable, optionally on Ray",
            _map_arguments, cmd_map),
    Command("demo-scene", "write a synthetic georeferenced test scene of the demo's classes", _scene_arguments,
            cmd_scene),
)

BENCH_TARGETS = (
    Command("map", "allspark map throughput: tiles/s and pixels/s, single process and Ray, per-stage split",
            "allspark.mapping.bench:add_arguments", "allspark.mapping.bench:run"),
)
