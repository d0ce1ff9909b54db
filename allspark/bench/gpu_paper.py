"""`python -m allspark.bench.gpu_paper`: the paper-size AllSpark on one GPU, weights made there.

A 14 B-parameter checkpoint cannot travel to a lent GPU (a transfer carries 64 MiB), and decode and
encoder cost do not depend on weight values, so the whole model (every modality's pack and adapter
set) is built on the device from seeds, then cast to each dtype measured. Never use it for answers.

    decode     one decode step at batch 1 (context `--context`), the device-resident static cache,
               eager and as one CUDA graph replay, per dtype: ms/token and the bytes a step must read
               (the decoder's weights without the embedding table, one adapter set, the cache) over
               that time, against the device's measured copy bandwidth and its HBM datasheet figure
    mixed      a 64-row batch whose rows use all ten adapter sets against 64 rows of one set: a
               decode step (eager: segmented adapters; graphs: the capturable segmented path) and a
               prefill of `--prefill` tokens per row
    rgb        one RGB request end to end in process (EVA-g at its 420 px -> bridge -> 7B prefill ->
               head): the reference `AllSpark.forward`, and the torch backend's device stages eager
               and as CUDA graphs (answers compared with the reference); EVA-g and the bridge alone;
               p50/p90 over `--repeat` runs
    decode_profile  torch.profiler over batch-1 decode graph replays: device time per kernel name

Each section's failure is recorded in its place; the others still run. `--dry-run` runs the same
code on a small preset on the CPU (eager ways only): a rehearsal of the GPU run, not a measurement.

    python -m allspark.bench.gpu_paper --out docs/benchmarks/gpu/<device>/paper.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .decode import _manifest, _sync, _time_way, copy_bandwidth_gbs

# Vendor datasheet HBM bandwidth (TB/s): the targets are fractions of it.
HBM_TBS = {"H100": 3.35, "H200": 4.8}
REQUEST = "rgb"  # the one request end to end: EVA-g at 420 px; also its section's name in the JSON
TARGETS = {  # the (H100, H200) goals
    "decode_fraction_of_hbm": 0.85,
    "rgb_p50_ms": 15.0,
    "mixed_vs_single": 1.4,
}


def _hbm_tbs(name: str) -> float | None:
    return next((v for k, v in HBM_TBS.items() if k in name), None)


def _timed(fn: Callable[[], Any], device: str, repeat: int, warmup: int = 2) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"p50_ms": round(1e3 * statistics.median(times), 3),
            "p90_ms": round(1e3 * times[int(0.9 * (len(times) - 1))], 3), "runs": repeat}


def _section(result: dict, name: str, fn: Callable[[], Any], progress: bool, out: Path | None = None) -> None:
    """`result[name] = fn()`, its failure recorded instead; the whole result rewritten to `out` after
    (a stage cut at its time box keeps what it measured)."""
    if progress:
        print(f"[gpu-paper] {name}", flush=True)
    t0 = time.perf_counter()
    try:
        result[name] = fn()
    except Exception as e:  # recorded; the other sections still run
        result[name] = {"error": f"{type(e).__name__}: {e}"[:800]}
    if isinstance(result[name], dict):
        result[name]["seconds"] = round(time.perf_counter() - t0, 1)
    if progress:
        print(f"[gpu-paper] {name}: {json.dumps(result[name])[:400]}", flush=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")


def build_on_device(preset: str, device: str) -> Any:
    """Every modality of `preset`, its parameters initialised on `device` (seeded; fp32 first)."""
    import torch

    from ..model.factory import build_model

    with torch.device(device):
        return build_model(preset).eval()


def decode_bytes(model: Any, B: int, P: int, itemsize: int) -> int:
    """Bytes one decode step must read: every LLM weight except the embedding table (a step reads B
    rows of it), one adapter set, and the cache of B rows at P positions."""
    llm = model.config.llm
    weights = sum(p.numel() for p in model.llm.parameters()) - model.llm.get_input_embeddings().weight.numel()
    adapters = sum(p.numel() for p in model.adapters.parameters()) // len(model.modalities)
    kv = 2 * llm.num_layers * B * llm.num_kv_heads * P * llm.head_dim
    return (weights + adapters + kv) * itemsize


def decode_section(model: Any, device: str, dtypes: list[str], ways: list[str], context: int, steps: int,
                   warmup: int, bandwidth: dict) -> dict:
    import torch

    out: dict[str, Any] = {"context": context, "batch": 1, "steps": steps}
    for dt in dtypes:
        item = torch.empty((), dtype=getattr(torch, dt)).element_size()
        nbytes = decode_bytes(model, 1, context + warmup + steps // 2, item)
        row: dict[str, Any] = {"bytes_per_step": nbytes}
        for way in ways:
            try:
                r = _time_way(way, model, 1, context, steps, warmup, device, None, dtype=dt)
                tbs = nbytes / (r["median_ms"] * 1e-3) / 1e12
                r["achieved_tbs"] = round(tbs, 3)
                if bandwidth.get("copy_tbs"):
                    r["fraction_of_copy"] = round(tbs / bandwidth["copy_tbs"], 3)
                if bandwidth.get("hbm_datasheet_tbs"):
                    r["fraction_of_hbm"] = round(tbs / bandwidth["hbm_datasheet_tbs"], 3)
            except Exception as e:  # one way failing does not stop the others
                r = {"error": f"{type(e).__name__}: {e}"[:800]}
            row[way] = r
            if device == "cuda":
                torch.cuda.empty_cache()
        out[dt] = row
    return out


def mixed_section(model: Any, device: str, dtype: str, ways: list[str], rows: int, context: int, steps: int,
                  warmup: int, prefill: int, repeat: int) -> dict:
    """`rows` rows over every adapter set against `rows` rows of set 0: decode steps and a prefill."""
    import torch

    from ..model.model import Batch

    n_sets = len(model.modalities)
    ids = {"mixed": np.arange(rows, dtype=np.int64) % n_sets, "single": np.zeros(rows, np.int64)}
    out: dict[str, Any] = {"rows": rows, "adapter_sets": n_sets, "dtype": dtype, "context": context}
    model.to(getattr(torch, dtype))
    for way in ways:
        r: dict[str, Any] = {}
        for kind, a in ids.items():
            try:
                r[kind] = _time_way(way, model, rows, context, steps, warmup, device, None, dtype=dtype, adapter_ids=a)
            except Exception as e:
                r[kind] = {"error": f"{type(e).__name__}: {e}"[:800]}
        if "median_ms" in r["mixed"] and "median_ms" in r["single"]:
            r["mixed_vs_single"] = round(r["mixed"]["median_ms"] / r["single"]["median_ms"], 3)
        out[f"decode {way}"] = r
        if device == "cuda":
            torch.cuda.empty_cache()
    H = model.config.llm.hidden_size
    g = torch.Generator(device).manual_seed(1)
    x = torch.randn(rows, prefill, H, generator=g, device=device).to(getattr(torch, dtype))
    mask = torch.ones(rows, prefill, dtype=torch.int64, device=device)
    pos = torch.arange(prefill, device=device).expand(rows, prefill)
    r = {}
    with torch.no_grad():
        for kind, a in ids.items():
            b = Batch(x, mask, pos, torch.from_numpy(a).to(device))
            r[kind] = _timed(lambda: model.decode(b), device, repeat)
    r["mixed_vs_single"] = round(r["mixed"]["p50_ms"] / r["single"]["p50_ms"], 3)
    out[f"prefill {prefill} tokens"] = r
    return out


def _backend_request(be: Any, model: Any, row: Any) -> Callable[[], Any]:
    """One head-modality row through the torch backend's device stages, as `Runtime.prefill` and
    its head step call them (the Runtime itself needs a build directory)."""
    import torch

    from ..contract import tensors as C
    from ..model.pipeline import stack

    m = row.modality
    enc, brg, head = (C.component_name(k, m) for k in ("encoder", "bridge", "head"))
    inputs = stack([row])
    ids = np.asarray([row.prompt_ids], np.int64)
    past = {n: np.zeros((1, *be._kv[:1], 0, be._kv[1]), np.float32) for n in be.cache.past}
    adapter = np.asarray([model.adapter_index(m)], np.int64)

    def request():
        media = be.encode_on_device(enc, inputs)
        tokens = be.bridge_on_device(brg, media)
        emb = torch.cat([tokens, be.embed_on_device(ids)], dim=1)
        T = emb.shape[1]
        feed = {C.INPUTS_EMBEDS: emb, C.ATTENTION_MASK: np.ones((1, T), np.int64),
                C.POSITION_IDS: np.arange(T, dtype=np.int64)[None], C.ADAPTER_IDS: adapter, **past}
        out = be.prefill_on_device(feed)
        return be.head(head, np.ascontiguousarray(out.hidden[:, -1]))

    return request


def rgb_section(model: Any, device: str, dtype: str, repeat: int) -> dict:
    """One RGB request: the reference forward (encoder, bridge, prefill, head), EVA alone, and the
    torch backend's path eager and (CUDA) with its stages as graphs; answers compared."""
    import torch

    from ..model.registry import random_inputs
    from ..runtime.torch_backend import TorchBackend

    model.to(getattr(torch, dtype))
    mc = model.config.modality(REQUEST)
    row = model.prepare(REQUEST, random_inputs(mc, np.random.default_rng(0)), None)
    tensors = model.tensors([row])
    pack = model.pack(REQUEST)
    out: dict[str, Any] = {"image_size": mc.encoder.image_size, "prompt_tokens": len(row.prompt_ids), "dtype": dtype,
                           "includes": "host preprocessing excluded (the request's arrays are prepared once)"}
    with torch.no_grad():
        out["encoder"] = _timed(lambda: pack.encoder(**tensors), device, repeat)
        media = pack.encoder(**tensors)
        out["encoder_tokens"] = int(media.shape[1])
        out["bridge"] = _timed(lambda: pack.bridge(media), device, repeat)
        out["reference_forward"] = _timed(lambda: model.forward([row]), device, repeat)
        want = model.forward([row])[0].float().cpu().numpy()
    for graphs in ((False, True) if device == "cuda" else (False,)):
        be = TorchBackend(_manifest(model), model, device=device, dtype=dtype, cuda_graphs=graphs)
        request = _backend_request(be, model, row)
        t0 = time.perf_counter()
        request()  # eager: a signature is captured the second time it is seen (in `_timed`'s warm-up)
        r = {"first_call_ms": round(1e3 * (time.perf_counter() - t0), 1), **_timed(request, device, repeat)}
        got = request()  # the answer of the path timed (graph replays, where captured)
        r |= {"max_abs_diff_vs_reference": float(np.abs(np.asarray(got, np.float32)[0] - want).max()),
              "same_label_as_reference": bool(np.argmax(got[0]) == np.argmax(want))}
        if be.stages is not None:
            r["graphs_kept"], r["capture_failures"] = len(be.stages), {str(k[0]): v for k, v in be.stages.failures.items()}
        out["backend_graphs" if graphs else "backend_eager"] = r
    out["end_to_end"] = out.get("backend_graphs", out["backend_eager"])
    return out


