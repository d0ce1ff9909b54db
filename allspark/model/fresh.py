"""`allspark new`: a checkpoint of random weights written in bounded memory.

The LLM is built on the meta device and its tensors are drawn one at a time as the shard writer asks
for them (transformers' LLaMA initialisation: N(0, 0.02) for projections and embeddings, ones for
RMSNorm weights), each from its own seeded generator, so a 7B LLM never exists in memory: peak is
the modality packs plus one shard. Packs are built directly in the requested dtype.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from ..errors import ConfigError
from .checkpoint import default_dtype, pack_state, write_checkpoint
from .model import AllSpark
from .presets import get_preset
from .tokenizer import train_tokenizer

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
INIT_STD = 0.02  # LlamaConfig.initializer_range


def llm_tensor(name: str, shape: Sequence[int], index: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """One LLM tensor as transformers initialises it; drawn in fp32 from generator (seed, index), so
    the fp16 and fp32 checkpoints of one seed hold the same values up to rounding."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return torch.empty(shape).normal_(0.0, INIT_STD, generator=g).to(dtype)


def _llm_tensors(meta_llm: torch.nn.Module, seed: int, dtype: torch.dtype,
                 progress: bool) -> Iterator[tuple[str, int, object]]:
    state = meta_llm.state_dict()
    item = torch.empty((), dtype=dtype).element_size()
    for i, (name, t) in enumerate(tqdm(state.items(), desc="llm", unit="tensor", disable=not progress, leave=False)):
        yield name, t.numel() * item, (lambda n=name, s=tuple(t.shape), i=i: llm_tensor(n, s, i, seed, dtype))


def new_checkpoint(preset: str, out: str | Path, seed: int = 0, modalities: Sequence[str] | None = None,
                   dtype: str = "fp32", progress: bool = True) -> dict:
    """Write a random checkpoint of `preset` to `out` (atomically); returns what was written."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    dt = DTYPES[dtype]
    cfg = get_preset(preset, modalities)
    torch.manual_seed(seed)
    tok = train_tokenizer(cfg.llm.vocab_size, ())
    with default_dtype(dt):  # packs and adapters are born in the checkpoint's dtype: no cast copy
        model = AllSpark(cfg, modalities, tokenizer=tok, llm_device="meta")
        with torch.no_grad():
            for a in model.adapters:  # as build_model: each modality's adapter set makes a difference
                a.up_weight.normal_(0.0, 0.05)
    packs = {m: pack_state(model, m) for m in model.modalities}
    return write_checkpoint(out, cfg, model.modalities, tok, model.llm.config,
                            _llm_tensors(model.llm, seed, dt, progress), packs)
