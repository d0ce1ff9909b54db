"""The `allspark` command line. Each subcommand is a small function; heavy imports happen inside."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import AllSparkError


def _load_model(args: argparse.Namespace):
    from .model.checkpoint import load_checkpoint
    from .model.config import get_preset

    if args.preset:
        import torch

        from .model.model import AllSpark
        with torch.device("meta"):  # counting needs shapes only: `paper` builds in no memory
            return AllSpark(get_preset(args.preset))
    return load_checkpoint(args.ckpt, verify=False)


def cmd_info(args: argparse.Namespace) -> int:
    from .model.counting import count_parameters, format_table

    if bool(args.preset) == bool(args.ckpt):
        raise AllSparkError("give exactly one of --preset P or a checkpoint directory")
    model = _load_model(args)
    counts = count_parameters(model)
    if args.json:
        print(json.dumps({"config": model.config.name, "modalities": counts}, indent=2))
    else:
        print(f"AllSpark {model.config.name}: {len(counts)} modalities")
        print(format_table(counts))
    return 0


def cmd_new(args: argparse.Namespace) -> int:
    from .model.checkpoint import save_checkpoint
    from .model.factory import build_model

    model = build_model(args.preset, seed=args.seed, modalities=args.modalities)
    out = save_checkpoint(model, args.out)
    print(f"wrote {args.preset} checkpoint with random weights (seed {args.seed}) to {out}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .model.checkpoint import save_checkpoint
    from .model.lynx import import_lynx

    model, report = import_lynx(args.lynx, args.llm, args.modality, preset=args.preset,
                                allow_missing=args.allow_missing)
    print(report.summary())
    if model.tokenizer is None:
        print("note: no tokenizer files in the --llm directory; the checkpoint has no tokenizer")
    out = save_checkpoint(model, args.out, extra={"imported_from": {"lynx": str(args.lynx), "llm": str(args.llm),
                                                                    "missing": report.missing}})
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="allspark", description="AllSpark inference runtime")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="parameters per modality and component (the paper's Table XV)")
    s.add_argument("ckpt", nargs="?", help="checkpoint directory")
    s.add_argument("--preset", choices=("tiny", "demo", "paper"), help="count a preset instead (built on the meta device)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("new", help="write a randomly initialised checkpoint of a preset")
    s.add_argument("--preset", default="tiny", choices=("tiny", "demo"))
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--modalities", nargs="*")
    s.set_defaults(func=cmd_new)

    s = sub.add_parser("convert", help="Lynx/AllSpark training checkpoint + base LLM dir -> checkpoint")
    s.add_argument("--lynx", required=True, help="training checkpoint (.pt/.pth loaded weights-only, or .safetensors)")
    s.add_argument("--llm", required=True, help="transformers LLaMA/Vicuna directory of the base LLM")
    s.add_argument("--modality", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--preset", default="paper", help="supplies what weights cannot tell: heads, labels")
    s.add_argument("--allow-missing", action="store_true",
                   help="keep missing weights (e.g. a task head Lynx lacks) freshly initialised")
    s.set_defaults(func=cmd_convert)

    for register in _extensions():
        register(sub)
    return p


def _extensions():
    """Subcommands contributed by the other parts (export, runtime, kernels, serving)."""
    import importlib

    for mod in ("allspark.kernels.cli", "allspark.export.cli", "allspark.runtime.cli", "allspark.demo.cli",
                "allspark.serving.cli"):
        try:
            yield importlib.import_module(mod).register
        except ModuleNotFoundError as e:
            if not (e.name and mod.startswith(e.name)):  # it exists, but a dependency is missing: say so
                raise


BENCH_TARGETS = ("kernels", "serve", "build", "-h", "--help")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) >= 2 and argv[0] == "bench" and argv[1] not in BENCH_TARGETS:
        argv.insert(1, "build")  # `allspark bench BUILD ...` is the build target
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except AllSparkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