def decode_profile(model: Any, device: str, dtype: str, context: int, steps: int = 20) -> dict:
    """Where a batch-1 decode step's device time goes: CUDA graph replays under torch.profiler,
    kernels grouped by name (top 15 by total time)."""
    import torch

    from ..runtime.decoding import rounded_max_len
    from .decode import _stepper

    max_len = rounded_max_len(context + 64, model.config.llm.max_position_embeddings)
    stepper = _stepper("torch-graphs", model, 1, context, max_len, device, None, dtype)
    rng = np.random.default_rng(0)
    try:
        for _ in range(3):
            stepper.step(rng.integers(0, model.config.llm.vocab_size, 1), None)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                stepper.step(rng.integers(0, model.config.llm.vocab_size, 1), None)
            torch.cuda.synchronize()
    finally:
        stepper.close()
    rows = [(e.key, e.device_time_total, e.count) for e in prof.key_averages()]
    total = sum(t for _, t, _ in rows)
    rows.sort(key=lambda r: -r[1])
    return {"steps": steps, "device_ms_per_step": round(total / steps / 1e3, 3),
            "kernels_per_step": round(sum(c for _, _, c in rows) / steps, 1),
            "top": [{"kernel": k[:120], "ms_per_step": round(t / steps / 1e3, 4), "calls_per_step": round(c / steps, 1),
                     "share": round(t / total, 3)} for k, t, c in rows[:15]]}


