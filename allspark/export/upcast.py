"""fp32 arithmetic on weights stored in fp16/bf16, without an fp32 copy of the whole module: the
reference every low-precision export is checked against."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def _blocks(module: nn.Module) -> list[nn.Module]:
    """The items of the outermost ModuleLists (decoder layers, encoder blocks, adapter sets)."""
    blocks, claimed = [], set()
    for ml in module.modules():
        if isinstance(ml, nn.ModuleList) and id(ml) not in claimed:
            for item in ml:
                # a ModuleList item is never called itself (the bridge's [attention, feed-forward]
                # pairs): its hooks would never fire, so its members are the blocks
                members = list(item) if isinstance(item, nn.ModuleList) else [item]
                blocks += members
                claimed.update(id(m) for m in item.modules())
    return blocks


def _cast_tensors(mod: nn.Module, dtype: torch.dtype | None, recurse: bool = True) -> None:
    for t in [*mod.parameters(recurse=recurse), *mod.buffers(recurse=recurse)]:
        if t.is_floating_point():
            t.data = t.data.to(dtype or t.dtype)


@contextlib.contextmanager
def fp32_reference(module: nn.Module) -> Iterator[str]:
    """Within: `module` computes in fp32 even if its weights are stored in fp16/bf16 -- repeated
    blocks are upcast one at a time as they run (and cast back: fp16 -> fp32 -> fp16 is exact), the
    rest for the duration, so a 7B fp16 decoder gets its fp32 reference at ~1x its fp16 size.
    Yields what the reference is, in words, for the manifest."""
    low = {t.dtype for t in module.parameters() if t.is_floating_point() and t.dtype != torch.float32}
    if not low:
        yield "PyTorch in fp32 on the checkpoint's fp32 weights"
        return
    (dtype,) = low
    blocks = _blocks(module)
    in_block = {id(t) for b in blocks for t in [*b.parameters(), *b.buffers()]}
    rest = [t for t in [*module.parameters(), *module.buffers()] if t.is_floating_point() and id(t) not in in_block]
    hooks = [h for b in blocks for h in (b.register_forward_pre_hook(lambda m, a: _cast_tensors(m, torch.float32)),
                                        b.register_forward_hook(lambda m, a, o: _cast_tensors(m, dtype)))]
    for t in rest:
        t.data = t.data.float()
    try:
        name = str(dtype).removeprefix("torch.")
        yield (f"PyTorch in fp32 on the checkpoint's {name} weights, {len(blocks)} repeated blocks upcast one at a time"
               if blocks else f"PyTorch in fp32 on the checkpoint's {name} weights, upcast for the check")
    finally:
        for h in hooks:
            h.remove()
        for t in rest:
            t.data = t.data.to(dtype)
        for b in blocks:
            _cast_tensors(b, dtype)
