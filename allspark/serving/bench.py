"""`allspark bench serve BUILD`: a bounded load generator against a real Triton server on loopback.

For each modality of the build, one fixed request (`random_inputs`, seeded):
  * paired: in-process `Runtime.predict` and one server round trip, alternated on the idle server,
    so the overhead is measured under the same machine load;
  * load: N client threads at once (N = 1, 8, 32; each its own client) until `max_requests` are done
    or `max_seconds` pass: p50/p99 round trip, throughput, and the batch sizes the shared entry and
    the decoder executed (Triton's statistics, before/after each level).
A second repository without dynamic batching shows what batching buys at the highest concurrency.

Targets judged (see the .md written next to the JSON):
  * single-pass: p50 round trip at concurrency 1 <= in-process p50 + 2 ms
  * generation: p50 round trip at concurrency 1 <= in-process p50 + 10%
  * throughput at concurrency 32 >= 3x throughput at concurrency 1: single-pass through dynamic
    batching, generation through the scheduler's continuous batching (judged apart)

The floor (`floor.py`): the p50 round trip of a generation-shaped request to a model that does
nothing, on a server of its own: what Triton, the python backend's IPC and the gRPC client cost
before any of our code runs. The report sets each generation's overhead against it.

The client threads share the machine with the server, so on a small CPU they compete with it; the
report records the CPU count and load so the numbers can be read accordingly.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .layouts import Layout

OVERHEAD_TARGET_MS = 2.0
GAIN_TARGET = 3.0
GENERATION_OVERHEAD_TARGET = 0.10  # generation: p50 round trip <= in-process + 10%

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchOptions:
    concurrency: tuple[int, ...] = (1, 8, 32)
    max_requests: int = 200  # per modality and concurrency level
    max_seconds: float = 6.0  # per modality and concurrency level
    modalities: tuple[str, ...] = ()  # (): every modality of the build
    protocol: str = "grpc"
    max_new_tokens: int = 16
    compare_batching: bool = True
    compare_layouts: bool = True  # also the components layout (one model per component, BLS)
    in_process_repeats: int = 40
    threads: int = 1  # onnxruntime intra-op threads, in-process and in the server's CPU models alike
    providers: tuple[str, ...] = ()  # onnxruntime execution providers, in-process and in the server alike
    seed: int = 0
    floor: bool = True  # also time a model that does nothing: the serving path's own cost (floor.py)


def _generates(modality: str) -> bool:
    from ..model.registry import spec

    return spec(modality).head.generates


def _percentiles(ms: list[float]) -> dict[str, float]:
    if not ms:
        return {"p50_ms": float("nan"), "p99_ms": float("nan")}
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def paired(rt, url: str, protocol: str, modality: str, inputs: dict, repeats: int, max_new_tokens: int) -> dict:
    """In-process `Runtime.predict` and a server round trip, alternated on an idle server so that
    drift in the machine's load hits both alike; the overhead is the difference of their p50s."""
    from ..runtime import GenerationConfig
    from .client import ServingClient

    gen = GenerationConfig(max_new_tokens=max_new_tokens, ignore_eos=True)
    tokens = max_new_tokens if _generates(modality) else None
    local, served = [], []
    with ServingClient(url, protocol) as client:
        rt.predict(modality, inputs, generation=gen)
        client.predict(modality, inputs, max_new_tokens=tokens, ignore_eos=tokens is not None)
        for _ in range(repeats):
            t = time.perf_counter()
            rt.predict(modality, inputs, generation=gen)
            local.append(1e3 * (time.perf_counter() - t))
            t = time.perf_counter()
            client.predict(modality, inputs, max_new_tokens=tokens, ignore_eos=tokens is not None)
            served.append(1e3 * (time.perf_counter() - t))
        streamed = []
        for _ in range(repeats if tokens else 0):  # generation, one response per token as it comes
            t = time.perf_counter()
            n = sum(1 for _ in client.stream(modality, inputs, max_new_tokens=tokens, ignore_eos=True))
            streamed.append(1e3 * (time.perf_counter() - t))
    a, b = _percentiles(local), _percentiles(served)
    diff = float(np.median(np.subtract(served, local)))  # per pair: robust to load drift between pairs
    out = {"in_process": a, "server": b, "p50_overhead_ms": round(diff, 3)}
    if streamed:  # per-token responses cost one more message each, over the final-only round trip
        out["streamed"] = {**_percentiles(streamed), "responses": n,
                           "ms_per_extra_response": round((float(np.median(streamed)) - b["p50_ms"]) / (n - 1), 3)}
    return out


