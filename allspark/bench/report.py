"""Benchmark results -> `bench.json`, `REPORT.md` and PNG plots (matplotlib, headless)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

REQUIRED = {"schema_version": int, "kind": str, "build": str, "preset": str, "config": dict,
            "machine": dict, "backends": dict, "latency": dict, "throughput": dict, "flops": dict,
            "efficiency": dict, "generation": dict, "export": dict, "targets": dict}
PLOTS = ("latency_stages.png", "speedup.png", "throughput.png", "tokens_per_s.png")
STAGES = ("preprocess", "encoder", "bridge", "embed", "decoder", "head", "generate")


class ReportSchemaError(ValueError):
    pass


def validate_results(r: dict) -> None:
    for key, typ in REQUIRED.items():
        if not isinstance(r.get(key), typ):
            raise ReportSchemaError(f"bench results: {key!r} must be {typ.__name__}, got {type(r.get(key)).__name__}")
    if r["kind"] != "allspark-bench" or r["schema_version"] != 1:
        raise ReportSchemaError("bench results: expected kind 'allspark-bench', schema_version 1")
    for m, by_b in r["latency"].items():
        for b, by_n in by_b.items():
            for n, st in by_n.items():
                for stage in ("total",):
                    s = st.get(stage)
                    if not (isinstance(s, dict) and s.get("median_ms", -1) >= 0 and s.get("p90_ms", -1) >= s["median_ms"] - 1e-9):
                        raise ReportSchemaError(f"bench results: latency[{m}][{b}][{n}][{stage}] malformed: {s}")


def write_report(r: dict, out: str | Path) -> list[Path]:
    validate_results(r)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(r, indent=1) + "\n")
    plots = _plots(r, out)
    (out / "REPORT.md").write_text(markdown(r, [p.name for p in plots]))
    return [out / "bench.json", out / "REPORT.md", *plots]


def _b1(r: dict) -> str:
    return str(min(r["config"]["batches"]))


def _med(r: dict, m: str, n: str, stage: str = "total", b: str | None = None) -> float | None:
    return r["latency"].get(m, {}).get(b or _b1(r), {}).get(n, {}).get(stage, {}).get("median_ms")


def _fmt(x, nd=2) -> str:
    return "—" if x is None else f"{x:.{nd}f}"


def markdown(r: dict, plots: list[str]) -> str:
    mach, cfg = r["machine"], r["config"]
    names = [n for n in cfg["backends"] if "error" not in r["backends"].get(n, {})]
    b1 = _b1(r)
    L = [f"# Benchmark: `{r['preset']}` preset ({r['precision']})", "",
         f"Run {r.get('started', '')} on **{mach['cpu']}**, {mach['cores']} cores, GPU: {mach['gpu']}; "
         f"torch {mach['torch']}, onnxruntime {mach['onnxruntime']}; load average at start "
         f"{', '.join(f'{x:.1f}' for x in mach.get('load_average') or [])}. Matmul peak measured in the same run: "
         f"{mach['matmul']['peak_gflops']} GFLOP/s (fp32, {mach['matmul']['n']}²). "
         f"Repetitions: {cfg['repeat']} (after {cfg['warmup']} warm-up), interleaved across backends; "
         f"medians unless stated. Text modalities generate {cfg['gen_tokens']} tokens end to end.", ""]
    if mach["gpu"] == "not available":
        L += ["No GPU was available for this run: CUDA/TensorRT backends and the Triton kernels are not in it.", ""]
    L += ["## Targets", "", "| target | measured | goal | met |", "|---|---|---|---|"]
    for k, t in r["targets"].items():
        v = t.get("median_speedup", t.get("speedup"))
        L.append(f"| {k} | {_fmt(v)}× | ≥ {t['target']}× | {'yes' if t['met'] else 'no'} |")
    L += _why(r)
    L += ["", f"## End to end, batch {b1} (median ms; speedup over torch eager)", "",
          "| modality | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for m in r["latency"]:
        base = _med(r, m, "torch")
        cells = [f"{_fmt(_med(r, m, n))} ({_fmt(base / _med(r, m, n) if base and _med(r, m, n) else None)}×)" for n in names]
        L.append(f"| {m} | " + " | ".join(cells) + " |")
    L += ["", f"## Per stage, batch {b1} (median ms)", "",
          "| modality | backend | " + " | ".join(STAGES) + " | total (p90) |", "|---|---|" + "---|" * (len(STAGES) + 1)]
    for m in r["latency"]:
        for n in names:
            st = r["latency"][m][b1].get(n, {})
            cells = [_fmt(st.get(s, {}).get("median_ms")) for s in STAGES]
            L.append(f"| {m} | {n} | " + " | ".join(cells) + f" | {_fmt(st['total']['median_ms'])} ({_fmt(st['total']['p90_ms'])}) |")
    L += ["", "## Throughput (requests/s)", "", "| modality | batch | " + " | ".join(names) + " |",
          "|---|---|" + "---|" * len(names)]
    for m, by_b in r["throughput"].items():
        for b, by_n in by_b.items():
            L.append(f"| {m} | {b} | " + " | ".join(_fmt(by_n.get(n), 1) for n in names) + " |")
    if r["generation"]:
        L += ["", f"## Generation (language, batch 1, KV cache, {cfg['decode_tokens']} tokens)", "",
              "| backend | time to first token ms | decode step ms | tokens/s |", "|---|---|---|---|"]
        for n, g in r["generation"].items():
            L.append(f"| {n} | {_fmt(g['ttft']['median_ms'])} | {_fmt(g['decode_step']['median_ms'], 3)} | {_fmt(g['tokens_per_s'], 1)} |")
    L += ["", f"## Efficiency, batch {b1}: achieved GFLOP/s (fraction of the matmul peak)", "",
          "FLOPs counted on the PyTorch modules (torch.utils.flop_counter); the same FLOPs divided by each backend's stage time.", "",
          "| modality | backend | encoder | bridge | decoder | head |", "|---|---|---|---|---|---|"]
    for m, by_b in r["efficiency"].items():
        for n, st in by_b.get(b1, {}).items():
            cells = [f"{st[s]['gflops']:.2f} ({100 * st[s]['fraction_of_peak']:.1f}%)" if s in st else "—"
                     for s in ("encoder", "bridge", "decoder", "head")]
            L.append(f"| {m} | {n} | " + " | ".join(cells) + " |")
    ex = r["export"]
    L += ["", "## Export", "", f"All components: {ex['seconds']} s, {ex['bytes'] / 1e6:.2f} MB"
          + (f"; the `--no-fuse` build: {ex['nofuse_seconds']} s." if "nofuse_seconds" in ex else "."), "",
          "## Backends", "", "| backend | load s | RSS growth MB | error |", "|---|---|---|---|"]
    for n, info in r["backends"].items():
        if n == "export":
            continue
        L.append(f"| {n} | {_fmt(info.get('load_seconds'))} | {_fmt(info.get('rss_growth_mb'), 1)} | {info.get('error', '')} |")
    L += ["", f"Process RSS high-water mark: {mach['rss_hwm_mb']} MB (all backends loaded in one process)."]
    L += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(L)


GRAPH_STAGES = ("encoder", "bridge", "embed", "decoder", "head", "generate")


def _why(r: dict) -> list[str]:
    """For each missed target, what the measurements say about why."""
    t, b1, lines = r["targets"], _b1(r), []
    e2e = t.get("e2e_onnxruntime_vs_torch")
    if e2e and not e2e["met"]:
        glue, graph_sp = [], []
        for m, by_b in r["latency"].items():
            st = by_b[b1]
            if "torch" not in st or "onnxruntime" not in st:
                continue
            graphs = {n: sum(st[n].get(s, {}).get("median_ms", 0.0) for s in GRAPH_STAGES) for n in ("torch", "onnxruntime")}
            glue.append(1 - graphs["onnxruntime"] / st["onnxruntime"]["total"]["median_ms"])
            if graphs["onnxruntime"]:
                graph_sp.append(graphs["torch"] / graphs["onnxruntime"])
        if glue:
            lines.append(f"- **End to end {e2e['median_speedup']:.2f}× < 3×** (short by {3 - e2e['median_speedup']:.2f}×): "
                         f"the work both backends share (preprocessing, tokenizing, batch assembly in Python) is a median "
                         f"{100 * np.median(glue):.0f}% of the onnxruntime total, and on the graph stages alone onnxruntime is "
                         f"{np.median(graph_sp):.2f}× torch eager (median over modalities): at these widths each op runs for "
                         f"microseconds, so per-op dispatch, not arithmetic, dominates both runtimes for the single-pass "
                         f"modalities. The generation modalities, where the KV-cache decode loop dominates, exceed the target.")
    fused = t.get("bridge_fused_vs_nofuse")
    if fused and not fused["met"]:
        lines.append(f"- **Fused bridge {fused['median_speedup']:.2f}× < 1.2×**: fusion changes only the attention op; "
                     "the bridge's time is mostly its projections, feed-forward and layer norms, which both graphs run "
                     "identically, and ONNX Runtime's CPU `Attention` kernel is itself a MatMul/Softmax/MatMul sequence. "
                     "`allspark bench kernels` times the attention op alone (docs/benchmarks/kernels.json).")
    dec = t.get("decode_step_vs_torch")
    if dec and not dec["met"]:
        lines.append(f"- **Decode step {dec['speedup']}× < 5×**: see the generation table.")
    return (["", "### Why targets were missed", ""] + lines) if lines else []


def _plots(r: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in r["config"]["backends"] if "error" not in r["backends"].get(n, {})]
    mods, b1 = list(r["latency"]), _b1(r)
    paths = []

    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 4), sharey=True, squeeze=False)
    for ax, n in zip(axes[0], names):
        bottom = np.zeros(len(mods))
        for s in STAGES:
            v = np.array([r["latency"][m][b1].get(n, {}).get(s, {}).get("median_ms", 0.0) for m in mods])
            ax.bar(mods, v, bottom=bottom, label=s)
            bottom += v
        ax.set_title(n)
        ax.tick_params(axis="x", rotation=60)
    axes[0][0].set_ylabel(f"ms (batch {b1}, median)")
    axes[0][-1].legend(fontsize=7)
    paths.append(_save(fig, out / PLOTS[0]))

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(len(names), 1)
    for i, n in enumerate(names):
        sp = [(_med(r, m, "torch") or 0) / (_med(r, m, n) or np.inf) for m in mods]
        ax.bar(np.arange(len(mods)) + i * width, sp, width, label=n)
    ax.axhline(1.0, color="k", lw=0.5)
    ax.set_xticks(np.arange(len(mods)) + width * (len(names) - 1) / 2, mods, rotation=60)
    ax.set_ylabel("speedup over torch eager")
    ax.legend(fontsize=7)
    paths.append(_save(fig, out / PLOTS[1]))

    fig, ax = plt.subplots(figsize=(6, 4))
    batches = [str(b) for b in r["config"]["batches"]]
    for n in names:
        tp = [np.median([r["throughput"][m][b].get(n) or 0 for m in mods]) for b in batches]
        ax.plot([int(b) for b in batches], tp, marker="o", label=n)
    ax.set_xlabel("batch")
    ax.set_ylabel("requests/s (median over modalities)")
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=7)
    paths.append(_save(fig, out / PLOTS[2]))

    fig, ax = plt.subplots(figsize=(6, 4))
    g = r["generation"]
    ax.bar(list(g), [g[n]["tokens_per_s"] or 0 for n in g])
    ax.set_ylabel("decode tokens/s (batch 1, KV cache)")
    ax.tick_params(axis="x", rotation=30)
    paths.append(_save(fig, out / PLOTS[3]))
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