def targets(result: dict) -> dict:
    out: dict[str, Any] = {}
    fr = [(dt, w, r["fraction_of_hbm"], r["median_ms"]) for sec in ("decode", "decode_compiled")
          for dt, row in result.get(sec, {}).items() if isinstance(row, dict)
          for w, r in row.items() if isinstance(r, dict) and "fraction_of_hbm" in r]
    if fr:
        dt, w, f, ms = max(fr, key=lambda t: t[2])
        out["decode_fraction_of_hbm"] = {"goal": f">= {TARGETS['decode_fraction_of_hbm']}", "measured": f,
                                         "ms_per_token": ms, "by": f"{dt} {w}",
                                         "met": f >= TARGETS["decode_fraction_of_hbm"]}
    rgb = result.get(REQUEST, {}).get("end_to_end", {})
    if "p50_ms" in rgb:
        out["rgb_p50_ms"] = {"goal": f"<= {TARGETS['rgb_p50_ms']}", "measured": rgb["p50_ms"],
                             "met": rgb["p50_ms"] <= TARGETS["rgb_p50_ms"]}
    mixed = result.get("mixed", {})
    ratios = {k: v["mixed_vs_single"] for k, v in mixed.items() if isinstance(v, dict) and "mixed_vs_single" in v}
    if ratios:
        worst = max(ratios, key=ratios.get)
        out["mixed_vs_single"] = {"goal": f"<= {TARGETS['mixed_vs_single']}", "measured": ratios, "worst": worst,
                                  "met": ratios[worst] <= TARGETS["mixed_vs_single"]}
    return out


