"""Fresh models from a preset: seeded weights and a tokenizer trained for the preset's vocabulary."""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from .model import AllSpark
from .presets import get_preset
from .tokenizer import train_tokenizer


def build_model(preset: str = "tiny", seed: int = 0, modalities: Sequence[str] | None = None,
                texts: Iterable[str] = (), identity_adapters: bool = False) -> AllSpark:
    """A randomly initialised AllSpark. Adapters' `up` projections are given small random values
    unless `identity_adapters`, so that tests see each modality's adapter set make a difference."""
    cfg = get_preset(preset)
    torch.manual_seed(seed)
    tok = train_tokenizer(cfg.llm.vocab_size, texts)
    model = AllSpark(cfg, modalities, tokenizer=tok)
    if not identity_adapters:
        with torch.no_grad():
            for a in model.adapters:
                a.up_weight.normal_(0.0, 0.05)
    return model
