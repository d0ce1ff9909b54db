"""Parity in slices: a reduced-depth twin of the decoder, for a decoder too big to check whole here.

The twin is the real model cut to its first `layers` decoder layers -- the same layer modules, so the
same weights, adapter hooks, embeddings, final norm and output projection -- exported by the same code
path as the full graph and checked against PyTorch (fp32) like any component. What it does not check
is the full graph's own numerics past those layers; the manifest says so (`parity.scope`).

Why it is needed: onnxruntime's CPU kernels compute fp16 MatMuls in fp32 through inserted Casts, so a
session of an fp16 graph holds an fp32 copy of every weight (the base decoder's 2.2 GB fp16 graph:
4.7 GB). A 7B fp16 decoder (13.5 GB) would need ~27 GB for its check on a 24 GB machine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from torch import nn

from ..model.model import AllSpark

DEFAULT_TWIN_LAYERS = 2
PARITY_MODES = ("auto", "full", "twin")


@contextlib.contextmanager
def reduced_depth(model: AllSpark, layers: int) -> Iterator[int]:
    """Within: `model` has only its first `layers` decoder layers (the same modules); yields how many."""
    llm = model.llm
    full_layers, full_n, full_cfg = llm.model.layers, llm.config.num_hidden_layers, model.config
    full_adapters = model.adapters
    keep = max(1, min(layers, full_n))
    llm.model.layers = nn.ModuleList(list(full_layers)[:keep])
    llm.config.num_hidden_layers = keep
    # only the adapter sets hooked onto kept layers: the twin's parameters are what it runs (the
    # paper's ten sets over 32 layers are 2.7 B parameters, 10.7 GB to materialize in fp32)
    model.adapters = nn.ModuleList(a for a, i in zip(full_adapters, full_cfg.llm.adapter_layers) if i < keep)
    model.config = replace(full_cfg, llm=replace(full_cfg.llm, num_layers=keep))
    try:
        yield keep
    finally:
        llm.model.layers = full_layers
        llm.config.num_hidden_layers = full_n
        model.adapters = full_adapters
        model.config = full_cfg


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (0 where there is none: the full check is then attempted)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def session_bytes(module: nn.Module) -> int:
    """What an onnxruntime CPU session of `module`'s graph holds: its weights in fp32 (see above)."""
    return sum(p.numel() * 4 for p in module.parameters())


def needs_twin(module: nn.Module, own_bytes: int) -> bool:
    """Would the full graph's parity session not fit, once this component's torch weights (`own_bytes`)
    are freed? Judged from the memory available now, with a 10% margin."""
    avail = available_bytes()
    return bool(avail) and session_bytes(module) * 1.1 > avail + own_bytes


def weight_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def describe(keep: int, total: int) -> str:
    return (f"reduced-depth twin: the first {keep} of {total} decoder layers (the real weights and adapter hooks), "
            "with the real embeddings, final norm and output projection; the full graph is exported by the same "
            "code but not run here")

