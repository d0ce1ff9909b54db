"""`allspark new`: a checkpoint of random weights written in bounded memory.

The LLM is built on the meta device and its tensors are drawn one at a time as the shard writer asks
for them (transformers' LLaMA initialisation: N(0, 0.02) for projections and embeddings, ones for
RMSNorm weights), each from its own seeded generator, so a 7B LLM never exists in memory. Modality
packs (encoder, bridge, head and that modality's adapter set) are built one at a time, directly in
the requested dtype, from a generator seeded by (seed, modality) -- a pack's values do not depend on
which other modalities the checkpoint holds -- and released once written: peak is the largest pack
(the paper's RGB pack, EVA-g + bridge + adapters: 3.4 GB in fp16) plus one shard.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import zlib
from pathlib import Path

import torch
from tqdm import tqdm

from ..errors import ConfigError
from .adapters import StackedAdapter
from .checkpoint import default_dtype, write_checkpoint
from .config import AllSparkConfig
from .model import AllSpark, ModalityPack
from .presets import get_preset
from .skeleton import params_on_meta
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


def pack_seed(seed: int, modality: str) -> int:
    return seed * 1_000_003 + zlib.crc32(modality.encode())


def fresh_pack(cfg: AllSparkConfig, modality: str, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One modality's pack of random weights, in `dtype`: the modules' own initialisation, and an
    adapter set whose `up` projections are small random values (as build_model: each modality's set
    makes a difference)."""
    torch.manual_seed(pack_seed(seed, modality))
    H, r = cfg.llm.hidden_size, cfg.llm.adapter_size
    with default_dtype(dtype), torch.no_grad():  # born in the checkpoint's dtype: no cast copy
        state = dict(ModalityPack(cfg.modality(modality), cfg).state_dict())
        for k in range(len(cfg.llm.adapter_layers)):
            a = StackedAdapter(1, H, r)
            a.up_weight.normal_(0.0, 0.05)
            state.update({f"adapters.{k}.{name}": t.detach().clone() for name, t in a.lynx_state(0).items()})
    return state


def new_checkpoint(preset: str, out: str | Path, seed: int = 0, modalities: Sequence[str] | None = None,
                   dtype: str = "fp32", progress: bool = True) -> dict:
    """Write a random checkpoint of `preset` to `out` (atomically); returns what was written."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    dt = DTYPES[dtype]
    cfg = get_preset(preset, modalities)
    torch.manual_seed(seed)
    tok = train_tokenizer(cfg.llm.vocab_size, ())
    with default_dtype(dt), params_on_meta():  # shapes and names only: nothing here is written
        model = AllSpark(cfg, modalities, tokenizer=tok)
    packs = {m: (lambda m=m: fresh_pack(cfg, m, seed, dt)) for m in model.modalities}
    bar = tqdm(total=len(packs), desc="packs", unit="pack", disable=not progress, leave=False)
    return write_checkpoint(out, cfg, model.modalities, tok, model.llm.config,
                            _llm_tensors(model.llm, seed, dt, progress), packs, on_pack=lambda m: bar.update())
