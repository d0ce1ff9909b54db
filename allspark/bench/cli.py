"""`allspark bench` targets of this part: `build` (a build's backends side by side; `allspark bench
BUILD` is routed here) and `kernels` (attention kernels at the presets' hot shapes)."""

from __future__ import annotations

import argparse

from ..commands import Command, at_least


def _csv(s: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in s.split(",") if x.strip())


def _build_arguments(s: argparse.ArgumentParser) -> None:
    from .runner import default_backends

    s.add_argument("build")
    s.add_argument("--backends", default=",".join(default_backends()),
                   help="comma-separated backends and variants (-nofuse, -int8: a sibling build exported "
                        "--no-fuse, --precision int8)")
    s.add_argument("--modalities", default="", help="comma-separated; default: all in the build")
    s.add_argument("--batch", default="1,8,32")
    s.add_argument("--repeat", type=at_least(1), default=10)
    s.add_argument("--warmup", type=at_least(0), default=2)
    s.add_argument("--gen-tokens", type=at_least(1), default=8, help="new tokens per text request end to end")
    s.add_argument("--decode-tokens", type=at_least(2), default=32, help="tokens for time-to-first-token and tokens/s")
    s.add_argument("--threads", type=at_least(0), default=0)
    s.add_argument("--out", default="docs/benchmarks/latest")
    s.add_argument("--quiet", action="store_true")


def cmd_bench_build(args: argparse.Namespace) -> int:
    from .report import write_report
    from .runner import BenchConfig, run_bench

    cfg = BenchConfig(backends=_csv(args.backends), modalities=_csv(args.modalities or ""),
                      batches=tuple(int(b) for b in _csv(args.batch)), repeat=args.repeat,
                      warmup=args.warmup, gen_tokens=args.gen_tokens, decode_tokens=args.decode_tokens,
                      threads=args.threads)
    result = run_bench(args.build, cfg, progress=not args.quiet)
    files = write_report(result, args.out)
    for name, t in result["targets"].items():
        v = t.get("median_speedup", t.get("speedup"))
        print(f"{name}: {v}x (target {t['target']}x) {'met' if t['met'] else 'MISSED'}")
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


BENCH_TARGETS = (
    Command("build", "a build's backends side by side (allspark bench BUILD)", _build_arguments, cmd_bench_build),
    Command("kernels", "attention kernels at the presets' hot shapes", "allspark.bench.kernels:add_arguments",
            "allspark.bench.kernels:run"),
    Command("decode", "one LLM decode step each way it can run (host/device cache, eager/compiled/CUDA graphs)",
            "allspark.bench.decode:add_arguments", "allspark.bench.decode:run"),
    Command("convert", "peak memory of `allspark convert` on a multi-GB base LLM",
            "allspark.bench.convert:add_arguments", "allspark.bench.convert:run"),
    Command("scale", "cost against model size: new/export time and memory, latency, decode GB/s, int8 (tiny..base)",
            "allspark.bench.scale:add_arguments", "allspark.bench.scale:run"),
    Command("adapters", "per-row adapter sets: grouped (MoE) vs gathered vs shared vs none, against the ideal",
            "allspark.bench.adapters:add_arguments", "allspark.bench.adapters:run"),
    Command("agreement", "a quantized build's answers against a reference build's, per modality (top-1, relative "
            "error, first token and its KL)", "allspark.bench.agreement:add_arguments", "allspark.bench.agreement:run"),
)