def batch_scaling(rt, modality: str, inputs: dict, sizes: tuple[int, ...], repeats: int, max_new_tokens: int
                  ) -> dict[str, float]:
    """In-process `predict_batch` time per row at each batch size (sizes alternated, so load drift
    hits all alike): the most dynamic batching can gain is what batching gains the graphs
    themselves, plus the per-call overheads it amortises."""
    from ..runtime import GenerationConfig, Request

    gen = GenerationConfig(max_new_tokens=max_new_tokens, ignore_eos=True)
    ms: dict[int, list[float]] = {b: [] for b in sizes}
    for b in sizes:
        rt.predict_batch([Request(modality, inputs)] * b, gen)
    for _ in range(repeats):
        for b in sizes:
            t = time.perf_counter()
            rt.predict_batch([Request(modality, inputs)] * b, gen)
            ms[b].append(1e3 * (time.perf_counter() - t) / b)
    return {str(b): round(float(np.median(v)), 3) for b, v in ms.items()}


def server_stats(url: str) -> dict[str, tuple[int, int]]:
    """Per model: (successful requests, ns spent in queue + input + infer + output) so far."""
    import tritonclient.http as th

    client = th.InferenceServerClient(url)
    try:
        out = {}
        for s in client.get_inference_statistics()["model_stats"]:
            st = s["inference_stats"]
            ns = sum(st[k]["ns"] for k in ("queue", "compute_input", "compute_infer", "compute_output"))
            out[s["name"]] = (st["success"]["count"], ns)
        return out
    finally:
        client.close()


def _per_request_ms(after: dict, before: dict) -> dict[str, float]:
    out = {}
    for name, (n, ns) in after.items():
        dn, dns = n - before.get(name, (0, 0))[0], ns - before.get(name, (0, 0))[1]
        if dn > 0:
            out[name] = round(dns / dn / 1e6, 3)
    return out


def load(url: str, protocol: str, modality: str, inputs: dict, concurrency: int, max_requests: int,
         max_seconds: float, max_new_tokens: int) -> dict[str, Any]:
    """`concurrency` threads, one client each, sending until the budget of requests or time is spent.
    Each client connects and sends one uncounted request first (its gRPC stream opens then); the
    clock starts once every client has, so the throughput is the steady state's, not the clients'
    set-up."""
    from .client import ServingClient

    lock = threading.Lock()
    issued = [0]
    latencies: list[float] = []
    errors: list[str] = []
    clock: dict[str, float] = {}

    def start() -> None:  # run once, by the last to arrive, before any is released
        clock["t0"] = time.perf_counter()
        clock["deadline"] = clock["t0"] + max_seconds

    ready = threading.Barrier(concurrency + 1, action=start)
    gen_tokens = max_new_tokens if _generates(modality) else None

    def send(client) -> None:
        client.predict(modality, inputs, max_new_tokens=gen_tokens, ignore_eos=gen_tokens is not None)

    def worker() -> None:
        client = None
        try:
            client = ServingClient(url, protocol)
            client.info(modality)
            send(client)
        except Exception as e:  # counted; this client sends nothing more, but still meets the others
            with lock:
                errors.append(str(e)[:200])
            if client is not None:
                client.close()
                client = None
        try:
            ready.wait()
            started = True
        except threading.BrokenBarrierError:  # nothing was timed
            started = False
        if client is None:
            return
        with client:
            while started and time.perf_counter() < clock["deadline"]:
                with lock:
                    if issued[0] >= max_requests:
                        return
                    issued[0] += 1
                t = time.perf_counter()
                try:
                    send(client)
                    with lock:
                        latencies.append(1e3 * (time.perf_counter() - t))
                except Exception as e:  # counted, never fatal: the report shows them
                    with lock:
                        errors.append(str(e)[:200])

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for th in threads:
        th.start()
    try:
        ready.wait(timeout=60 + max_seconds)
    except threading.BrokenBarrierError:  # a client hung connecting: nothing was timed
        errors.append("not every client connected within the set-up time")
        clock.setdefault("t0", time.perf_counter())
    for th in threads:
        th.join(max_seconds + 60)
    wall = time.perf_counter() - clock["t0"]
    return {"concurrency": concurrency, "requests": len(latencies), "errors": len(errors),
            "first_error": errors[0] if errors else None, **_percentiles(latencies),
            "throughput_rps": round(len(latencies) / wall, 2) if wall > 0 else 0.0}


