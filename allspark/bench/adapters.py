"""`allspark bench adapters`: per-row adapter sets in the exported decoder, grouped vs gathered.

For each model size — the paper's (ONE LLaMA-7B decoder layer with its adapter, 10 sets of
4096->2048->4096, random weights) and the `demo` decoder (4 layers, 10 sets) — the decoder is
exported four ways and run on ONNX Runtime, repetitions interleaved:

    none      no adapter                        the floor
    shared    one adapter set for every row     the lower bound for any adapter
    gather    each row gathers its set          today's pattern (`--adapter-impl gather`)
    moe       com.microsoft.MoE, top-1          grouped: each distinct set's weights read once

at batch sizes x distinct sets in the batch, for a decode step (one new token after `past` cached)
and a prefill. Decode steps are memory-bound, so each is compared with its ideal: the bytes it must
read (the layer's weights, the distinct sets' adapter weights, the KV cache) over a bandwidth
measured in the same run (a GEMV on ONNX Runtime). Also: what a user would otherwise deploy, ten
single-modality decoders with the batch split by set (the sum of `shared` at each split).
Writes JSON, Markdown and a plot.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from ..contract import tensors as C
from ..model.adapters import StackedAdapter, attach_adapters, exported_adapters
from ..model.config import LLMConfig
from ..onnxrt import session

IMPLS = ("none", "shared", "gather", "moe")


@dataclass(frozen=True)
class Dims:
    name: str
    hidden: int
    heads: int
    intermediate: int
    layers: int
    adapter_size: int
    sets: int = 10
    vocab: int = 256  # the layer is what is measured: a small vocabulary keeps lm_head out of it
    past: int = 128  # cached positions in a decode step
    prefill: int = 32  # tokens per row in a prefill


PAPER = Dims("paper: one decoder layer", 4096, 32, 11008, 1, 2048, prefill=16)
DEMO = Dims("demo decoder", 128, 4, 344, 4, 64, vocab=1024)


def _llm_config(d: Dims) -> LLMConfig:
    return LLMConfig(vocab_size=d.vocab, hidden_size=d.hidden, num_layers=d.layers, num_heads=d.heads,
                     intermediate_size=d.intermediate, adapter_size=d.adapter_size, adapter_freq=1,
                     max_position_embeddings=4096)


def export_variant(d: Dims, impl: str, out: Path) -> Path:
    """The decoder of `d` with its adapters computed as `impl`, exported to `out/<impl>.onnx`."""
    from transformers import LlamaForCausalLM

    from ..export.onnx_export import export_component
    from ..export.specs import decoder_spec
    from ..model.model import llama_config

    cfg = _llm_config(d)
    torch.manual_seed(0)
    llm = LlamaForCausalLM(llama_config(cfg)).eval()
    sets = 1 if impl == "shared" else d.sets
    adapters = torch.nn.ModuleList(StackedAdapter(sets, d.hidden, d.adapter_size) for _ in cfg.adapter_layers)
    with torch.no_grad():
        for a in adapters:
            a.up_weight.normal_(0, 0.02)
    if impl != "none":
        attach_adapters(llm.model.layers, adapters, cfg.adapter_layers)
    model = SimpleNamespace(llm=llm, adapters=adapters, config=SimpleNamespace(llm=cfg),
                            modalities=tuple(range(sets)))
    path = out / f"{impl}.onnx"
    with exported_adapters("gather" if impl == "gather" else "moe"):
        export_component(decoder_spec(model), path)
    return path


def _feed(d: Dims, batch: int, sets: int, decode: bool, num_sets: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch * 31 + sets)
    seq, past = (1, d.past) if decode else (d.prefill, 0)
    kv = (batch, d.heads, past, d.hidden // d.heads)
    feed = {C.INPUTS_EMBEDS: rng.normal(size=(batch, seq, d.hidden)).astype(np.float32),
            C.ATTENTION_MASK: np.ones((batch, past + seq), np.int64),
            C.POSITION_IDS: np.tile(np.arange(past, past + seq), (batch, 1)),
            C.ADAPTER_IDS: (np.arange(batch) % sets if num_sets > 1 else np.zeros(batch)).astype(np.int64)}
    feed.update({n: rng.normal(size=kv).astype(np.float32) for n in C.past_names(d.layers)})
    return feed


def bandwidth_gbs(repeat: int = 7) -> float:
    """Streaming read bandwidth as ONNX Runtime achieves it: a GEMV over 256 MB of weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    k, n = 8192, 8192
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(k, n)).astype(np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "gemv",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], [w])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gemv.onnx"
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8  # what every onnxruntime reads
        onnx.save(model, str(path))
        s = session(path)
        x = np.ones((1, k), np.float32)
        s.run(None, {"x": x})
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            s.run(None, {"x": x})
            times.append(time.perf_counter() - t0)
    return k * n * 4 / statistics.median(times) / 1e9


