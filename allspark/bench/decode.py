"""`allspark bench decode`: one decode step of the LLM (every adapter set in the graph) at a preset's
size, each way the runtime can run it, side by side in one process.

    torch-host        the torch backend, cache as host arrays through `decode` (the CPU path)
    torch-static      device-resident static cache, eager
    torch-compile     the same step through torch.compile
    torch-graphs      the same step as one CUDA graph replay (CUDA only)
    torch-compile-graphs  the compiled step (fused elementwise kernels) captured as one CUDA graph
                      (CUDA only; not in the default set: it compiles for minutes at paper size)
    onnxruntime-host  the exported decoder, cache copied to the host and back every step
    onnxruntime-device  the exported decoder on device tensors (IO binding, cache stays on device)
    onnxruntime-static  the static-cache decoder on device tensors: buffers allocated once, read in
                      place, only the new keys/values written (export --static-cache)

The model is the preset's LLM with one adapter set (the first text modality) and seeded random
weights (decode cost does not depend on the values) and a cache of `--context` random positions per row; each way takes `--warmup` steps, then
`--steps` timed ones (median reported), growing the cache as generation does. Also reported: bytes
a step must read (weights + cache) over its median time, against the device's measured copy
bandwidth. The ONNX graphs are exported into a temporary directory with the build's exporter.

    allspark bench decode --presets demo base --batch 1 8 --context 256 --device cuda --out ...
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..commands import at_least
from ..contract import tensors as C
from ..errors import ConfigError

WAYS = ("torch-host", "torch-static", "torch-compile", "torch-graphs", "torch-compile-graphs", "onnxruntime-host",
        "onnxruntime-device", "onnxruntime-static")
CUDA_ONLY = ("torch-graphs", "torch-compile-graphs")
DEFAULT_SKIP = ("torch-compile-graphs",)  # minutes of compilation at paper size: asked for by name


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--presets", nargs="+", default=["demo"])
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--context", type=at_least(1), default=256, help="cached positions per row before timing")
    ap.add_argument("--steps", type=at_least(1), default=32, help="timed decode steps per way (median reported)")
    ap.add_argument("--warmup", type=at_least(0), default=3)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--ways", nargs="+", default=None, help=f"some of {list(WAYS)} (default: all the device runs)")
    ap.add_argument("--onnx", action="append", default=[], metavar="PRESET=DIR",
                    help="graphs exported elsewhere for a preset (embed_tokens.onnx, decoder.onnx, and "
                         "decoder_static.onnx for onnxruntime-static; skeletons from "
                         "`allspark.bench.skeleton` get seeded weights): where this machine cannot export")
    ap.add_argument("--out", default="docs/benchmarks/decode.json")
    ap.add_argument("--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:
    onnx_dirs = {}
    for item in args.onnx:
        preset, sep, d = item.partition("=")
        if not sep or not Path(d).is_dir():
            raise ConfigError(f"--onnx: expected PRESET=DIR with an existing DIR, got {item!r}")
        onnx_dirs[preset] = Path(d)
    result = run_decode_bench(args.presets, args.batch, args.context, args.steps, args.warmup, args.device,
                              tuple(args.ways) if args.ways else None, progress=not args.quiet, onnx_dirs=onnx_dirs)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result))
    print(f"wrote {out}")
    return 0


def _manifest(model: Any) -> dict:
    """What the torch backend reads of a build's manifest: the decoder's cache names and each
    modality's components (no files: the backend runs `model` itself)."""
    L = model.config.llm.num_layers
    static = {C.STATIC_CACHE.name: {"cache": {"past": C.past_names(L), "new": C.new_names(L)}}}
    packs = {C.component_name(kind, m): {"modality": m} for m in model.modalities
             for kind in ("encoder", "bridge", "head")}
    return {"components": {C.DECODER_COMPONENT: {"cache": {"past": C.past_names(L), "present": C.present_names(L)},
                                                 "artifacts": static},
                           C.EMBED_COMPONENT: {}, **packs}}


def copy_bandwidth_gbs(device: str) -> float:
    """Device-to-device copy of 512 MB, bytes read + written per second (the practical peak)."""
    import torch

    n = 1 << 27  # float32 elements: 512 MB
    a = torch.empty(n, device=device)
    b = torch.empty_like(a)
    times = []
    for _ in range(5):
        _sync(device)
        t0 = time.perf_counter()
        b.copy_(a)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return round(2 * a.numel() * 4 / min(times) / 1e9, 1)


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _export(model: Any, tmp: Path, static: bool = True) -> dict[str, Any]:
    from ..export.onnx_export import export_component
    from ..export.specs import decoder_spec, embed_spec
    from ..export.static_cache import static_cache_spec

    paths = {}
    for spec in (embed_spec(model), decoder_spec(model), *([static_cache_spec(model)] if static else [])):
        paths[spec.name] = tmp / f"{spec.name}.onnx"
        export_component(spec, paths[spec.name])
    return paths


