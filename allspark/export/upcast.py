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


def _upcast(tensors) -> list[tuple[torch.Tensor, torch.dtype]]:
    """Cast the real low-precision floating tensors among `tensors` to fp32; (tensor, its dtype) of
    each, to restore exactly those. fp32 tensors (the rotary frequencies) and meta ones (a streamed
    export's unused weights) are left alone: restoring them "to the module's dtype" would round a
    buffer computed in fp32 to fp16 after the first check and skew every later one."""
    changed = [(t, t.dtype) for t in tensors if t.is_floating_point() and not t.is_meta and t.dtype != torch.float32]
    for t, _ in changed:
        t.data = t.data.float()
    return changed


def _restore(changed: list[tuple[torch.Tensor, torch.dtype]]) -> None:
    for t, dtype in changed:
        t.data = t.data.to(dtype)  # fp16 -> fp32 -> fp16 is exact


@contextlib.contextmanager
def fp32_reference(module: nn.Module) -> Iterator[str]:
    """Within: `module` computes in fp32 even if its weights are stored in fp16/bf16 -- repeated
    blocks are upcast one at a time as they run (and cast back), the rest for the duration, so a 7B
    fp16 decoder gets its fp32 reference at ~1x its fp16 size.
    Yields what the reference is, in words, for the manifest."""
    low = {t.dtype for t in module.parameters() if t.is_floating_point() and not t.is_meta and t.dtype != torch.float32}
    if not low:
        yield "PyTorch in fp32 on the checkpoint's fp32 weights"
        return
    blocks = _blocks(module)
    in_block = {id(t) for b in blocks for t in [*b.parameters(), *b.buffers()]}
    pending: dict[int, list] = {}
    hooks = [h for b in blocks for h in (
        b.register_forward_pre_hook(lambda m, a: pending.__setitem__(id(m), _upcast([*m.parameters(), *m.buffers()]))),
        b.register_forward_hook(lambda m, a, o: _restore(pending.pop(id(m), []))))]
    rest = _upcast([t for t in [*module.parameters(), *module.buffers()] if id(t) not in in_block])
    try:
        name = "/".join(sorted(str(d).removeprefix("torch.") for d in low))
        yield (f"PyTorch in fp32 on the checkpoint's {name} weights, {len(blocks)} repeated blocks upcast one at a time"
               if blocks else f"PyTorch in fp32 on the checkpoint's {name} weights, upcast for the check")
    finally:
        for h in hooks:
            h.remove()
        _restore(rest)
        for changed in pending.values():  # a block whose forward raised
            _restore(changed)
