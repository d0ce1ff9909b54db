"""`allspark demo` (the embedded default end to end) and `allspark eval` (its held-out metrics)."""

from __future__ import annotations

import argparse

from ..commands import Command


def _demo_arguments(s: argparse.ArgumentParser) -> None:
    from ..runtime.backend import backend_names

    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--backend", choices=backend_names(), default="onnxruntime")


def cmd_demo(args: argparse.Namespace) -> int:
    from .run import STAGES, run_demo

    result = run_demo(seed=args.seed, backend=args.backend)
    print(f"AllSpark demo: {result['what']}; backend {args.backend}; build {result['build']}")
    header = f"{'modality':<12} {'prediction':<30} {'truth':<30}" + "".join(f"{s:>9}" for s in STAGES)
    print(header + "   (ms)")
    print("-" * len(header))
    for r in result["rows"]:
        t = r["timings_ms"]
        print(f"{r['modality']:<12} {r['prediction'][:30]:<30} {r['truth'][:30]:<30}"
              + "".join(f"{t.get(s, 0.0):>9.2f}" for s in STAGES))
    return 0


COMMANDS = (
    Command("demo", "one held-out sample per modality on the embedded default", _demo_arguments, cmd_demo),
    Command("eval", "metrics of a checkpoint on held-out synthetic data (paper's terms)",
            "allspark.demo.evaluate:add_arguments", "allspark.demo.evaluate:run"),
)
