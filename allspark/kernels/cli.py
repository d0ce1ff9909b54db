"""`allspark bench kernels`: fused attention kernel vs SDPA vs unfused math (GPU), or fused vs
unfused ONNX Runtime graphs (CPU), at the demo and paper presets' bridge and prefill shapes."""

from __future__ import annotations

import argparse


def cmd_bench_kernels(args: argparse.Namespace) -> int:
    from .bench import main

    return main(["--out", args.out, "--repeat", str(args.repeat), "--presets", *args.presets])


def register(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks (results written to files)")
    targets = bench.add_subparsers(dest="target", required=True)
    s = targets.add_parser("kernels", help="attention kernels at the presets' hot shapes")
    s.add_argument("--out", default="docs/benchmarks/kernels.json")
    s.add_argument("--repeat", type=int, default=20)
    s.add_argument("--presets", nargs="+", default=["demo", "paper"])
    s.set_defaults(func=cmd_bench_kernels)

    from ..bench.cli import register_build

    register_build(targets)
