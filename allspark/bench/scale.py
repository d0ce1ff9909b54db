"""`allspark bench scale`: how cost grows with model size, preset by preset (tiny, demo, base; paper
where it fits).

For each preset, in fresh processes: `allspark new` (random weights) and `allspark export`, timed with
the peak memory of their whole process tree (`bench/memory.py`); then `allspark bench` of the build
(torch eager vs onnxruntime, batch 1 and 8): per-stage latency, decoder time to first token and decode
tokens/s. A decode step streams the decoder's weights once, so weight bytes / step time is the
bandwidth it achieved, set against the host memory bandwidth measured in this run. int8: the embedded
demo checkpoint exported `--precision int8` (onnxruntime dynamic quantization of the MatMul weights),
its speed against the fp32 export, and its accuracy change on the demo's held-out eval.
Results: JSON + Markdown + a plot of cost against parameter count.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from ..commands import at_least
from .machine import machine_info, memory_bandwidth_gbs
from .memory import measure

PY = [sys.executable, "-m", "allspark"]


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def checkpoint_facts(ck: Path) -> dict:
    """Parameters and bytes of a checkpoint, from its safetensors headers (no tensor is read)."""
    from safetensors import safe_open

    params, nbytes = 0, 0
    for f in sorted(ck.rglob("*.safetensors")):
        nbytes += f.stat().st_size
        with safe_open(f, "pt") as st:
            for k in st.keys():
                n = 1
                for d in st.get_slice(k).get_shape():
                    n *= d
                params += n
    return {"parameters": params, "bytes": nbytes}


def _dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def _stage_medians(bench: dict, m: str, b: str, backend: str) -> dict:
    st = bench["latency"].get(m, {}).get(b, {}).get(backend, {})
    return {s: round(v["median_ms"], 3) for s, v in st.items()}


def scale_one(preset: str, modalities: list[str], root: Path, args: argparse.Namespace) -> dict:
    ck, build, out = root / "ck", root / "build", root / "bench"
    mods = ["--modalities", *modalities]
    new = measure([*PY, "new", "--preset", preset, *mods, "--dtype", args.dtype, "--out", str(ck), "--quiet"])
    ck_facts = checkpoint_facts(ck)
    export = measure([*PY, "export", str(ck), "--out", str(build), "--precision", args.precision, "--quiet"])
    manifest = json.loads((build / "manifest.json").read_text())
    comps = manifest["components"]
    largest = max(comps, key=lambda c: comps[c]["artifacts"]["onnx"]["bytes"])
    decoder_bytes = comps["decoder"]["artifacts"]["onnx"]["bytes"]
    facts = {
        "preset": preset, "modalities": modalities, "dtype": args.dtype, "precision": args.precision, **ck_facts,
        "new": {"seconds": new.seconds, "peak_mb": new.peak_pss_mb},
        "export": {"seconds": export.seconds, "peak_mb": export.peak_pss_mb,
                   "largest_component": largest, "largest_component_bytes": comps[largest]["artifacts"]["onnx"]["bytes"],
                   "peak_over_largest": round(export.peak_pss_mb * 2 ** 20 / comps[largest]["artifacts"]["onnx"]["bytes"], 2),
                   "component_seconds": {c: v["export_seconds"] for c, v in comps.items()},
                   "processes": {c: v.get("export_process") for c, v in comps.items()},
                   "parity": {c: {"passed": v["parity"]["passed"], "reference": v["parity"].get("reference"),
                                  "scope": v["parity"].get("scope", "full depth"),
                                  "max_abs": max(o["max_abs"] for o in v["parity"]["outputs"].values())}
                              for c, v in comps.items()}},
        "build_bytes": _dir_bytes(build), "decoder_bytes": decoder_bytes, "latency": {}, "generation": {},
    }
    if not args.latency:
        shutil.rmtree(ck)
        return facts
    bench_cmd = [*PY, "bench", str(build), "--backends", "torch,onnxruntime", "--batch", args.batch,
                 "--repeat", str(args.repeat), "--warmup", "1", "--modalities", ",".join(modalities),
                 "--gen-tokens", "4", "--decode-tokens", str(args.decode_tokens), "--out", str(out), "--quiet"]
    run = measure(bench_cmd)  # (its torch backend loads the checkpoint the build names)
    shutil.rmtree(ck)  # disk: base is 4.4 GB per copy
    bench = json.loads((out / "bench.json").read_text())
    gen = {}
    for backend, g in bench.get("generation", {}).items():
        step_ms = g["decode_step"]["median_ms"]
        gen[backend] = {"ttft_ms": round(g["ttft"]["median_ms"], 2), "decode_step_ms": round(step_ms, 3),
                        "tokens_per_s": g["tokens_per_s"],
                        "achieved_gbs": round(decoder_bytes / (step_ms / 1e3) / 1e9, 2) if step_ms else None}
    latency = {m: {b: {n: _stage_medians(bench, m, b, n) for n in ("torch", "onnxruntime")}
                   for b in _csv(args.batch)} for m in modalities}
    return {**facts, "bench_seconds": run.seconds, "bench_peak_mb": run.peak_pss_mb, "latency": latency,
            "generation": gen}


def int8_demo(root: Path, args: argparse.Namespace) -> dict:
    """The trained demo checkpoint exported fp32 and int8: speed (onnxruntime, batch 1 and 8) and eval."""
    from importlib.resources import files

    checkpoint = Path(str(files("allspark.demo") / "checkpoint"))  # (bench sits below demo: no import)
    out: dict = {"quantizer": "onnxruntime.quantization.quantize_dynamic (int8 MatMul/Gemm weights, "
                              "activations quantized per call)"}
    builds = {}
    for prec in ("fp32", "int8"):
        b = root / f"demo-{prec}"
        m = measure([*PY, "export", str(checkpoint), "--out", str(b), "--precision", prec, "--quiet"])
        builds[prec] = b
        ev = root / f"eval-{prec}.json"
        measure([*PY, "eval", "--build", str(b), "--n", str(args.eval_n), "--json", str(ev)])
        out[prec] = {"export_seconds": m.seconds, "build_bytes": _dir_bytes(b), "eval": json.loads(ev.read_text())}
    bench_out = root / "bench-int8"
    measure([*PY, "bench", str(builds["fp32"]), "--backends", "onnxruntime,onnxruntime-int8", "--batch", "1,8",
             "--repeat", str(args.repeat), "--warmup", "1", "--gen-tokens", "4", "--out", str(bench_out), "--quiet"])
    bench = json.loads((bench_out / "bench.json").read_text())
    out["latency_total_ms"] = {m: {b: {n: round(v["total"]["median_ms"], 3) for n, v in by_n.items()}
                                   for b, by_n in by_b.items()} for m, by_b in bench["latency"].items()}
    return out


def paper_rows(ckpt: Path, root: Path, args: argparse.Namespace) -> dict:
    """The whole paper AllSpark (an existing checkpoint: `allspark new --preset paper --dtype fp16`),
    exported per precision, loaded, every modality answered (bench/paper.py); each build is deleted
    after its row (disk)."""
    from .paper import paper_row

    out: dict = {"checkpoint": str(ckpt), **checkpoint_facts(ckpt), "rows": {}, "failed": {}}
    for prec in _csv(args.paper_precisions):
        print(f"[scale] paper {prec} ...", flush=True)
        build = (Path(args.work) if args.keep_builds else root) / f"paper-{prec}" / "build"
        shutil.rmtree(build.parent, ignore_errors=True)
        build.parent.mkdir(parents=True, exist_ok=True)
        try:
            out["rows"][prec] = paper_row(ckpt, build, prec, args.repeat, args.decode_tokens)
        except RuntimeError as e:
            out["failed"][prec] = str(e)
        if not args.keep_builds:
            shutil.rmtree(build.parent, ignore_errors=True)
    return out


def render(out: Path, result: dict) -> list[Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot = _plot(result, out.with_suffix(".png"))
    out.with_suffix(".md").write_text(markdown(result, plot.name if plot else None))
    return [out, out.with_suffix(".md"), *([plot] if plot else [])]


def run(args: argparse.Namespace) -> int:
    if args.render:  # the report again from a JSON (e.g. after merging a paper run into it)
        files = render(Path(args.out), json.loads(Path(args.render).read_text()))
        print("wrote " + ", ".join(map(str, files)))
        return 0
    presets, modalities = _csv(args.presets), _csv(args.modalities)
    result: dict = {"kind": "allspark-bench-scale", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "machine": machine_info(), "bandwidth": memory_bandwidth_gbs(), "presets": {}, "failed": {}}
    work = Path(args.work) if args.work else None
    if work:
        work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="allspark-bench-scale-", dir=work) as tmp:
        for p in presets:
            print(f"[scale] {p} ...", flush=True)
            try:
                result["presets"][p] = scale_one(p, modalities, Path(tmp) / p, args)
            except RuntimeError as e:  # e.g. out of memory: recorded, the other presets still run
                result["failed"][p] = str(e)
            shutil.rmtree(Path(tmp) / p, ignore_errors=True)
        if args.int8:
            print("[scale] int8 ...", flush=True)
            result["int8"] = int8_demo(Path(tmp), args)
        if args.paper:
            result["paper"] = paper_rows(Path(args.paper), Path(tmp), args)
            for row in result["paper"]["rows"].values():  # kept with the row: rows of runs merged later
                row.setdefault("bandwidth", result["bandwidth"])
                row.setdefault("started", result["started"])
    result["bandwidth_after"] = memory_bandwidth_gbs()
    print("wrote " + ", ".join(map(str, render(Path(args.out), result))))
    return 0


def _parity(e: dict) -> str:
    p = e.get("parity")
    if not p:
        return ""
    ok = all(c["passed"] for c in p.values())
    return f"{'passed' if ok else 'FAILED'} (max abs {max(c['max_abs'] for c in p.values()):.1e})"


def _gb(x: float) -> str:
    """Bytes as GB, or MB below 1 GB (tiny's graphs are kilobytes)."""
    return f"{x / 1e9:.2f} GB" if x >= 1e9 else f"{x / 1e6:.1f} MB"


def markdown(r: dict, plot: str | None) -> str:
    m, bw = r["machine"], r["bandwidth"]
    P = r["presets"]
    lines = ["# Scale: cost against model size", "",
             f"Run {r['started']} on **{m['cpu']}**, {m['cores']} cores, GPU: {m['gpu']}; torch {m['torch']}, "
             f"onnxruntime {m['onnxruntime']}; load average at start {m['load_average']}. Host memory bandwidth "
             f"measured in this run: read {bw['read_gbs']} GB/s, copy {bw['copy_gbs']} GB/s (after: "
             f"{r['bandwidth_after']['read_gbs']} / {r['bandwidth_after']['copy_gbs']}). Every command ran in a fresh "
             "process; peak memory is the proportional set size of its whole process tree (a forked exporter "
             "included), sampled every 50 ms (less often on big processes).", "",
             "## Size, `new` and `export`", "",
             "| preset | modalities | parameters | checkpoint | build | `new` s | `new` peak | `export` s "
             "| `export` peak | largest component | export peak / largest | parity |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p, x in P.items():
        e = x["export"]
        lines.append(f"| {p} | {', '.join(x['modalities'])} | {x['parameters'] / 1e6:,.1f}M | {_gb(x['bytes'])} | "
                     f"{_gb(x['build_bytes'])} | {x['new']['seconds']:.1f} | {_gb(x['new']['peak_mb'] * 2 ** 20)} | "
                     f"{e['seconds']:.1f} | {_gb(e['peak_mb'] * 2 ** 20)} | {e['largest_component']} "
                     f"({_gb(e['largest_component_bytes'])}) | {e['peak_over_largest']} | {_parity(e)} |")
    checks = [(p, x["export"]["parity"]["decoder"]) for p, x in P.items() if "decoder" in x["export"].get("parity", {})]
    if checks:
        lines += ["", "What the decoder's parity checked (recorded in each build's manifest; `allspark verify` repeats it):", ""]
        lines += [f"- **{p}**: {c.get('scope', 'full depth')}, against {c['reference']}." for p, c in checks]
    lines += ["", "## Latency per stage (median ms): torch eager vs onnxruntime", "",
              "| preset | modality | batch | backend | " + " | ".join(STAGE_COLS) + " |",
              "|---|---|---|---|" + "---|" * len(STAGE_COLS)]
    for p, x in P.items():
        for mod, by_b in x["latency"].items():
            for b, by_n in by_b.items():
                for n, st in by_n.items():
                    lines.append(f"| {p} | {mod} | {b} | {n} | " + " | ".join(
                        f"{st[s]:.2f}" if s in st else "" for s in STAGE_COLS) + " |")
    lines += ["", "## Decoder: time to first token, decode (batch 1, KV cache)", "",
              "| preset | backend | decoder graph | TTFT ms | decode step ms | tokens/s | achieved GB/s "
              "| of measured read bandwidth |", "|---|---|---|---|---|---|---|---|"]
    for p, x in P.items():
        for n, g in x["generation"].items():
            frac = f"{100 * g['achieved_gbs'] / bw['read_gbs']:.0f}%" if g["achieved_gbs"] else ""
            lines.append(f"| {p} | {n} | {_gb(x['decoder_bytes'])} | {g['ttft_ms']:.1f} | {g['decode_step_ms']:.2f} | "
                         f"{g['tokens_per_s']} | {g['achieved_gbs']} | {frac} |")
    if r.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in r["notes"]]
    if r["failed"]:
        lines += ["", "## Did not run", ""] + [f"- **{p}**: {e}" for p, e in r["failed"].items()]
    if "int8" in r:
        lines += _int8_lines(r["int8"])
    if "paper" in r:
        lines += _paper_lines(r["paper"], bw)
    if plot:
        lines += ["", f"![cost against parameter count]({plot})"]
    lines += ["", "Reproduce: `allspark bench scale` (writes this file, its JSON and the plot); `--render JSON` "
              "rewrites them from a JSON.", ""]
    return "\n".join(lines)


STAGE_COLS = ("preprocess", "encoder", "bridge", "embed", "decoder", "head", "generate", "total")


def _int8_lines(q: dict) -> list[str]:
    lines = ["", "## int8 (the trained demo checkpoint)", "",
             f"Quantizer: {q['quantizer']} — onnxruntime's own, maintained with the runtime we ship; optimum's "
             "ORTQuantizer wraps the same call and adds a dependency.", "",
             f"Build size: fp32 {q['fp32']['build_bytes'] / 1e6:.1f} MB, int8 {q['int8']['build_bytes'] / 1e6:.1f} MB.", "",
             "| modality | batch | onnxruntime fp32 ms | onnxruntime int8 ms | speedup |", "|---|---|---|---|---|"]
    for m, by_b in q["latency_total_ms"].items():
        for b, v in by_b.items():
            a, c = v.get("onnxruntime"), v.get("onnxruntime-int8")
            lines.append(f"| {m} | {b} | {a} | {c} | {a / c:.2f}x |" if a and c else f"| {m} | {b} | {a} | {c} | |")
    lines += ["", "| modality | metric | fp32 | int8 | change |", "|---|---|---|---|---|"]
    for m, res in q["fp32"]["eval"].items():
        for k, v in res.items():
            if " (" in k:
                continue
            w = q["int8"]["eval"].get(m, {}).get(k)
            lines.append(f"| {m} | {k} | {v:.4g} | {w:.4g} | {w - v:+.3g} |" if w is not None else f"| {m} | {k} | {v:.4g} | | |")
    return lines


def _paper_lines(pp: dict, bw: dict) -> list[str]:
    lines = ["", "## The paper AllSpark, quantized (all ten modalities, 7B decoder with ten adapter sets)", "",
             f"Checkpoint `{pp['checkpoint']}`: {pp['parameters'] / 1e9:.2f} B parameters, {_gb(pp['bytes'])}.", "",
             "| precision | export s | export peak | largest component | peak / largest | build | resident: one text modality "
             "| resident: all ten | parity |", "|---|---|---|---|---|---|---|---|---|"]
    for prec, x in pp["rows"].items():
        e = x["export"]
        ok = all(c["passed"] for c in e["parity"].values())
        lines.append(f"| {prec} | {e['seconds']:.0f} | {_gb(e['peak_mb'] * 2 ** 20)} | {e['largest_component']} "
                     f"({_gb(e['largest_component_bytes'])}) | {e['peak_over_largest']} | {_gb(x['build_bytes'])} | "
                     f"{_gb(x['resident_mb']['text'] * 2 ** 20)} ({x['text_modality']}) | {_gb(x['resident_mb']['all'] * 2 ** 20)} | "
                     f"{'passed' if ok else 'FAILED'} (max rel {max(c['max_rel'] for c in e['parity'].values()):.2g}) |")
    for prec, x in pp["rows"].items():
        lines += ["", f"### {prec}: one request per modality (warm runtime, median ms per stage) and `allspark run`", "",
                  "| modality | " + " | ".join(STAGE_COLS) + " | `allspark run` s | run peak | answer |",
                  "|---|" + "---|" * len(STAGE_COLS) + "---|---|---|"]
        for m, run in x["run"].items():
            st = x.get("stages", {}).get(m, {})
            ans = x.get("answers", {}).get(m, "") or (f"run failed: {run['error'][-60:]}" if "error" in run else "")
            lines.append(f"| {m} | " + " | ".join(f"{st[s]:.0f}" if s in st else "" for s in STAGE_COLS) +
                         f" | {run.get('seconds', 0):.1f} | {_gb(run.get('peak_mb', 0) * 2 ** 20)} | {str(ans)[:80 if 'error' in run else 40]} |")
        if "stages_error" in x:
            lines += ["", f"The warm-runtime stages did not run: {x['stages_error']}"]
        mb = x.get("mixed_batch")
        if mb:
            lines += ["", f"Mixed batch of all ten modalities through `Runtime.predict_batch`: {mb['answered']} of "
                          f"{mb['rows']} answered in {mb['ms']:.0f} ms" + (f"; errors: {mb['errors']}" if mb["errors"] else ".")]
        g = x.get("generation", {}).get("onnxruntime")
        rb = x.get("bandwidth", bw)  # the bandwidth of the row's own run
        if g:
            lines += ["", f"Decode at batch 1 ({x['text_modality']}): TTFT {g['ttft_ms']:.0f} ms, decode step {g['decode_step_ms']:.1f} ms "
                          f"({g['tokens_per_s']} tokens/s), {_gb(x['decoder_bytes'])} of decoder weights read per step = "
                          f"{g['achieved_gbs']} GB/s, {100 * g['achieved_gbs'] / rb['read_gbs']:.0f}% of the "
                          f"{rb['read_gbs']} GB/s read bandwidth measured in the same run"
                          + (f" ({x['started'][:16].replace('T', ' ')})" if "started" in x else "") + "."]
    if pp["failed"]:
        lines += ["", "Did not run: " + "; ".join(f"{p}: {e}" for p, e in pp["failed"].items())]
    return lines


def _plot(r: dict, path: Path) -> Path | None:
    P = dict(r["presets"])
    for prec, x in r.get("paper", {}).get("rows", {}).items():  # the paper rows extend the curves to 7B
        P[f"paper-{prec}"] = {"parameters": r["paper"]["parameters"], "export": x["export"], "build_bytes": x["build_bytes"],
                              "new": {"seconds": float("nan")}, "generation": x.get("generation", {})}
    if not P:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vals = sorted(P.values(), key=lambda v: v["parameters"])  # (fp16 and fp32 presets interleave)
    x = [v["parameters"] / 1e6 for v in vals]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    series = [("export s", [v["export"]["seconds"] for v in vals], axes[0]),
              ("new s", [v["new"]["seconds"] for v in vals], axes[0]),
              ("export peak GB", [v["export"]["peak_mb"] / 1024 for v in vals], axes[1]),
              ("build GB", [v["build_bytes"] / 1e9 for v in vals], axes[1])]
    for n in ("torch", "onnxruntime"):
        series.append((f"{n} decode step ms", [v["generation"].get(n, {}).get("decode_step_ms") or float("nan")
                                               for v in vals], axes[2]))
        series.append((f"{n} TTFT ms", [v["generation"].get(n, {}).get("ttft_ms") or float("nan")
                                        for v in vals], axes[2]))
    for label, y, ax in series:
        pts = [(a, b) for a, b in zip(x, y) if b == b and b > 0]  # (runs without latency have none)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    for ax, title in zip(axes, ("time", "memory and size", "decoder latency (batch 1)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters (M)")
        ax.set_title(title)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def add_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("--presets", default="tiny,demo,base", help="comma-separated; paper needs ~30 GB (see the doc)")
    s.add_argument("--modalities", default="language,rgb")
    s.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="checkpoint dtype written by `new`")
    s.add_argument("--precision", choices=("fp32", "fp16"), default="fp32", help="of `allspark export`")
    s.add_argument("--no-latency", dest="latency", action="store_false",
                   help="new and export only (paper: torch eager at 7B on 2 cores would take hours)")
    s.add_argument("--batch", default="1,8")
    s.add_argument("--repeat", type=at_least(1), default=5)
    s.add_argument("--decode-tokens", type=at_least(2), default=16)
    s.add_argument("--eval-n", type=at_least(1), default=100, help="held-out samples per modality for int8's eval")
    s.add_argument("--no-int8", dest="int8", action="store_false")
    s.add_argument("--work", help="where the checkpoints and builds go (default: the system temp dir)")
    s.add_argument("--out", default="docs/benchmarks/scale.json", help="JSON; .md and .png beside it")
    s.add_argument("--render", metavar="JSON", help="only write the report (to --out) from this JSON")
    s.add_argument("--paper", metavar="CKPT", help="also the paper rows: this checkpoint (`allspark new --preset paper "
                   "--dtype fp16`, all ten modalities) exported per --paper-precisions and run (bench/paper.py)")
    s.add_argument("--paper-precisions", default="int4,int8")
    s.add_argument("--keep-builds", action="store_true", help="keep the paper builds under --work (default: "
                   "deleted after their row: 9-12 GB each)")
