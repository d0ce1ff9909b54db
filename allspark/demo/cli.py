"""`allspark eval [CKPT]`: held-out metrics of a checkpoint on the synthetic demo tasks."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import DEFAULT_CHECKPOINT


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from ..model.checkpoint import load_checkpoint
    from .evaluate import evaluate, markdown_table, quality_bar

    if args.threads:
        torch.set_num_threads(args.threads)
    results = evaluate(load_checkpoint(args.ckpt), args.n, args.seed, args.modalities)
    met = [m for m, res in results.items() if quality_bar(m, res)[1]]
    print(f"quality bar met by {len(met)} of {len(results)} modalities"
          + (f"; missed: {', '.join(m for m in results if m not in met)}" if len(met) < len(results) else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(markdown_table(results, args.n, args.seed))
    return 0


def add_arguments(s: argparse.ArgumentParser) -> None:
    from .evaluate import EVAL_SEED

    s.add_argument("ckpt", nargs="?", default=str(DEFAULT_CHECKPOINT),
                   help="checkpoint directory (default: the embedded demo checkpoint)")
    s.add_argument("--n", type=int, default=200, help="held-out samples per modality")
    s.add_argument("--seed", type=int, default=EVAL_SEED, help="seed of the held-out set")
    s.add_argument("--modalities", nargs="*", help="only these modalities")
    s.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    s.add_argument("--json", help="also write the metrics as JSON here")
    s.add_argument("--markdown", help="also write a markdown table here")
    s.set_defaults(func=cmd_eval)


def register(subparsers) -> None:
    add_arguments(subparsers.add_parser("eval", help="metrics of a checkpoint on held-out synthetic data (paper's terms)"))