def _ideal_ms(d: Dims, batch: int, sets: int, gbs: float) -> float:
    """Bytes a decode step must read (layer weights, distinct adapter sets, KV cache) / bandwidth."""
    H, I = d.hidden, d.intermediate
    layer = d.layers * (4 * H * H + 3 * H * I + 2 * H) * 4
    adapter = d.layers * sets * (2 * H * d.adapter_size + d.adapter_size + 3 * H + 1) * 4
    kv = d.layers * 2 * batch * d.past * H * 4
    return (layer + adapter + kv) / (gbs * 1e9) * 1e3


def measure(d: Dims, batches: tuple[int, ...], set_counts: tuple[int, ...], repeat: int, gbs: float,
            progress: bool) -> dict[str, Any]:
    from tqdm import tqdm

    with tempfile.TemporaryDirectory(prefix="allspark-bench-adapters-") as tmp:
        graphs = {impl: session(export_variant(d, impl, Path(tmp))) for impl in
                  tqdm(IMPLS, desc=f"export {d.name}", disable=not progress, leave=False)}
        wants = {impl: {i.name for i in g.get_inputs()} for impl, g in graphs.items()}  # `none` has no adapter_ids
        cases = [(phase, b, s) for phase in ("decode", "prefill") for b in batches for s in set_counts
                 if s <= b and not (phase == "prefill" and d.hidden >= 4096 and b > 8)]
        rows = []
        for phase, b, s in tqdm(cases, desc=f"run {d.name}", disable=not progress, leave=False):
            feeds = {impl: {k: v for k, v in _feed(d, b, 1 if impl == "shared" else s, phase == "decode",
                                                    1 if impl == "shared" else d.sets).items() if k in wants[impl]}
                     for impl in IMPLS}
            samples: dict[str, list[float]] = {impl: [] for impl in IMPLS}
            for rep in range(repeat + 1):  # the first round warms up
                for impl in IMPLS[rep % len(IMPLS):] + IMPLS[: rep % len(IMPLS)]:
                    t0 = time.perf_counter()
                    graphs[impl].run([C.LAST_HIDDEN_STATE], feeds[impl])
                    if rep:
                        samples[impl].append(1e3 * (time.perf_counter() - t0))
            row = {"phase": phase, "batch": b, "sets": s, **{impl: round(statistics.median(v), 3) for impl, v in samples.items()}}
            if phase == "decode":
                row["ideal"] = round(_ideal_ms(d, b, s, gbs), 3)
            rows.append(row)
        # ten single-modality decoders: the batch split by set, each part through the shared graph
        split_sizes = sorted({-(-r["batch"] // r["sets"]) for r in rows} | {r["batch"] // r["sets"] for r in rows} - {0})
        shared: dict[tuple[str, int], float] = {}
        for phase in ("decode", "prefill"):
            for n in split_sizes:
                if phase == "prefill" and d.hidden >= 4096 and n > 8:
                    continue
                feed = {k: v for k, v in _feed(d, n, 1, phase == "decode", 1).items() if k in wants["shared"]}
                graphs["shared"].run([C.LAST_HIDDEN_STATE], feed)
                times = []
                for _ in range(repeat):
                    t0 = time.perf_counter()
                    graphs["shared"].run([C.LAST_HIDDEN_STATE], feed)
                    times.append(1e3 * (time.perf_counter() - t0))
                shared[(phase, n)] = statistics.median(times)
        for r in rows:
            parts = [r["batch"] // r["sets"] + (1 if k < r["batch"] % r["sets"] else 0) for k in range(r["sets"])]
            r["split_decoders"] = round(sum(shared[(r["phase"], n)] for n in parts), 3)
    return {"dims": asdict(d), "rows": rows}


def targets(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's goals: grouped >= 2.5x gather at batch 32; grouped within 1.3x of the ideal at batch >= 8."""
    out = {}
    for key, r in result["sizes"].items():
        dec = [x for x in r["rows"] if x["phase"] == "decode"]
        at32 = [x for x in dec if x["batch"] == 32]
        if at32:
            worst = min(x["gather"] / x["moe"] for x in at32)
            out[f"{key}: moe vs gather at batch 32"] = {"speedup": round(worst, 2), "target": 2.5, "met": worst >= 2.5}
        big = [x for x in dec if x["batch"] >= 8]
        if big:
            ratio = max(x["moe"] / x["ideal"] for x in big)
            out[f"{key}: moe vs memory-bound ideal, batch >= 8"] = {"ratio": round(ratio, 2), "target": 1.3,
                                                                    "met": ratio <= 1.3}
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = ["# Per-row adapter sets: grouped (MoE) vs gathered", "",
             (f"ONNX Runtime {result['onnxruntime']} on {result['machine']}, medians of {result['repeat']} interleaved "
             f"runs, milliseconds. Bandwidth measured in the same run (a 256 MB GEMV on ONNX Runtime): "
             f"{result['bandwidth_gbs']:.1f} GB/s. `ideal`: the bytes a decode step must read (layer weights, "
             "the distinct sets' adapters, the KV cache) at that bandwidth. `split`: ten single-modality "
             "decoders, the batch split by set."), "", "## Goals", ""]
    for name, t in result["targets"].items():
        v = t.get("speedup", t.get("ratio"))
        lines.append(f"- {name}: {v}x (target {'>=' if 'speedup' in t else '<='} {t['target']}x): "
                     f"{'met' if t['met'] else '**missed**'}")
    for r in result["sizes"].values():
        d = r["dims"]
        lines += ["", (f"## {d['name']} (hidden {d['hidden']}, {d['layers']} layer(s), {d['sets']} sets of "
                       f"{d['hidden']}->{d['adapter_size']})"), ""]
        for phase in ("decode", "prefill"):
            rows = [x for x in r["rows"] if x["phase"] == phase]
            if not rows:
                continue
            what = f"decode step, {d['past']} cached" if phase == "decode" else f"prefill, {d['prefill']} tokens per row"
            ideal = phase == "decode"
            lines += ["", f"### {what}", "",
                      "| batch | sets | none | shared | gather | moe | gather/moe | split |"
                      + (" ideal | moe/ideal |" if ideal else ""),
                      "|---|---|---|---|---|---|---|---|" + ("---|---|" if ideal else "")]
            for x in rows:
                cells = [x["batch"], x["sets"], x["none"], x["shared"], x["gather"], x["moe"],
                         f"{x['gather'] / x['moe']:.2f}", x["split_decoders"]]
                if ideal:
                    cells += [x["ideal"], f"{x['moe'] / x['ideal']:.2f}"]
                lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "![latency](adapters.png)", "", "Reproduce: `allspark bench adapters`.", ""]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(result["sizes"].items())
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4), squeeze=False)
    for ax, (key, r) in zip(axes[0], sizes):
        rows = [x for x in r["rows"] if x["phase"] == "decode"]
        most = max(x["sets"] for x in rows)
        rows = [x for x in rows if x["sets"] == min(most, x["batch"])]
        b = [x["batch"] for x in rows]
        for impl in (*IMPLS, "ideal", "split_decoders"):
            ax.plot(b, [x[impl] for x in rows], marker="o", label=impl)
        ax.set(xscale="log", yscale="log", xlabel="batch rows (distinct sets = min(batch, 10))", ylabel="ms",
               title=f"{r['dims']['name']}: decode step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_bench(sizes: dict[str, Dims], batches: tuple[int, ...], set_counts: tuple[int, ...], repeat: int,
              progress: bool = True) -> dict[str, Any]:
    import onnxruntime

    gbs = bandwidth_gbs()
    result = {"machine": platform.processor() or platform.machine(), "onnxruntime": onnxruntime.__version__,
              "repeat": repeat, "bandwidth_gbs": round(gbs, 2),
              "sizes": {k: measure(d, batches, set_counts, repeat, gbs, progress) for k, d in sizes.items()}}
    result["targets"] = targets(result)
    return result


def add_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("--out", default="docs/benchmarks/adapters.json", help="JSON; .md and .png are written beside it")
    s.add_argument("--sizes", default="paper,demo", help="comma-separated: paper (one 7B layer), demo (the demo decoder)")
    s.add_argument("--batch", default="1,8,32,64")
    s.add_argument("--sets", default="1,3,10")
    s.add_argument("--repeat", type=int, default=5)
    s.add_argument("--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError

    known = {"paper": PAPER, "demo": DEMO}
    names = [x for x in args.sizes.split(",") if x]
    if unknown := [x for x in names if x not in known]:
        raise ConfigError(f"--sizes: unknown {unknown}; expected some of {list(known)}")
    ints = lambda text: tuple(int(x) for x in text.split(",") if x)
    result = run_bench({n: known[n] for n in names}, ints(args.batch), ints(args.sets), args.repeat, not args.quiet)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    plot(result, out.with_suffix(".png"))
    for name, t in result["targets"].items():
        print(f"{name}: {t.get('speedup', t.get('ratio'))}x (target {t['target']}x) {'met' if t['met'] else 'MISSED'}")
    print(f"wrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")
    return 0
