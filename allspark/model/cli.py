"""`allspark info`, `allspark new` and `allspark convert`: checkpoints and presets."""

from __future__ import annotations

import argparse
import json
import logging

from ..commands import Command, at_least
from ..contract.checkpoint import is_checkpoint, read_checkpoint_manifest
from ..errors import AllSparkError
from ..fsutil import check_output_directory

log = logging.getLogger(__name__)


def _info_arguments(s: argparse.ArgumentParser) -> None:
    from .presets import preset_names

    s.add_argument("ckpt", nargs="?", help="checkpoint directory")
    s.add_argument("--preset", choices=preset_names(), help="count a preset instead (built on the meta device)")
    s.add_argument("--json", action="store_true")


def cmd_info(args: argparse.Namespace) -> int:
    if bool(args.preset) == bool(args.ckpt):  # argument errors first: no torch for a usage mistake
        raise AllSparkError("give exactly one of --preset P or a checkpoint directory (allspark info CKPT)")
    if args.ckpt:
        read_checkpoint_manifest(args.ckpt)
    from .counting import count_parameters, format_table

    if args.preset:
        import torch

        from .model import AllSpark
        from .presets import get_preset

        with torch.device("meta"):  # counting needs shapes only: `paper` builds in no memory
            model = AllSpark(get_preset(args.preset))
    else:
        from .skeleton import load_skeleton

        model, _ = load_skeleton(args.ckpt, verify=False)  # counting needs shapes only: no weights read
    counts = count_parameters(model)
    if args.json:
        print(json.dumps({"config": model.config.name, "modalities": counts}, indent=2))
    else:
        print(f"AllSpark {model.config.name}: {len(counts)} modalities")
        print(format_table(counts))
    return 0


def _new_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("--preset", default="tiny", choices=("tiny", "demo", "base", "paper"),
                   help="base: 1B-class (4.4 GB fp32 with language only); paper: 7B-class (13.5 GB fp16 with "
                        "language only). The LLM is streamed to disk: memory stays near the packs' size")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--modalities", nargs="*")
    s.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    s.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at --out")
    s.add_argument("--quiet", action="store_true")


def check_modalities(names: list[str] | None, preset: str | None = None) -> list[str] | None:
    """Registered modality names (and, given a preset, ones it defines), without importing torch."""
    from ..errors import ConfigError
    from .registry import resolve_modality, spec

    if not names:
        return names
    resolved = [resolve_modality(m) for m in names]
    missing = [m for m in resolved if preset and preset not in spec(m).presets]
    if missing:
        raise ConfigError(f"preset {preset!r} has no {', '.join(missing)} (a plug-in that defines no {preset!r} config)")
    return resolved


def cmd_new(args: argparse.Namespace) -> int:
    check_modalities(args.modalities, args.preset)  # argument errors before torch is imported
    replaced = check_output_directory(args.out, args.overwrite, is_checkpoint, "checkpoint")
    from ..memory import check
    from .fresh import new_checkpoint
    from .memory_plan import new_need

    check(new_need(args.preset, args.modalities, args.dtype))
    written = new_checkpoint(args.preset, args.out, seed=args.seed, modalities=args.modalities, dtype=args.dtype,
                             progress=not args.quiet)
    size = written["llm_bytes"] + sum(written["pack_bytes"].values())
    print(f"wrote {args.preset} checkpoint ({args.dtype}, {size / 1e9:.2f} GB) with random weights "
          f"(seed {args.seed}) to {args.out}" + (" (replaced the checkpoint that was there)" if replaced else ""))
    return 0


def _convert_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("--lynx", required=True, help="training checkpoint (.pt/.pth loaded weights-only, or .safetensors)")
    s.add_argument("--llm", required=True, help="transformers LLaMA/Vicuna directory of the base LLM (one file or shards)")
    s.add_argument("--modality", required=True)
    s.add_argument("--out", required=True, help="checkpoint directory (written atomically)")
    s.add_argument("--vision", help="the vision encoder's weights when the training checkpoint lacks them "
                                    "(EVA's eva_vit_g.pth layout, or Lynx's)")
    s.add_argument("--config", help="what weights cannot tell, as a JSON file or inline JSON: {encoder: {heads, "
                                    "image_size, mean, std}, bridge: {heads}, labels: [...], label_set}")
    s.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="default: each source's own dtype")
    s.add_argument("--shard-mb", type=at_least(1), default=1024, help="largest LLM shard written (and held in memory)")


def cmd_convert(args: argparse.Namespace) -> int:
    from .lynx import convert_lynx

    if args.shard_mb < 1:
        raise AllSparkError(f"--shard-mb: expected >= 1, got {args.shard_mb}")
    from ..memory import check
    from .memory_plan import convert_need

    check(convert_need(args.lynx, args.vision, args.shard_mb << 20))
    report = convert_lynx(args.lynx, args.llm, args.modality, args.out, vision=args.vision, config=args.config,
                          dtype=args.dtype, shard_bytes=args.shard_mb << 20)
    print(report.summary())
    print(f"wrote {args.out} (report: {args.out}/convert_report.json)")
    return 0


COMMANDS = (
    Command("info", "parameters per modality and component (the paper's Table XV)", _info_arguments, cmd_info),
    Command("new", "write a randomly initialised checkpoint of a preset", _new_arguments, cmd_new),
    Command("convert", "Lynx/AllSpark training checkpoint + base LLM dir -> checkpoint", _convert_arguments,
            cmd_convert),
)
