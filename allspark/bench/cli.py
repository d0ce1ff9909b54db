"""`allspark bench BUILD`: the backends side by side; writes bench.json, REPORT.md and plots."""

from __future__ import annotations

import argparse


def _csv(s: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in s.split(",") if x.strip())


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


def register_build(targets) -> None:
    """Add the `build` target to `allspark bench` (`allspark bench BUILD` is routed here)."""
    s = targets.add_parser("build", help="a build's backends side by side (allspark bench BUILD)")
    s.add_argument("build")
    s.add_argument("--backends", default="torch,torch-compile,onnxruntime,onnxruntime-nofuse")
    s.add_argument("--modalities", default="", help="comma-separated; default: all in the build")
    s.add_argument("--batch", default="1,8,32")
    s.add_argument("--repeat", type=int, default=10)
    s.add_argument("--warmup", type=int, default=2)
    s.add_argument("--gen-tokens", type=int, default=8, help="new tokens per text request end to end")
    s.add_argument("--decode-tokens", type=int, default=32, help="tokens for time-to-first-token and tokens/s")
    s.add_argument("--threads", type=int, default=0)
    s.add_argument("--out", default="docs/benchmarks/latest")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_bench_build)