def batch_stats(url: str, model: str) -> dict[int, int]:
    """Executions per batch size of `model` so far (Triton's statistics)."""
    import tritonclient.http as th

    client = th.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics(model)["model_stats"][0].get("batch_stats", [])
        return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats}
    finally:
        client.close()


def _delta(after: dict[int, int], before: dict[int, int]) -> dict[int, int]:
    d = {k: v - before.get(k, 0) for k, v in after.items()}
    return {k: v for k, v in sorted(d.items()) if v > 0}


def _mean_batch(hist: dict[int, int]) -> float | None:
    n = sum(hist.values())
    return round(sum(k * v for k, v in hist.items()) / n, 2) if n else None


def serve_variant(build: Path, workdir: Path, batching: bool, inputs: dict, opts: BenchOptions,
                  levels: tuple[int, ...], rt=None, layout: str = Layout.RUNTIME.value) -> dict[str, Any]:
    """Write a CPU repository (a layout, dynamic batching on or off), start a server, load every
    modality (with `rt`: first the paired in-process vs round-trip comparison)."""
    from .model_config import behind
    from .options import BatchingOptions, RepositoryOptions, Target
    from .repository import write_repository
    from .server import TritonServer

    repo = workdir / f"{layout}-{'batching' if batching else 'no_batching'}"
    write_repository(build, repo, RepositoryOptions(target=Target.CPU, layout=layout,
                                                    batching=BatchingOptions(enabled=batching), threads=opts.threads,
                                                    providers=opts.providers))
    out: dict[str, Any] = {"layout": layout, "modalities": {}, "paired": {}}
    t0 = time.perf_counter()
    with TritonServer(repo) as server:
        out["ready_seconds"] = round(time.perf_counter() - t0, 1)
        url = server.grpc_url if opts.protocol == "grpc" else server.http_url
        for m, x in inputs.items():
            load(url, opts.protocol, m, x, 1, 3, 30.0, opts.max_new_tokens)  # warm the path
            if rt is not None:
                before = server_stats(server.http_url)
                out["paired"][m] = p = paired(rt, url, opts.protocol, m, x, opts.in_process_repeats, opts.max_new_tokens)
                p["server_ms_per_request_by_model"] = _per_request_ms(server_stats(server.http_url), before)
                log.info("  %-12s in-process p50 %8.2f ms   server p50 %8.2f ms   overhead %+.2f ms", m,
                         p["in_process"]["p50_ms"], p["server"]["p50_ms"], p["p50_overhead_ms"])
            options = RepositoryOptions(target=Target.CPU, layout=layout)
            entry = behind(m, options)
            watched = options.serving_layout.watched(entry)  # runtime: no decoder model
            out["modalities"][m] = []
            for c in levels:
                before = {k: batch_stats(server.http_url, k) for k in watched}
                r = load(url, opts.protocol, m, x, c, opts.max_requests, opts.max_seconds, opts.max_new_tokens)
                if "decoder" in watched:
                    r["decoder_batches"] = _delta(batch_stats(server.http_url, "decoder"), before["decoder"])
                r["decoder_mean_batch"] = _mean_batch(r.get("decoder_batches", {}))
                r["entry_mean_batch"] = _mean_batch(_delta(batch_stats(server.http_url, entry), before[entry]))
                out["modalities"][m].append(r)
                log.info("  %s %-12s c=%-3d p50 %8.2f ms  p99 %8.2f ms  %7.1f req/s  mean batch: entry %s, decoder %s",
                         "on " if batching else "off", m, c, r["p50_ms"], r["p99_ms"], r["throughput_rps"],
                         r["entry_mean_batch"], r["decoder_mean_batch"])
    return out


