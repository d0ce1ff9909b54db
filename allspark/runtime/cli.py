"""`allspark run`: one request from a file through a build."""

from __future__ import annotations

import argparse
import json

from ..commands import Command, at_least


def _run_arguments(s: argparse.ArgumentParser) -> None:
    from .backend import backend_names

    s.add_argument("build")
    s.add_argument("--modality", required=True)
    s.add_argument("--input", required=True, help="PNG/JPEG, GeoTIFF, .npy, .npz, CSV, .ply/.xyz/.txt, or a text file")
    s.add_argument("--prompt", help="instead of the modality's first prompt")
    s.add_argument("--backend", choices=backend_names(), default="onnxruntime")
    s.add_argument("--threads", type=at_least(0), default=0, help="intra-op threads of the onnxruntime backend (0: its default)")
    s.add_argument("--beams", action="store_true", help="Lynx's beam search (5 beams, no-repeat 2-grams) instead of greedy")
    s.add_argument("--max-new-tokens", type=at_least(1), default=64)
    s.add_argument("--json", action="store_true")


def cmd_run(args: argparse.Namespace) -> int:
    from ..contract.manifest import read_manifest, require_modality
    from ..model.config import AllSparkConfig
    from ..model.readers import read_input
    from ..model.generation import GenerationConfig
    from ..model.registry import resolve_modality
    from .runtime import Runtime

    m = resolve_modality(args.modality)
    manifest = read_manifest(args.build)
    require_modality(manifest, m, args.build)  # mistakes in the arguments or the file before any session opens
    inputs = read_input(m, args.input, AllSparkConfig.from_dict(manifest["config"]).modality(m))
    # onnxruntime opens only this modality's components (and the shared ones): a ten-modality paper
    # build answers one modality in the memory of one
    options = {"threads": args.threads, "modalities": [m]} if args.backend == "onnxruntime" else {}
    rt = Runtime.load(args.build, backend=args.backend, **options)
    gen = GenerationConfig.lynx(max_new_tokens=args.max_new_tokens) if args.beams else \
        GenerationConfig(max_new_tokens=args.max_new_tokens)
    print_prediction(m, rt.predict(m, inputs, prompt=args.prompt, generation=gen), args.json)
    return 0


def print_prediction(m: str, p, as_json: bool) -> None:
    """What `allspark run` (and `allspark client`) print for one prediction."""
    if as_json:
        print(json.dumps(p.to_json(), indent=2))
        return
    if p.label is not None:
        top = sorted(p.scores.items(), key=lambda kv: -kv[1])[:3]
        print(f"{m}: {p.label}   (top-3: {', '.join(f'{k} {v:.3f}' for k, v in top)})")
    elif p.text is not None:
        print(f"{m}: {p.text}")
    else:
        print(f"{m}: {p.describe_values()}")
    print("timings (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in p.timings_ms.items()))


COMMANDS = (Command("run", "run one request from a file through a build", _run_arguments, cmd_run),)
