"""Typed host layer of the fused attention: input checks, the `allspark::attention` custom op, `attention`.

``attention(q, k, v, key_padding_mask, causal, scale, backend)`` is the one entry point the model
and runtime call. It validates every input (raising `AttentionInputError`, which names the tensor,
the expected and the actual value) and then routes:

    backend="auto"   -> torch.ops.allspark.attention: on CUDA tensors the Triton kernel or torch
                        SDPA, whichever the measured table in `dispatch` says is faster at this
                        shape (SDPA where nothing was measured); SDPA with an equivalent boolean
                        mask on every other device
    backend="triton" -> the Triton kernel directly (on CPU only under TRITON_INTERPRET=1; tests)
    backend="sdpa"   -> the SDPA fallback directly, on any device

Semantics shared by both paths (q: [B, H, Nq, D], k/v: [B, H, Nk, D]):
- ``key_padding_mask`` bool [B, Nk], True = the key is real; rows may have different token counts.
- ``causal=True`` aligns the causal mask bottom-right: query i sees keys j <= i + (Nk - Nq), which
  is what a decoder prefill after cached keys needs (torch's ``is_causal`` aligns top-left).
- A query row that can see no key at all (all keys padded, or a left-padded query before the
  first real key) outputs zeros, never NaN.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from .checks import AttentionInputError, validate_attention_inputs
from .dispatch import choose

# Whether the kernel can run at all (the `kernels` extra); found without importing triton.
_HAS_TRITON = importlib.util.find_spec("triton") is not None

Backend = Literal["auto", "triton", "sdpa"]


def visible_keys(key_padding_mask: Optional[torch.Tensor], causal: bool, n_q: int, n_k: int,
                 device: torch.device) -> Optional[torch.Tensor]:
    """Boolean [B or 1, 1, Nq, Nk] mask, True where query i may attend key j; None if all may."""
    allowed = None
    if causal:
        i = torch.arange(n_q, device=device)[:, None]
        j = torch.arange(n_k, device=device)[None, :]
        allowed = (j <= i + (n_k - n_q))[None, None]  # (1, 1, Nq, Nk), bottom-right aligned
    if key_padding_mask is not None:
        keep = key_padding_mask[:, None, None, :]  # (B, 1, 1, Nk)
        allowed = keep if allowed is None else allowed & keep
    return allowed


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   key_padding_mask: Optional[torch.Tensor] = None, causal: bool = False,
                   scale: Optional[float] = None) -> torch.Tensor:
    """Fallback with the kernel's semantics on any device: SDPA, then zeros for key-less rows."""
    allowed = visible_keys(key_padding_mask, causal, q.shape[2], k.shape[2], q.device)
    if allowed is not None and q.shape[2] > 0:
        # SDPA broadcasts a bool mask over (B, H, Nq, Nk); materialise Nq so rows can be zeroed.
        allowed = allowed.expand(allowed.shape[0], 1, q.shape[2], k.shape[2])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    if allowed is not None:
        # A row with no visible key is a softmax over all -inf: torch 2.13's CPU SDPA gives zeros,
        # but other versions and CUDA backends may give NaN, so the kernel's rule is enforced here.
        out = out.masked_fill(~allowed.any(dim=-1, keepdim=True), 0.0)
    return out.contiguous()  # (B, H, Nq, D), same layout as the kernel and the fake


def _triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      key_padding_mask: Optional[torch.Tensor], causal: bool,
                      scale: Optional[float]) -> torch.Tensor:
    from .flash_attention import (
        flash_attention,  # late: triton is an optional dependency
    )

    return flash_attention(q, k, v, key_padding_mask, causal, scale)


# ---- the custom op: one graph node for torch.compile / export, device-dispatched --------------


@torch.library.custom_op("allspark::attention", mutates_args=())
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 key_padding_mask: Optional[torch.Tensor], causal: bool,
                 scale: Optional[float]) -> torch.Tensor:
    """Default (non-CUDA) implementation: the SDPA fallback."""
    return sdpa_attention(q, k, v, key_padding_mask, causal, scale)


@attention_op.register_kernel("cuda")
def _attention_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    key_padding_mask: Optional[torch.Tensor], causal: bool,
                    scale: Optional[float]) -> torch.Tensor:
    if _HAS_TRITON and choose(q, k, key_padding_mask, causal) == "triton":
        return _triton_attention(q, k, v, key_padding_mask, causal, scale)
    # SDPA where the table says the kernel loses (EVA's head dim 88), where nothing was measured,
    # and on a CUDA machine without the `kernels` extra
    return sdpa_attention(q, k, v, key_padding_mask, causal, scale)


@attention_op.register_fake
def _attention_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    key_padding_mask: Optional[torch.Tensor], causal: bool,
                    scale: Optional[float]) -> torch.Tensor:
    return q.new_empty(q.shape)  # (B, H, Nq, D), contiguous, q's dtype


# ---- public entry point -----------------------------------------------------------------------


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              key_padding_mask: Optional[torch.Tensor] = None, causal: bool = False,
              scale: Optional[float] = None, backend: Backend = "auto") -> torch.Tensor:
    """softmax(q kᵀ · scale + mask) v per (batch, head); returns [B, H, Nq, D] in q's dtype.

    q: [B, H, Nq, D]; k, v: [B, H, Nk, D]; key_padding_mask: bool [B, Nk] (True = keep) or None;
    causal: bottom-right aligned; scale: default 1/sqrt(D). `backend` picks the implementation
    (see the module docstring); every backend gives zeros for rows that see no key.
    """
    validate_attention_inputs(q, k, v, key_padding_mask)
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise AttentionInputError("scale", "a finite float or None", repr(scale))
    scale = None if scale is None else float(scale)
    if backend == "auto":
        return attention_op(q, k, v, key_padding_mask, bool(causal), scale)
    if backend == "sdpa":
        return sdpa_attention(q, k, v, key_padding_mask, bool(causal), scale)
    if backend == "triton":
        return _triton_attention(q, k, v, key_padding_mask, bool(causal), scale)
    raise AttentionInputError("backend", "'auto', 'triton' or 'sdpa'", repr(backend))