def _given(src: Path, tmp: Path) -> dict[str, Path]:
    """Graphs exported elsewhere; skeletons get seeded weights (timing only)."""
    from .skeleton import fill, is_skeleton

    paths = {}
    for name in (C.EMBED_COMPONENT, C.DECODER_COMPONENT, C.STATIC_DECODER):
        p = src / f"{name}.onnx"
        if name == C.STATIC_DECODER and not p.is_file():
            continue  # onnxruntime-static then reports its own error
        if not p.is_file():
            raise ConfigError(f"--onnx {src}: no {p.name}")
        paths[name] = fill(p, tmp / p.name) if is_skeleton(p) else p
    return paths


def _ort_backend(model: Any, paths: dict, device: str, way: str) -> Any:
    from ..onnxrt import session
    from ..runtime.onnxruntime_backend import OrtBackend

    providers = ["cuda"] if device == "cuda" else ["cpu"]
    static = way == "onnxruntime-static"
    if static and C.STATIC_DECODER not in paths:
        raise ConfigError("onnxruntime-static: no decoder_static.onnx among the graphs")
    wanted = (C.EMBED_COMPONENT, C.STATIC_DECODER if static else C.DECODER_COMPONENT)
    sessions = {n: session(paths[n], providers=providers) for n in wanted}
    return OrtBackend(paths[C.DECODER_COMPONENT].parent, _manifest(model), sessions,
                      device_resident=way != "onnxruntime-host")


def _stepper(way: str, model: Any, B: int, P: int, max_len: int, device: str, paths: dict | None,
             dtype: str = "float32", adapter_ids: np.ndarray | None = None) -> Any:
    import torch

    from ..runtime.decoding import host_state
    from ..runtime.torch_backend import TorchBackend

    llm = model.config.llm
    at = "cpu" if way.endswith("-host") else device  # a device cache is made there: a host one of 64 rows is GBs
    g = torch.Generator(at).manual_seed(B * 1000 + P)
    past = [torch.randn(B, llm.num_kv_heads, P, llm.head_dim, generator=g, device=at) * 0.5
            for _ in C.past_names(llm.num_layers)]
    mask = np.ones((B, P), np.int64)
    pos = np.full((B, 1), P - 1, np.int64)
    ids = np.arange(B, dtype=np.int64) % model.adapters[0].down_weight.shape[0] if adapter_ids is None else adapter_ids
    names = C.past_names(llm.num_layers)
    if way.startswith("torch"):
        be = TorchBackend(_manifest(model), model, device=device, compile="compile" in way, dtype=dtype,
                          cuda_graphs=way.endswith("-graphs"), device_resident=way != "torch-host")
    else:
        be = _ort_backend(model, paths, device, way)
    if way.endswith("-host"):
        return host_state(be, names, [p.numpy() for p in past], mask, pos, ids)
    dev = [p.to(device, getattr(be, "dtype", torch.float32)) for p in past]
    return be.start_generation(dev, np.arange(B), mask, pos, ids, max_len)


def _time_way(way: str, model: Any, B: int, P: int, steps: int, warmup: int, device: str, paths: dict | None,
              dtype: str = "float32", adapter_ids: np.ndarray | None = None) -> dict:
    from ..runtime.decoding import rounded_max_len

    limit = model.config.llm.max_position_embeddings
    max_len = rounded_max_len(P + warmup + steps + 1, limit)
    if max_len is None:
        raise ConfigError(f"--context {P} + {warmup + steps} steps: more than the model's {limit} positions")
    stepper = _stepper(way, model, B, P, max_len, device, paths, dtype, adapter_ids)
    rng = np.random.default_rng(0)
    vocab = model.config.llm.vocab_size
    times = []
    try:
        for i in range(warmup + steps):
            tokens = rng.integers(0, vocab, B)
            _sync(device)
            t0 = time.perf_counter()
            logits = stepper.step(tokens, None)  # host logits: the step is complete
            dt = time.perf_counter() - t0
            if i >= warmup:
                times.append(dt)
        finite = bool(np.isfinite(logits).all())
    finally:
        stepper.close()
    med = statistics.median(times)
    p90 = sorted(times)[math.ceil(0.9 * len(times)) - 1]  # nearest rank: of 2 steps, the slower
    return {"median_ms": round(1e3 * med, 3), "p90_ms": round(1e3 * p90, 3),
            "tokens_per_s": round(B / med, 1), "finite": finite}


