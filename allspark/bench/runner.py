"""The benchmark: every backend side by side in one process, repetitions interleaved.

For each modality and batch size, each repetition runs every backend once (in an order rotated per
repetition, so none always runs warm after another); medians and p90 come from those samples.
Measured: per-stage and end-to-end latency, throughput, process memory, decoder time-to-first-token
and tokens/s with the KV cache, export time and size, and achieved GFLOP/s per stage against a
matmul peak measured in the same run.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..contract.manifest import component_bytes, read_manifest
from ..errors import ConfigError
from ..model.registry import random_inputs, spec
from ..runtime import GenerationConfig, Request, Runtime
from ..runtime.backend import GPU_VARIANT, backends
from .machine import machine_info, matmul_peak_gflops, rss_mb, summarize

STAGES = ("preprocess", "encoder", "bridge", "embed", "decoder", "head", "generate", "total")
NOFUSE = "-nofuse"  # a variant on the same graphs exported with unfused attention
# variants on a sibling build of the same checkpoint, exported with other options (next to the build)
SIBLINGS: dict[str, dict[str, Any]] = {NOFUSE: {"fuse": False}, "-int8": {"precision": "int8"}, "-int4": {"precision": "int4"}}


@dataclass(frozen=True)
class Variant:
    backend: str
    options: dict[str, Any]
    sibling: str = ""  # a key of SIBLINGS: runs that sibling build


def variants() -> dict[str, Variant]:
    """Every benchmarkable variant: each registered backend, the variants it declares, and a twin
    per sibling build (`-nofuse`, `-int8`) of each backend that runs exported graphs."""
    out: dict[str, Variant] = {}
    for name, b in backends().items():
        out[name] = Variant(name, {})
        out.update({label: Variant(name, dict(opts)) for label, opts in b.variants.items()})
        if b.artifact == "onnx":  # the siblings are other ONNX exports of the same checkpoint
            out.update({name + suffix: Variant(name, {}, sibling=suffix) for suffix in SIBLINGS})
    return out


def default_backends() -> tuple[str, ...]:
    """Every variant but the GPU ones (`make gpu-check` names those)."""
    known = backends()
    return tuple(n for n, v in variants().items() if GPU_VARIANT not in n and not known[v.backend].gpu_only)


@dataclass(frozen=True)
class BenchConfig:
    backends: tuple[str, ...] = ("torch", "torch-compile", "onnxruntime", "onnxruntime-nofuse")
    modalities: tuple[str, ...] = ()  # () = every modality of the build
    batches: tuple[int, ...] = (1, 8, 32)
    repeat: int = 10
    warmup: int = 2
    gen_tokens: int = 8  # new tokens per text request in the end-to-end runs
    decode_tokens: int = 32  # tokens for time-to-first-token and tokens/s
    threads: int = 0

    def __post_init__(self) -> None:
        unknown = set(self.backends) - set(variants())
        if unknown:
            raise ConfigError(f"backends: unknown {sorted(unknown)}; expected some of {list(variants())}")
        if self.repeat < 1 or not self.batches or min(self.batches) < 1:
            raise ConfigError("repeat and batch sizes must be >= 1")


def _sibling_build(build: Path, manifest: dict, suffix: str, progress: bool) -> tuple[Path, float]:
    """The same checkpoint exported with the sibling's options next to `build` (reused when current)."""
    from ..export.build import export_build

    out = build.parent / f"{build.name}{suffix}"
    opts = {"precision": manifest["precision"], "fuse": manifest["fused_attention"], **SIBLINGS[suffix]}
    want = manifest["provenance"]["checkpoint_manifest_sha256"]
    if (out / "manifest.json").is_file():
        m = read_manifest(out)
        if (m["provenance"]["checkpoint_manifest_sha256"] == want and m["modalities"] == manifest["modalities"]
                and (m["precision"], m["fused_attention"]) == (opts["precision"], opts["fuse"])):
            return out, sum(c["export_seconds"] for c in m["components"].values())
    t0 = time.perf_counter()
    export_build(manifest["provenance"]["checkpoint"], out, modalities=manifest["modalities"],
                 opset=manifest["opset"], progress=progress, **opts)
    return out, time.perf_counter() - t0