def run_bench(build: str | Path, out: str | Path, opts: BenchOptions | None = None) -> dict:
    from ..model.registry import random_inputs
    from ..runtime import Runtime

    opts = opts or BenchOptions()
    build, out = Path(build), Path(out)
    rt = Runtime.load(build, threads=opts.threads, providers=list(opts.providers) or None)
    mods = list(opts.modalities) or list(rt.modalities)
    rng = np.random.default_rng(opts.seed)
    inputs = {m: random_inputs(rt.config.modality(m), rng) for m in mods}
    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "load_average_at_start": list(os.getloadavg()),
                    "platform": platform.platform(), "python": platform.python_version()},
        "build": str(build), "preset": json.loads((build / "manifest.json").read_text())["config"]["name"],
        "options": asdict(opts), "server": {},
        "components": {n: c["kind"] for n, c in rt.manifest["components"].items()}}
    with tempfile.TemporaryDirectory(prefix="allspark-bench-") as tmp:
        log.info("server, runtime layout, dynamic batching on ...")
        report["server"]["batching"] = serve_variant(build, Path(tmp), True, inputs, opts, opts.concurrency, rt)
        if opts.compare_layouts:
            log.info("server, components layout, dynamic batching on ...")
            report["server"]["components"] = serve_variant(build, Path(tmp), True, inputs, opts, opts.concurrency, rt,
                                                           layout=Layout.COMPONENTS.value)
        if opts.compare_batching:
            log.info("server, runtime layout, dynamic batching off ...")
            levels = tuple(sorted({min(opts.concurrency), max(opts.concurrency)}))
            report["server"]["no_batching"] = serve_variant(build, Path(tmp), False, inputs, opts, levels)
        if opts.floor and opts.protocol == "grpc":
            from .floor import measure

            log.info("server, a model that does nothing (the floor) ...")
            report["floor"] = measure(Path(tmp), repeats=max(50, 5 * opts.in_process_repeats))
            log.info("  floor p50 %.3f ms, p99 %.3f ms", report["floor"]["p50_ms"], report["floor"]["p99_ms"])
    report["in_process"] = {m: p["in_process"] for m, p in report["server"]["batching"]["paired"].items()}
    sizes = tuple(sorted({1, 8, max(opts.concurrency)}))  # the highest concurrency's batch: the ceiling of its gain
    log.info("in-process predict_batch, ms per row at batch %s ...", ", ".join(map(str, sizes)))
    report["in_process_ms_per_row"] = {m: batch_scaling(rt, m, x, sizes, 10, opts.max_new_tokens)
                                       for m, x in inputs.items()}
    report["machine"]["load_average_at_end"] = list(os.getloadavg())
    report["targets"] = judge(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    log.info("wrote %s and %s", out, out.with_suffix(".md"))
    return report


def judge(report: dict) -> dict[str, Any]:
    on = report["server"]["batching"]["modalities"]
    off = report["server"].get("no_batching", {}).get("modalities", {})
    per: dict[str, Any] = {}
    for m, levels in on.items():
        by_c = {r["concurrency"]: r for r in levels}
        lo, hi = by_c[min(by_c)], by_c[max(by_c)]
        paired = report["server"]["batching"]["paired"][m]
        overhead = paired["p50_overhead_ms"]
        gain = hi["throughput_rps"] / lo["throughput_rps"] if lo["throughput_rps"] else None
        off_hi = {r["concurrency"]: r for r in off.get(m, [])}.get(max(by_c))
        rows = report.get("in_process_ms_per_row", {}).get(m, {})
        top = str(max(by_c))
        gen = _generates(m)  # generation: overhead relative to in-process; single-pass: absolute, and the gain
        rel = overhead / paired["in_process"]["p50_ms"]
        floor = report.get("floor", {}).get("p50_ms")
        per[m] = {"p50_overhead_ms": round(overhead, 3), "p50_overhead_rel": round(rel, 4), "generates": gen,
                  "overhead_met": rel <= GENERATION_OVERHEAD_TARGET if gen else overhead <= OVERHEAD_TARGET_MS,
                  "in_process_batch8_speedup_per_row": round(rows["1"] / rows["8"], 2) if rows else None,
                  # what batching c_max rows gains the graphs alone: the gain's ceiling on one core
                  "in_process_c_max_speedup_per_row": round(rows["1"] / rows[top], 2) if top in rows else None,
                  "gain_c_max_vs_c1": round(gain, 2) if gain else None,
                  # generation: streams the scheduler batches step by step (continuous batching)
                  "gain_met": bool(gain and gain >= GAIN_TARGET),
                  "batching_on_vs_off_at_c_max": round(hi["throughput_rps"] / off_hi["throughput_rps"], 2)
                  if off_hi and off_hi["throughput_rps"] else None,
                  # the floor: a do-nothing model's round trip, as a share of this in-process p50
                  "floor_rel": round(floor / paired["in_process"]["p50_ms"], 4) if floor else None,
                  "overhead_above_floor_ms": round(overhead - floor, 3) if floor else None}
    single = [v for v in per.values() if not v["generates"]]
    gens = [v for v in per.values() if v["generates"]]
    return {"overhead_target_ms": OVERHEAD_TARGET_MS, "generation_overhead_target": GENERATION_OVERHEAD_TARGET,
            "gain_target": GAIN_TARGET, "per_modality": per,
            # None: no modality of that kind was measured (not "met")
            "overhead_met_all": all(v["overhead_met"] for v in single) if single else None,
            "generation_overhead_met_all": all(v["overhead_met"] for v in gens) if gens else None,
            "gain_met_all": all(v["gain_met"] for v in single) if single else None,
            "generation_gain_met_all": all(v["gain_met"] for v in gens) if gens else None}


def markdown(report: dict) -> str:
    """The summary written next to the JSON: setup, the table, layouts, where the time goes, the verdict."""
    return "\n".join([*_md_setup(report), *_md_table(report), *_md_layouts(report), *_md_time(report),
                      *_md_verdict(report)]) + "\n"


def _md_layouts(r: dict) -> list[str]:
    """The runtime layout (the table above) against the components layout, same requests."""
    comp = r["server"].get("components")
    if not comp:
        return []
    run = r["server"]["batching"]
    conc = max(x["concurrency"] for x in next(iter(run["modalities"].values())))
    lines = ["", f"Layouts, dynamic batching on: overhead over in-process at c=1 (median of pairs) and "
             f"throughput at c={conc}:", "",
             "| modality | runtime: overhead ms | components: overhead ms | runtime: req/s | components: req/s |",
             "|---|---|---|---|---|"]
    for m in run["modalities"]:
        a, b = run["paired"][m]["p50_overhead_ms"], comp["paired"][m]["p50_overhead_ms"]
        ta = {x["concurrency"]: x for x in run["modalities"][m]}[conc]["throughput_rps"]
        tb = {x["concurrency"]: x for x in comp["modalities"][m]}[conc]["throughput_rps"]
        lines.append(f"| {m} | {a:+.2f} | {b:+.2f} | {ta:.0f} | {tb:.0f} |")
    return lines


def _md_setup(r: dict) -> list[str]:
    o, mach = r["options"], r["machine"]
    return [f"# Serving benchmark ({r['preset']} build, Triton python-backend CPU target, runtime layout)", "",
            (f"Machine: {mach['cpus']} CPUs, load average {mach['load_average_at_start'][0]:.1f} at start (shared "
             f"with the load generator and other work). Protocol: {o['protocol']}; onnxruntime intra-op threads "
             f"{o['threads']} in-process and in the server; one fixed request per modality; at most "
             f"{o['max_requests']} requests or {o['max_seconds']} s per level; generation: "
             f"{o['max_new_tokens']} new tokens."), ""]


def _md_table(r: dict) -> list[str]:
    t, on = r["targets"]["per_modality"], r["server"]["batching"]["modalities"]
    conc = [x["concurrency"] for x in next(iter(on.values()))]
    head = (["modality", "in-process p50 ms", "server p50 ms (paired)", "overhead ms (median of pairs)"]
            + [f"c={c}: p50 / p99 ms, req/s" for c in conc]
            + ["mean batch at c=max: entry, decoder", "gain c=max vs c=1", "batching on/off at c=max"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, levels in on.items():
        p = r["server"]["batching"]["paired"][m]
        cells = [m, f"{p['in_process']['p50_ms']:.2f}", f"{p['server']['p50_ms']:.2f}", f"{t[m]['p50_overhead_ms']:+.2f}"]
        cells += [f"{x['p50_ms']:.2f} / {x['p99_ms']:.2f}, {x['throughput_rps']:.0f}" for x in levels]
        cells += [f"{levels[-1]['entry_mean_batch']}, {levels[-1]['decoder_mean_batch']}",
                  f"{t[m]['gain_c_max_vs_c1']}x", _times(t[m]['batching_on_vs_off_at_c_max'])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _md_time(r: dict) -> list[str]:
    t = r["targets"]["per_modality"]
    lines = ["", ("Server time per call by model during the paired runs (ms; queue + input + infer + output as "
                  "Triton counts it; runtime layout: the shared entry runs every graph itself; a decoupled stream "
                  "model's time is its `execute`, which returns before the tokens are generated):"), ""]
    lines += [f"* {m}: " + ", ".join(f"{k} {v:.2f}" for k, v in p.get("server_ms_per_request_by_model", {}).items())
              for m, p in r["server"]["batching"]["paired"].items()]
    sizes = sorted({int(b) for x in r.get("in_process_ms_per_row", {}).values() for b in x})
    lines += ["", (f"In-process `predict_batch`, ms per row at batch {' -> '.join(map(str, sizes))} (what batching "
                   "gains the graphs themselves on this CPU; the last factor is against batch 1):"), ""]
    lines += [f"* {m}: " + " -> ".join(f"{x[str(b)]:.2f}" for b in sizes if str(b) in x)
              + f" ({round(x['1'] / x[str(max(int(b) for b in x))], 2)}x)"
              for m, x in r.get("in_process_ms_per_row", {}).items()]
    return lines


def _times(x) -> str:
    return "-" if x is None else f"{x}x"


def _md_verdict(r: dict) -> list[str]:
    t = r["targets"]
    per = t["per_modality"]
    runs = [x for v in r["server"].values() for levels in v["modalities"].values() for x in levels]
    by_kind: dict[str, list[float]] = {}
    for p in r["server"]["batching"]["paired"].values():
        for name, ms in p.get("server_ms_per_request_by_model", {}).items():
            by_kind.setdefault(r.get("components", {}).get(name, ""), []).append(ms)
    heads = by_kind.get("head", [])
    single = [v for v in per.values() if not v["generates"]]
    speedups = [v["in_process_batch8_speedup_per_row"] for v in per.values() if v["in_process_batch8_speedup_per_row"]]
    ceilings = {m: v["in_process_c_max_speedup_per_row"] for m, v in per.items()
                if not v["generates"] and v.get("in_process_c_max_speedup_per_row")}
    streams = {m: p["streamed"] for m, p in r["server"]["batching"]["paired"].items() if "streamed" in p}
    lines = ["", f"Errors during the runs: {sum(x['errors'] for x in runs)}.", ""]
    if streams:
        lines += ["Generation streamed token by token (one response per token, then the final): "
                  + "; ".join(f"{m} p50 {v['p50_ms']:.2f} ms, {v['ms_per_extra_response']:.2f} ms per extra response"
                              for m, v in streams.items())
                  + ". The round trips above ask for the final response only (`stream_tokens: false`).", ""]
    gens = {m: v for m, v in per.items() if v["generates"]}
    if single:
        lines += [(f"* single-pass p50 round trip <= in-process + {t['overhead_target_ms']} ms: "
                   f"{'met' if t['overhead_met_all'] else 'NOT met'} "
                   f"({sum(v['overhead_met'] for v in single)}/{len(single)} modalities met)."),
                  (f"* single-pass throughput at the highest concurrency >= {t['gain_target']}x concurrency 1: "
                   f"{'met' if t['gain_met_all'] else 'NOT met'} "
                   f"({sum(bool(v['gain_met']) for v in single)}/{len(single)} modalities met).")]
    if gens:
        lines.append(f"* generation p50 round trip <= in-process + {100 * t['generation_overhead_target']:.0f}%: "
                     f"{'met' if t['generation_overhead_met_all'] else 'NOT met'} ("
                     + ", ".join(f"{m} {100 * v['p50_overhead_rel']:+.1f}%" for m, v in gens.items()) + ").")
        lines.append(f"* generation streams' throughput at the highest concurrency >= {t['gain_target']}x concurrency 1 "
                     f"(continuous batching): {'met' if t.get('generation_gain_met_all') else 'NOT met'} ("
                     + ", ".join(f"{m} {v['gain_c_max_vs_c1']}x" for m, v in gens.items()) + ").")
    floor = r.get("floor")
    if floor and gens:
        lines.append(f"* the floor (a model that does nothing, a generation request's shape, same client and "
                     f"server path): p50 {floor['p50_ms']:.2f} ms, which alone is "
                     + ", ".join(f"{m} {100 * v['floor_rel']:.1f}%" for m, v in gens.items() if v.get('floor_rel'))
                     + " of the in-process p50; above it: "
                     + ", ".join(f"{m} {v['overhead_above_floor_ms']:+.2f} ms" for m, v in gens.items()
                                 if v.get('overhead_above_floor_ms') is not None) + ".")
    lines.append("")
    if heads:
        lines.append(f"Reading: a head model is one small matmul, yet Triton counts a median "
                     f"{float(np.median(heads)):.2f} ms per call to a head model: that is the python backend's "
                     f"stub round trip, paid once per component call (entry -> encoder, bridge, decoder, head), "
                     f"which is what the overhead over in-process is made of here.")
    if speedups:
        lines.append(f"Batching 8 rows in-process makes a row {min(speedups)}-{max(speedups)}x cheaper on this "
                     f"CPU: the graphs are compute-bound on 2 cores that the server shares with the load generator, "
                     f"so throughput at concurrency 32 is capped near that factor plus the per-call overheads "
                     f"batching amortises.")
    if ceilings:
        top = max(x["concurrency"] for levels in r["server"]["batching"]["modalities"].values() for x in levels)
        lines.append(f"In process, batching {top} rows makes a single-pass row "
                     + ", ".join(f"{m} {c}x" for m, c in ceilings.items())
                     + f" cheaper than alone: with one onnxruntime thread per batch, that is what concurrency "
                     f"{top} can gain on one core, before the server's second worker and the per-call overheads "
                     f"it amortises.")
    return lines