def run(preset: str, device: str, dtypes: list[str], ways: list[str], context: int, steps: int, warmup: int,
        rows: int, prefill: int, repeat: int, progress: bool = True, out: Path | None = None,
        compiled: bool = False) -> dict:
    import torch

    from .machine import machine_info

    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    result: dict[str, Any] = {"kind": "allspark-bench-gpu-paper", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                              "preset": preset, "device": device, "device_name": name, "machine": machine_info(),
                              "weights": "seeded noise made on the device (timing only)"}
    copy = copy_bandwidth_gbs(device) / 1e3
    result["bandwidth"] = {"copy_tbs": round(copy, 3), "hbm_datasheet_tbs": _hbm_tbs(name)}
    t0 = time.perf_counter()
    model = build_on_device(preset, device)
    result["build"] = {"seconds": round(time.perf_counter() - t0, 1), "modalities": list(model.modalities),
                       "parameters": sum(p.numel() for p in model.parameters()),
                       "llm_parameters": sum(p.numel() for p in model.llm.parameters())}
    if progress:
        print(f"[gpu-paper] built {preset}: {result['build']}", flush=True)
    lead = dtypes[0]
    _section(result, REQUEST, lambda: rgb_section(model, device, lead, repeat), progress, out)
    _section(result, "decode", lambda: decode_section(model, device, dtypes, ways, context, steps, warmup,
                                                      result["bandwidth"]), progress, out)
    _section(result, "mixed", lambda: mixed_section(model, device, lead, ways, rows, context, steps, warmup,
                                                    prefill, repeat), progress, out)
    if device == "cuda":
        _section(result, "decode_profile", lambda: decode_profile(model, device, lead, context), progress, out)
    if compiled:  # last: it compiles for minutes, and the stage's time box may cut it
        _section(result, "decode_compiled", lambda: decode_section(
            model, device, [lead], ["torch-compile-graphs"], context, steps, warmup, result["bandwidth"]), progress, out)
    result["targets"] = (targets(result) if device == "cuda" and preset == "paper"
                         else "not evaluated: a rehearsal, not the paper size on a GPU")
    if out is not None:
        out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"])
    ap.add_argument("--ways", nargs="+", default=["torch-static", "torch-graphs"])
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rows", type=int, default=64, help="rows of the mixed and single-set batches")
    ap.add_argument("--prefill", type=int, default=64, help="tokens per row of the prefill comparison")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--compiled", action="store_true", help="also torch.compile + CUDA graphs at batch 1 (last; "
                    "minutes of compilation)")
    ap.add_argument("--dry-run", action="store_true", help="the tiny preset on the CPU, eager ways")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    out = Path(a.out)
    if a.dry_run:
        res = run("tiny", "cpu", ["bfloat16", "float32"], ["torch-static"], 16, 3, 1, 12, 8, 3, out=out)
    else:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("gpu_paper: this torch sees no CUDA GPU (use --dry-run to rehearse on the CPU)")
        res = run(a.preset, "cuda", a.dtypes, a.ways, a.context, a.steps, a.warmup, a.rows, a.prefill, a.repeat,
                  out=out, compiled=a.compiled)
    print(json.dumps(res.get("targets"), indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