def load_backends(build: Path, cfg: BenchConfig, progress: bool) -> tuple[dict[str, Runtime], dict[str, Any]]:
    manifest = read_manifest(build)
    runtimes, info = {}, {}
    known = variants()
    for name in cfg.backends:
        v = known[name]
        before = rss_mb()[0]
        t0 = time.perf_counter()
        try:
            path = build
            if v.sibling:
                path, export_s = _sibling_build(build, manifest, v.sibling, progress)
                info.setdefault("export", {})[f"{v.sibling[1:]}_seconds"] = round(export_s, 1)
            accepted = backends()[v.backend].options()
            # fair sharing of the cores: a thread count if asked, and no spinning while idle
            shared = {k: val for k, val in (("threads", cfg.threads), ("spin", False)) if k in accepted}
            rt = Runtime.load(path, backend=v.backend, **shared, **v.options)
        except Exception as e:  # a backend that cannot load is reported, not fatal
            info[name] = {"error": f"{type(e).__name__}: {e}"}
            continue
        runtimes[name] = rt
        info[name] = {"load_seconds": round(time.perf_counter() - t0, 2),
                      "rss_growth_mb": round(rss_mb()[0] - before, 1)}
    return runtimes, info


def _requests(rt: Runtime, modality: str, n: int, seed: int = 0) -> list[Request]:
    rng = np.random.default_rng(seed)
    mc = rt.config.modality(modality)
    return [Request(modality, random_inputs(mc, rng)) for _ in range(n)]


def _stage_flops(rt: Runtime, reqs: list[Request], gen: GenerationConfig) -> dict[str, float]:
    """FLOPs per stage of one batch, counted on the torch backend's modules."""
    from torch.utils.flop_counter import FlopCounterMode

    be, flops = rt.backend, {}
    stage_of = {"encode": "encoder", "bridge": "bridge", "head": "head", "embed": "embed"}
    originals = {k: getattr(be, k) for k in (*stage_of, "decode")}
    calls = {"decode": 0}

    def wrap(method: str):
        def counted(*a, **k):
            with FlopCounterMode(display=False) as fc:
                out = originals[method](*a, **k)
            if method == "decode":  # first call is the prefill; the rest are generation steps
                stage = "decoder" if calls["decode"] == 0 else "generate"
                calls["decode"] += 1
            else:
                stage = stage_of[method]
            flops[stage] = flops.get(stage, 0.0) + fc.get_total_flops()
            return out
        return counted

    for k in originals:
        setattr(be, k, wrap(k))
    try:
        rt.predict_batch(reqs, gen)
    finally:
        for k in originals:
            delattr(be, k)  # back to the class's methods
    return flops


def run_bench(build: str | Path, cfg: BenchConfig = BenchConfig(), progress: bool = True) -> dict:
    build = Path(build)
    manifest = read_manifest(build)
    mods = list(cfg.modalities or manifest["modalities"])
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    peak = matmul_peak_gflops()
    runtimes, backend_info = load_backends(build, cfg, progress)
    names = list(runtimes)
    gen = GenerationConfig(max_new_tokens=cfg.gen_tokens, ignore_eos=True)
    latency: dict = {}
    flops: dict = {}
    total = len(mods) * len(cfg.batches) * (cfg.warmup + cfg.repeat) * len(names)
    bar = tqdm(total=total, desc="bench", unit="run", disable=not progress, leave=False)
    for m in mods:
        reqs = _requests(runtimes[names[0]], m, max(cfg.batches))
        for b in cfg.batches:
            samples: dict[str, dict[str, list[float]]] = {n: {} for n in names}
            for rep in range(cfg.warmup + cfg.repeat):
                order = names[rep % len(names):] + names[: rep % len(names)]
                for n in order:
                    bar.set_postfix_str(f"{m} b={b} {n}")
                    out = runtimes[n].predict_batch(reqs[:b], gen)
                    bar.update()
                    if rep < cfg.warmup:
                        continue
                    for stage, ms in out[0].timings_ms.items():
                        samples[n].setdefault(stage, []).append(ms)
            latency.setdefault(m, {})[str(b)] = {
                n: {stage: summarize(v) for stage, v in s.items()} for n, s in samples.items()}
            if "torch" in runtimes:
                flops.setdefault(m, {})[str(b)] = _stage_flops(runtimes["torch"], reqs[:b], gen)
    bar.close()
    generation = _generation(runtimes, cfg, progress)
    result = {
        "schema_version": 1, "kind": "allspark-bench", "started": started,
        "build": str(build), "preset": manifest["config"]["name"], "precision": manifest["precision"],
        "config": {**asdict(cfg), "modalities": mods},
        "machine": {**machine_info(), "matmul": peak, "rss_hwm_mb": round(rss_mb()[1], 1)},
        "backends": backend_info, "latency": latency, "flops": flops, "generation": generation,
        "export": _export_facts(manifest, backend_info),
    }
    result["throughput"] = _throughput(latency)
    result["efficiency"] = _efficiency(latency, flops, peak["peak_gflops"])
    result["targets"] = _targets(result)
    return result