def run_decode_bench(presets: list[str], batches: list[int], context: int, steps: int, warmup: int, device: str,
                     ways: tuple[str, ...] | None = None, progress: bool = True,
                     onnx_dirs: dict[str, Path] | None = None) -> dict:
    import torch

    from ..bench.machine import machine_info
    from ..model.factory import build_model
    from ..model.skeleton import params_on_meta

    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("bench decode: --device cuda, but this torch sees no CUDA GPU")
    ways = ways or tuple(w for w in WAYS if (device == "cuda" or w not in CUDA_ONLY) and w not in DEFAULT_SKIP)
    unknown = set(ways) - set(WAYS)
    if unknown:
        raise ConfigError(f"bench decode: unknown ways {sorted(unknown)}; expected some of {list(WAYS)}")
    result: dict[str, Any] = {"kind": "allspark-bench-decode", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                              "device": device, "context": context, "steps": steps, "warmup": warmup,
                              "machine": machine_info(), "copy_bandwidth_gbs": copy_bandwidth_gbs(device),
                              "presets": {}}
    for preset in presets:
        t0 = time.perf_counter()
        # graphs given and only onnxruntime ways: the torch model is shapes and config alone (paper size
        # in fp32 is 27 GB of host memory, and a minute to initialise, that nothing would read)
        shapes_only = bool((onnx_dirs or {}).get(preset)) and all(w.startswith("onnxruntime") for w in ways)
        with params_on_meta() if shapes_only else contextlib.nullcontext():
            model = build_model(preset, modalities=(_text_modality(),)).eval()
        entry: dict[str, Any] = {"build_seconds": round(time.perf_counter() - t0, 1)}
        params = sum(p.numel() for p in model.llm.parameters()) + sum(p.numel() for p in model.adapters.parameters())
        llm = model.config.llm
        entry["decoder_parameters"] = params
        with tempfile.TemporaryDirectory() as tmp:
            paths = None
            if any(w.startswith("onnxruntime") for w in ways):
                t0 = time.perf_counter()
                try:
                    given = (onnx_dirs or {}).get(preset)
                    paths = (_given(given, Path(tmp)) if given
                             else _export(model, Path(tmp), static="onnxruntime-static" in ways))
                    entry["graphs"] = f"given: {given}" if given else "exported here"
                    if given:  # their weights as stored (an int4 graph reads a quarter of fp32's bytes and less)
                        from .skeleton import weight_bytes

                        entry["given_decoder_weight_bytes"] = weight_bytes(paths[C.DECODER_COMPONENT])
                    entry["export_seconds"] = round(time.perf_counter() - t0, 1)
                except Exception as e:  # reported, the torch ways still run
                    entry["export_error"] = f"{type(e).__name__}: {e}"[:500]
            for B in batches:
                row: dict[str, Any] = {}
                kv_bytes = 2 * llm.num_layers * B * llm.num_kv_heads * (context + warmup + steps // 2) * llm.head_dim * 4
                for way in ways:
                    if way.startswith("onnxruntime") and paths is None:
                        continue
                    if progress:
                        print(f"[bench decode] {preset} b={B} {way}", flush=True)
                    try:
                        r = _time_way(way, model, B, context, steps, warmup, device, paths)
                        weights = entry.get("given_decoder_weight_bytes", params * 4) if way.startswith("onnx") else params * 4
                        gbs = (weights + kv_bytes) / (r["median_ms"] * 1e-3) / 1e9
                        r["achieved_gbs"] = round(gbs, 1)
                        r["fraction_of_copy_bandwidth"] = round(gbs / result["copy_bandwidth_gbs"], 3)
                    except Exception as e:  # one way failing does not stop the others
                        r = {"error": f"{type(e).__name__}: {e}"[:500]}
                    row[way] = r
                    if device == "cuda":
                        torch.cuda.empty_cache()
                row["ratios"] = _ratios(row)
                entry[str(B)] = row
        result["presets"][preset] = entry
        del model
    return result


def _text_modality() -> str:
    """The first registered modality that generates text: the LLM with one adapter set, no encoder."""
    from ..model.registry import modality_names, spec

    return next(m for m in modality_names() if spec(m).head.generates and not spec(m).has_encoder)


def _ratios(row: dict) -> dict:
    def med(w: str) -> float | None:
        return row.get(w, {}).get("median_ms")

    pairs = {"graphs_vs_static_eager": ("torch-static", "torch-graphs"),
             "graphs_vs_host_eager": ("torch-host", "torch-graphs"),
             "compile_vs_static_eager": ("torch-static", "torch-compile"),
             "compiled_graphs_vs_graphs": ("torch-graphs", "torch-compile-graphs"),
             "ort_device_vs_host": ("onnxruntime-host", "onnxruntime-device"),
             "ort_static_vs_host": ("onnxruntime-host", "onnxruntime-static"),
             "ort_static_vs_device": ("onnxruntime-device", "onnxruntime-static")}
    return {k: round(med(a) / med(b), 2) for k, (a, b) in pairs.items() if med(a) and med(b)}


def format_table(result: dict) -> str:
    lines = [f"decode step, {result['device']}, context {result['context']} (median ms | tokens/s)"]
    for preset, entry in result["presets"].items():
        for b, row in entry.items():
            if not isinstance(row, dict) or "ratios" not in row:
                continue
            cells = [f"{w} {r['median_ms']} | {r['tokens_per_s']}" if "median_ms" in r else f"{w} ERROR"
                     for w, r in row.items() if w != "ratios"]
            lines.append(f"  {preset} b={b}: " + "; ".join(cells) + f"  ratios {row['ratios']}")
    return "\n".join(lines)
