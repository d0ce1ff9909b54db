"""Building blocks shared by the encoders: EVA-named pre-norm transformer blocks.

Parameter names follow Lynx's EVA ViT (`norm1`, `attn.{q,k,v}_proj`, `attn.proj`, `norm2`,
`mlp.fc{1,2}`) so a Lynx `vision_encoder.*` state dict loads into `ViTEncoder` unchanged; the
other encoders reuse the same block.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import torch
import torch.nn.functional as F
from torch import nn

# Export switch for `--no-fuse`: plain MatMul/Softmax/MatMul instead of one fused attention op.
_FUSED = contextvars.ContextVar("allspark_fused_attention", default=True)


@contextlib.contextmanager
def unfused_attention():
    token = _FUSED.set(False)
    try:
        yield
    finally:
        _FUSED.reset(token)


def _math_attention(q, k, v, key_padding_mask):
    s = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, h, Nq, Nk)
    if key_padding_mask is not None:
        s = s.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention over [B, H, N, D] tensors; `key_padding_mask` [B, Nk] bool, True = keep.

    On CUDA the fused OpenAI Triton kernel serves it when `allspark.kernels` is importable; on CPU
    and during ONNX export SDPA is used, which exports as one ONNX `Attention` op at opset >= 23.
    """
    # The switch is read only under ONNX export: reading a ContextVar breaks torch.compile graphs.
    if torch.onnx.is_in_onnx_export() and not _FUSED.get():
        return _math_attention(q, k, v, key_padding_mask)
    if q.is_cuda and not torch.onnx.is_in_onnx_export():
        try:
            from ..kernels import attention as fused
        except ImportError:  # triton missing: fall through to SDPA
            fused = None
        if fused is not None:
            return fused(q, k, v, key_padding_mask=key_padding_mask)
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class Attention(nn.Module):
    """EVA self-attention: q and v projections with bias, k without."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        split = lambda t: t.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, h, T, hd)
        o = attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                      key_padding_mask)
        return self.proj(o.transpose(1, 2).reshape(B, T, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(round(dim * mlp_ratio)))

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), key_padding_mask)
        return x + self.mlp(self.norm2(x))


class Blocks(nn.ModuleList):
    """`depth` blocks applied in order (kept a ModuleList so names stay `blocks.i.*`)."""

    @classmethod
    def make(cls, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0) -> "Blocks":
        return cls(Block(dim, heads, mlp_ratio) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for blk in self:
            x = blk(x)
        return x