def _generation(runtimes: dict[str, Runtime], cfg: BenchConfig, progress: bool) -> dict:
    """Time to first token and decode tokens/s per backend (the first generation modality, batch 1)."""
    out: dict = {}
    names = list(runtimes)
    text = [m for m in runtimes[names[0]].modalities if spec(m).head.generates] if names else []
    if not text:
        return out
    req = _requests(runtimes[names[0]], text[0], 1, seed=7)
    gen = GenerationConfig(max_new_tokens=cfg.decode_tokens, ignore_eos=True)
    samples: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    for rep in range(cfg.warmup + cfg.repeat):
        for n in names[rep % len(names):] + names[: rep % len(names)]:
            t = runtimes[n].predict_batch(req, gen)[0].timings_ms
            if rep >= cfg.warmup:
                ttft = sum(t.get(s, 0.0) for s in ("preprocess", "embed", "decoder"))
                samples[n].append((ttft, t["generate"] / max(cfg.decode_tokens - 1, 1)))
    for n, s in samples.items():
        ttft = [a for a, _ in s]
        step = [b for _, b in s]
        med_step = float(np.median(step))
        out[n] = {"ttft": summarize(ttft), "decode_step": summarize(step),
                  "tokens_per_s": round(1e3 / med_step, 1) if med_step else None}
    return out


def _throughput(latency: dict) -> dict:
    out: dict = {}
    for m, by_b in latency.items():
        for b, by_n in by_b.items():
            for n, st in by_n.items():
                med = st["total"]["median_ms"]
                out.setdefault(m, {}).setdefault(b, {})[n] = round(1e3 * int(b) / med, 2) if med else None
    return out


def _efficiency(latency: dict, flops: dict, peak: float) -> dict:
    """Achieved GFLOP/s per stage (FLOPs counted on torch) and its fraction of the matmul peak."""
    out: dict = {}
    for m, by_b in flops.items():
        for b, stages in by_b.items():
            for n, st in latency[m][b].items():
                for stage, f in stages.items():
                    ms = st.get(stage, {}).get("median_ms")
                    if ms and f:
                        g = f / (ms * 1e-3) / 1e9
                        out.setdefault(m, {}).setdefault(b, {}).setdefault(n, {})[stage] = {
                            "gflops": round(g, 2), "fraction_of_peak": round(g / peak, 4)}
    return out


def _export_facts(manifest: dict, backend_info: dict) -> dict:
    comps = manifest["components"]
    return {"seconds": round(sum(c["export_seconds"] for c in comps.values()), 1),
            "bytes": sum(component_bytes(c) for c in comps.values()),
            "per_component": {n: {"seconds": c["export_seconds"], "bytes": component_bytes(c)} for n, c in comps.items()},
            **backend_info.get("export", {})}


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def _targets(r: dict) -> dict:
    """The issue's targets at batch 1: met or missed, by how much."""
    lat, t = r["latency"], {}
    b = str(min(int(x) for x in next(iter(lat.values())))) if lat else "1"

    def med(m, n, stage):
        return lat.get(m, {}).get(b, {}).get(n, {}).get(stage, {}).get("median_ms")

    e2e = [_ratio(med(m, "torch", "total"), med(m, "onnxruntime", "total")) for m in lat]
    e2e = [x for x in e2e if x]
    if e2e:
        t["e2e_onnxruntime_vs_torch"] = {"median_speedup": float(np.median(e2e)), "target": 3.0,
                                         "met": bool(np.median(e2e) >= 3.0), "batch": int(b)}
    g = r["generation"]
    if "torch" in g and "onnxruntime" in g:
        s = _ratio(g["torch"]["decode_step"]["median_ms"], g["onnxruntime"]["decode_step"]["median_ms"])
        t["decode_step_vs_torch"] = {"speedup": s, "target": 5.0, "met": bool(s and s >= 5.0)}
    fused = [_ratio(med(m, "onnxruntime-nofuse", "bridge"), med(m, "onnxruntime", "bridge")) for m in lat]
    fused = [x for x in fused if x]
    if fused:
        t["bridge_fused_vs_nofuse"] = {"median_speedup": float(np.median(fused)), "target": 1.2,
                                       "met": bool(np.median(fused) >= 1.2), "batch": int(b)}
    return t
