"""Input checks of the fused attention, shared by the host wrapper (`op`) and the kernel's launcher
(`flash_attention`): each failure is an `AttentionInputError` naming the tensor, the expected and
the actual value."""

from __future__ import annotations

from typing import Optional

import torch

from ..errors import AllSparkError

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 128  # the kernel keeps one [BLOCK_M, next_pow2(D)] fp32 accumulator in registers


class AttentionInputError(AllSparkError, ValueError):
    """An attention input has the wrong dtype, device, rank or shape."""

    def __init__(self, tensor: str, expected: str, actual: str):
        self.tensor, self.expected, self.actual = tensor, expected, actual
        super().__init__(f"attention: {tensor}: expected {expected}, got {actual}")


def validate_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              key_padding_mask: Optional[torch.Tensor] = None) -> None:
    """Raise `AttentionInputError` on the first input that does not fit; return None otherwise."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise AttentionInputError(name, "a torch.Tensor", type(t).__name__)
        if t.dtype not in _DTYPES:
            raise AttentionInputError(name, "dtype float32, float16 or bfloat16", str(t.dtype))
        if t.dim() != 4:
            raise AttentionInputError(name, "rank 4 [batch, heads, tokens, head_dim]",
                                      f"rank {t.dim()} {tuple(t.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise AttentionInputError(f"{name}.dtype", f"{q.dtype} (same as q)", str(t.dtype))
        if t.device != q.device:
            raise AttentionInputError(f"{name}.device", f"{q.device} (same as q)", str(t.device))
    B, H, _, D = q.shape
    for name, t in (("k", k), ("v", v)):
        for axis, label, want in ((0, "batch", B), (1, "heads", H), (3, "head_dim", D)):
            if t.shape[axis] != want:
                raise AttentionInputError(f"{name}.shape[{axis}] ({label})", f"{want} (as q)",
                                          f"{t.shape[axis]} in {tuple(t.shape)}")
    if v.shape[2] != k.shape[2]:
        raise AttentionInputError("v.shape[2] (keys)", f"{k.shape[2]} (as k)",
                                  f"{v.shape[2]} in {tuple(v.shape)}")
    if D > MAX_HEAD_DIM or D < 1:
        raise AttentionInputError("q.shape[3] (head_dim)", f"1..{MAX_HEAD_DIM}", str(D))
    if key_padding_mask is None:
        return
    m = key_padding_mask
    if not isinstance(m, torch.Tensor):
        raise AttentionInputError("key_padding_mask", "a torch.Tensor or None", type(m).__name__)
    if m.dtype != torch.bool:
        raise AttentionInputError("key_padding_mask.dtype", "torch.bool (True = keep)", str(m.dtype))
    if tuple(m.shape) != (B, k.shape[2]):
        raise AttentionInputError("key_padding_mask.shape", f"[batch, keys] = ({B}, {k.shape[2]})",
                                  str(tuple(m.shape)))
    if m.device != q.device:
        raise AttentionInputError("key_padding_mask.device", f"{q.device} (same as q)", str(m.device))
