"""What `allspark new` and `allspark convert` hold at their peak, estimated before they start.

    new       the largest pack (built, then written from its own memory) or one LLM shard plus the
              tensor being drawn -- never both (packs are written first); measured on the paper's ten
              packs in fp16: 3.76 GB max RSS for a 3.35 GB RGB pack
    convert   the training checkpoint and the vision file, read whole (a state dict), plus one shard
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..memory import Need

BASE = 450_000_000  # python + torch + transformers before any weight
ITEMSIZE = {"fp32": 4, "fp16": 2, "bf16": 2}


def new_need(preset: str, modalities: Sequence[str] | None, dtype: str, shard_bytes: int = 1 << 30) -> Need:
    import torch

    from .model import AllSpark
    from .presets import get_preset

    cfg = get_preset(preset, modalities)
    with torch.device("meta"):
        model = AllSpark(cfg, modalities)
    size = ITEMSIZE[dtype]
    per_set = sum(p[0].numel() for a in model.adapters for p in a.parameters())
    packs = {m: (sum(p.numel() for p in pack.parameters()) + per_set) * size for m, pack in model.packs.items()}
    largest = max(packs.items(), key=lambda kv: kv[1])
    llm = min(shard_bytes, sum(p.numel() for p in model.llm.parameters()) * size) + max(
        p.numel() for p in model.llm.parameters()) * 4  # a tensor is drawn in fp32, then cast
    peak = max(int(largest[1] * 1.05), llm)
    what = f"the {largest[0]} pack in {dtype}" if peak != llm else "one LLM shard and the tensor being drawn"
    fits = [(f"--dtype {d}", new_need(preset, modalities, d, shard_bytes).bytes)
            for d in ("fp16",) if d != dtype and ITEMSIZE[d] < size]
    return Need("allspark new", BASE + peak, (("process", BASE), (what, peak)), tuple(fits))


def convert_need(lynx: str | Path, vision: str | Path | None, shard_bytes: int) -> Need:
    files = [Path(lynx)] + ([Path(vision)] if vision else [])
    held = sum(f.stat().st_size for f in files if f.is_file())
    return Need("allspark convert", BASE + held + shard_bytes,
                (("process", BASE), ("training checkpoint and vision weights, read whole", held),
                 ("one LLM shard", shard_bytes)),
                (("--shard-mb 256", BASE + held + (256 << 20)),) if shard_bytes > 256 << 20 else ())
