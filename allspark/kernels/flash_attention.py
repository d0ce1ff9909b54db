"""Flash-style fused attention forward in OpenAI Triton (after Triton's fused-attention tutorial).

One kernel computes softmax(q kᵀ · scale + mask) v for a [BLOCK_M, D] tile of queries: it walks
the keys in [BLOCK_N, D] tiles, keeps a running row max and row sum (the "online softmax" of
FlashAttention, Dao et al. 2022) and accumulates in fp32, so the [Nq, Nk] score matrix never
reaches memory. What it serves in AllSpark:

- the bridge's cross-attention: 32 latents × the encoder's tokens (197, 577, 901), with a key
  padding mask when images in a batch have different token counts;
- EVA's self-attention with head dim 88 (not a power of two: the head dim is padded to the next
  power of two inside the kernel with masked loads, never in memory; HEAD_DIM is a constexpr and
  ALIGN says the strides are 16-byte multiples, so those loads still vectorise);
- the decoder's prefill: causal, aligned bottom-right, with left-padded rows.

A query row that sees no key outputs zeros. Layouts: q [B, H, Nq, D], k/v [B, H, Nk, D], any
strides. On CPU the kernel runs only under ``TRITON_INTERPRET=1`` (set before importing triton),
where bf16 is broken, so loads are upcast to fp32 there. Callers use `allspark.kernels.attention`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .checks import AttentionInputError, validate_attention_inputs

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2 e); exp2 is the cheaper instruction
# `triton.jit` picks interpreter or compiler when it decorates, so record the choice made here.
_INTERPRETED = bool(triton.knobs.runtime.interpret)


# Row max and row sum go through `tl.reduce` with the standard library's own combine functions
# (what `tl.max`/`tl.sum` use), and `tl.zeros` is spelled `tl.full`. Reason: `tl.max`, `tl.sum` and
# `tl.zeros` are jit functions of triton's standard library, compiled or interpreted according to
# TRITON_INTERPRET when triton was FIRST imported, and transformers imports triton (through
# torch._dynamo) before a test can set it; builtins follow the kernel's own mode. The interpreter
# recognises these two combine functions and reduces with numpy instead of element by element.
_MAX_COMBINE = tl.standard._elementwise_max
_SUM_COMBINE = tl.standard._sum_combine


@triton.jit
def _attn_fwd(Q, K, V, O, MASK, qk_scale,
              stride_qb, stride_qh, stride_qm, stride_qd,
              stride_kb, stride_kh, stride_kn, stride_kd,
              stride_vb, stride_vh, stride_vn, stride_vd,
              stride_ob, stride_oh, stride_om, stride_od,
              stride_mb, stride_mn,
              H, N_Q, N_K, HEAD_DIM: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr,
              UPCAST: tl.constexpr, IEEE_DOT: tl.constexpr, ALIGN: tl.constexpr):
    # grid: (cdiv(Nq, BLOCK_M), B * H); one program owns BLOCK_M queries of one (batch, head).
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # int64: b * stride_qb can pass 2^31 for large batches
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query index
    offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,) padded head dim; lanes >= HEAD_DIM load zeros
    offs_n = tl.arange(0, BLOCK_N)  # (BLOCK_N,) key index within a tile
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < N_Q

    # Offsets of rows and of (batch, head) bases; with ALIGN the host has checked they are
    # multiples of ALIGN elements (16 bytes), which with HEAD_DIM a constexpr lets a padded head
    # dim (88 = 11 x 8) load in 16-byte vectors, pipelined, instead of one element at a time.
    q_off = b * stride_qb + h * stride_qh
    k_off = b * stride_kb + h * stride_kh
    v_off = b * stride_vb + h * stride_vh
    o_off = b * stride_ob + h * stride_oh
    q_rows = offs_m[:, None] * stride_qm
    o_rows = offs_m[:, None] * stride_om
    if ALIGN > 1:
        q_off = tl.multiple_of(q_off, ALIGN)
        k_off = tl.multiple_of(k_off, ALIGN)
        v_off = tl.multiple_of(v_off, ALIGN)
        o_off = tl.multiple_of(o_off, ALIGN)
        q_rows = tl.multiple_of(q_rows, [ALIGN, 1])
        o_rows = tl.multiple_of(o_rows, [ALIGN, 1])
    q_ptrs = Q + q_off + q_rows + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + k_off
    v_base = V + v_off

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max (log2 units)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)  # running row sum of exp2
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)

    # Causal: query i sees keys j <= i + (Nk - Nq); keys past this tile's last query are skipped.
    causal_off = N_K - N_Q
    hi = N_K
    if CAUSAL:
        hi = tl.minimum(N_K, (pid_m + 1) * BLOCK_M + causal_off)
    for start_n in range(0, hi, BLOCK_N):
        keys = start_n + offs_n  # (BLOCK_N,)
        n_ok = keys < N_K
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k_rows = keys[:, None] * stride_kn
        v_rows = keys[:, None] * stride_vn
        if ALIGN > 1:
            k_rows = tl.multiple_of(k_rows, [ALIGN, 1])
            v_rows = tl.multiple_of(v_rows, [ALIGN, 1])
        k = tl.load(k_base + k_rows + offs_d[None, :] * stride_kd,
                    mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        v = tl.load(v_base + v_rows + offs_d[None, :] * stride_vd,
                    mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if IEEE_DOT:  # fp32 inputs: full precision, not tf32
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        qk = qk * qk_scale  # (BLOCK_M, BLOCK_N), log2 units

        valid = n_ok[None, :] & m_ok[:, None]  # (BLOCK_M, BLOCK_N)
        if HAS_MASK:
            keep = tl.load(MASK + b * stride_mb + keys * stride_mn, mask=n_ok, other=0)
            valid = valid & (keep != 0)[None, :]
        if CAUSAL:
            valid = valid & (keys[None, :] <= offs_m[:, None] + causal_off)
        qk = tl.where(valid, qk, float("-inf"))

        # Online softmax. While a row has seen no valid key its max is -inf; subtracting 0 then
        # keeps exp2(-inf) = 0 instead of exp2(-inf - -inf) = NaN.
        m_new = tl.maximum(m_i, tl.reduce(qk, 1, _MAX_COMBINE))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])  # (BLOCK_M, BLOCK_N)
        alpha = tl.math.exp2(m_i - m_safe)  # rescales what was accumulated under the old max
        l_i = l_i * alpha + tl.reduce(p, 1, _SUM_COMBINE)
        acc = acc * alpha[:, None]
        if IEEE_DOT:
            acc += tl.dot(p, v, input_precision="ieee")
        else:
            acc += tl.dot(p.to(v.dtype), v)  # fp16/bf16 tensor cores, fp32 accumulation
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # rows that saw no key: acc is 0, output 0
    out = acc / l_safe[:, None]
    o_ptrs = O + o_off + o_rows + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


@triton.jit
def _attn_fwd_split(Q, K, V, PART_O, PART_ML, MASK, qk_scale,
                    stride_qb, stride_qh, stride_qm, stride_qd,
                    stride_kb, stride_kh, stride_kn, stride_kd,
                    stride_vb, stride_vh, stride_vn, stride_vd,
                    stride_mb, stride_mn,
                    H, N_Q, N_K, HEAD_DIM: tl.constexpr, KEYS_PER_SPLIT, NUM_SPLITS,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, IEEE_DOT: tl.constexpr,
                    ALIGN: tl.constexpr):
    """Split-K ("flash-decoding") for a few queries over many keys: program (s, bh) runs the online
    softmax over keys [s * KEYS_PER_SPLIT, (s + 1) * KEYS_PER_SPLIT) and writes its unnormalised
    accumulator and (row max, row sum) to the partials; `_attn_combine` merges the splits. Enough
    programs then read the cache at once to keep HBM busy when B * H alone is too few."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < N_Q
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)
    lo = pid_s * KEYS_PER_SPLIT
    hi = tl.minimum(lo + KEYS_PER_SPLIT, N_K)
    for start_n in range(lo, hi, BLOCK_N):
        keys = start_n + offs_n
        n_ok = keys < hi
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + keys[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + keys[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if IEEE_DOT:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        qk = qk * qk_scale
        valid = n_ok[None, :] & m_ok[:, None]
        if HAS_MASK:
            keep = tl.load(MASK + b * stride_mb + keys * stride_mn, mask=n_ok, other=0)
            valid = valid & (keep != 0)[None, :]
        qk = tl.where(valid, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(qk, 1, _MAX_COMBINE))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.reduce(p, 1, _SUM_COMBINE)
        acc = acc * alpha[:, None]
        if IEEE_DOT:
            acc += tl.dot(p, v, input_precision="ieee")
        else:
            acc += tl.dot(p.to(v.dtype), v)
        m_i = m_new
    part = pid_bh * NUM_SPLITS + pid_s  # partials laid out (B * H, NUM_SPLITS, BLOCK_M, ...)
    tl.store(PART_O + (part * BLOCK_M + offs_m[:, None]) * BLOCK_D + offs_d[None, :], acc)
    tl.store(PART_ML + (part * BLOCK_M + offs_m) * 2, m_i)
    tl.store(PART_ML + (part * BLOCK_M + offs_m) * 2 + 1, l_i)


@triton.jit
def _attn_combine(PART_O, PART_ML, O, stride_ob, stride_oh, stride_om, stride_od,
                  H, N_Q, HEAD_DIM, NUM_SPLITS,
                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Merge one (batch, head)'s splits: rescale each by exp2(its max - the overall max)."""
    pid_bh = tl.program_id(0)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_all = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for s in range(0, NUM_SPLITS):
        m_all = tl.maximum(m_all, tl.load(PART_ML + ((pid_bh * NUM_SPLITS + s) * BLOCK_M + offs_m) * 2))
    m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
    l_all = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)
    for s in range(0, NUM_SPLITS):
        part = pid_bh * NUM_SPLITS + s
        w = tl.math.exp2(tl.load(PART_ML + (part * BLOCK_M + offs_m) * 2) - m_safe)
        l_all += w * tl.load(PART_ML + (part * BLOCK_M + offs_m) * 2 + 1)
        acc += w[:, None] * tl.load(PART_O + (part * BLOCK_M + offs_m[:, None]) * BLOCK_D + offs_d[None, :])
    out = acc / tl.where(l_all == 0.0, 1.0, l_all)[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=(offs_m < N_Q)[:, None] & (offs_d < HEAD_DIM)[None, :])


# ---- launch configuration ---------------------------------------------------------------------
# Autotuning times candidates with CUDA events, which the interpreter lacks, so a fixed rule stands
# in, from a sweep on an H100 (CUDA graph replay; docs/benchmarks/gpu/nvidia-h100-80gb-hbm3/tune.json):
# bridge cross-attention (<= 32 latents over >= 128 keys): thin 16-row tiles and long key blocks
# put more programs on the multiprocessors (1.6-2x SDPA there); head dims padded to 128 (EVA's 88,
# LLaMA's 128): 64-128-row tiles with 32-64-key blocks keep q, k, v and the accumulator in registers.


def _launch_config(n_q: int, head_dim: int, n_k: int = 0) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) for this problem."""
    block_d = max(16, triton.next_power_of_2(head_dim))  # tl.dot needs every dim >= 16
    if n_q <= 32 and n_k >= 128:
        return 16, 128 if block_d <= 64 else 64, block_d, 4, 3
    fit_m = max(16, triton.next_power_of_2(n_q))  # no wider than the queries: 17 EVA tokens fill 32 rows
    if block_d >= 128:
        return (min(128, fit_m), 64, block_d, 4, 2) if n_q >= 512 else (min(64, fit_m), 32, block_d, 4, 2)
    return min(128, fit_m), 32 if n_k <= 64 else 64, block_d, 4, 2


def alignment(*tensors: torch.Tensor) -> int:
    """Elements per 16 bytes when every tensor's data pointer is 16-byte aligned and its batch,
    head and row strides are multiples of that (the kernel then tells the compiler so); else 1.
    Contiguous [B, H, N, 88] fp16/bf16 tensors qualify (88 = 11 x 8), as do slices of a fused
    qkv projection. The head dim's own stride must be 1 for a vector load to help."""
    vec = 16 // tensors[0].element_size()
    for t in tensors:
        if t.data_ptr() % 16 or t.stride(3) != 1 or any(s % vec for s in t.stride()[:3]):
            return 1
    return vec


def _interpreting() -> bool:
    return _INTERPRETED


SPLIT_MAX_QUERIES = 16  # decode (1 query) and short speculative steps
SPLIT_MIN_KEYS = 256
SPLIT_KEYS_MIN = 128  # keys per split at least: fewer would make the merge cost more than it saves


def num_splits(batch_heads: int, n_q: int, n_k: int, causal: bool, device: torch.device) -> int:
    """How many key splits a launch gets: 1 (the plain kernel) unless a few queries face many keys
    and B * H programs alone would leave streaming multiprocessors idle."""
    if n_q > SPLIT_MAX_QUERIES or n_k < SPLIT_MIN_KEYS or (causal and n_q > 1):
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    want = -(-2 * sms // batch_heads)  # two waves of programs
    return max(1, min(want, n_k // SPLIT_KEYS_MIN))


# ---- host wrapper -----------------------------------------------------------------------------


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    key_padding_mask: Optional[torch.Tensor] = None, causal: bool = False,
                    scale: Optional[float] = None) -> torch.Tensor:
    """Fused attention forward; q [B, H, Nq, D], k/v [B, H, Nk, D] -> [B, H, Nq, D] in q's dtype.

    Inputs may have any strides. Raises `AttentionInputError` on a bad input, and on CPU tensors
    when the interpreter is off (the compiled kernel needs a GPU).
    """
    validate_attention_inputs(q, k, v, key_padding_mask)
    if q.device.type == "cpu" and not _interpreting():
        raise AttentionInputError("q.device", "a CUDA tensor (or TRITON_INTERPRET=1 set before "
                                  "importing triton)", str(q.device))
    B, H, n_q, D = q.shape
    n_k = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    out = torch.empty((B, H, n_q, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if key_padding_mask is not None:
        mask = key_padding_mask.to(torch.int8)  # (B, Nk); bytes load the same in every backend
        mask_strides = (mask.stride(0), mask.stride(1))
    else:
        mask, mask_strides = out, (0, 0)  # never read: HAS_MASK is False
    block_m, block_n, block_d, warps, stages = _launch_config(n_q, D, n_k)
    # The interpreter computes bf16 wrongly, so it works in fp32 throughout; so does fp32 input.
    upcast = _interpreting() or q.dtype == torch.float32
    splits = num_splits(B * H, n_q, n_k, causal, q.device)
    if splits > 1:
        keys_per_split = triton.cdiv(triton.cdiv(n_k, splits), block_n) * block_n
        splits = triton.cdiv(n_k, keys_per_split)
        part_o = torch.empty((B * H, splits, block_m, block_d), dtype=torch.float32, device=q.device)
        part_ml = torch.empty((B * H, splits, block_m, 2), dtype=torch.float32, device=q.device)
        _attn_fwd_split[(splits, B * H)](
            q, k, v, part_o, part_ml, mask, scale * LOG2E,
            *q.stride(), *k.stride(), *v.stride(), *mask_strides,
            H, n_q, n_k, D, keys_per_split, splits,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, HAS_MASK=key_padding_mask is not None,
            UPCAST=upcast, IEEE_DOT=q.dtype == torch.float32, ALIGN=1, num_warps=4, num_stages=stages)
        _attn_combine[(B * H,)](part_o, part_ml, out, *out.stride(), H, n_q, D, splits,
                                BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4)
        return out
    grid = (triton.cdiv(n_q, block_m), B * H)
    _attn_fwd[grid](
        q, k, v, out, mask, scale * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *mask_strides,
        H, n_q, n_k, D,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        HAS_MASK=key_padding_mask is not None, CAUSAL=bool(causal),
        UPCAST=upcast, IEEE_DOT=q.dtype == torch.float32, ALIGN=alignment(q, k, v, out),
        num_warps=warps, num_stages=stages,
    )
    return out
