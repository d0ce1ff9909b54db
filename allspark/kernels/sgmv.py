"""Segmented GEMM for per-row adapter sets in OpenAI Triton (the SGMV pattern of Punica and S-LoRA,
for bottleneck adapters): ``y = up_a(silu(down_a(x)))`` where each token's set `a` is its row's.

Tokens are sorted by set so each set is one contiguous segment; one program computes a
[BLOCK_M tokens x BLOCK_N outputs] tile of one segment against that set's weights, so every set's
weights are read once per tile column, whatever the number of rows using it:

    grid (segments x m-tiles, n-tiles):   Y[seg rows, n] = act(X[seg rows, :] @ W[set]^T + B[set])

The adapter is two such launches, down (act = SiLU) then up. On CPU the kernel runs under
``TRITON_INTERPRET=1`` (tests), where bf16 is broken, so loads are upcast to fp32 there; callers
use `segmented_adapter`, which validates and sorts.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import AttentionInputError

_INTERPRETED = bool(triton.knobs.runtime.interpret)
# At a few decode rows the grid is one m-tile wide, so a down projection of r = 1024 outputs is 8
# programs (BLOCK_N 128) on a GPU of 132 multiprocessors: 0.7 TB/s measured on an H200. A positive
# `min_programs` halves BLOCK_N (down to 16) until the grid has that many programs. Off by default
# until measured (`allspark bench kernels` times both on a GPU: `adapter_cases`).
MIN_PROGRAMS = 0


@triton.jit
def _segmented_linear(X, W, BIAS, Y, SEG_START, SEG_SET, TILE_SEG, TILE_M,
                      K, N_OUT,
                      stride_xm, stride_xk, stride_wa, stride_wn, stride_wk, stride_ba, stride_ym, stride_yn,
                      SILU: tl.constexpr, UPCAST: tl.constexpr, IEEE_DOT: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # grid: (m-tiles of all segments, cdiv(N_OUT, BLOCK_N)); TILE_SEG/TILE_M map a tile to its segment.
    pid = tl.program_id(0)
    pid_n = tl.program_id(1)
    seg = tl.load(TILE_SEG + pid)
    a = tl.load(SEG_SET + seg).to(tl.int64)  # the set whose weights this segment uses
    start = tl.load(SEG_START + seg)
    end = tl.load(SEG_START + seg + 1)
    first = start + tl.load(TILE_M + pid) * BLOCK_M
    if first >= end:  # a fixed grid (graph capture) has tiles past a segment's rows: no weight read
        return
    offs_m = first + tl.arange(0, BLOCK_M)  # (BLOCK_M,) token rows
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) output features
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < end
    n_ok = offs_n < N_OUT
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, dtype=tl.float32)
    w_base = W + a * stride_wa
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        x = tl.load(X + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        w = tl.load(w_base + offs_n[None, :] * stride_wn + (k0 + offs_k)[:, None] * stride_wk,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)  # (BLOCK_K, BLOCK_N) = W[set]^T tile
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        if IEEE_DOT:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    b = tl.load(BIAS + a * stride_ba + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    acc = acc + b[None, :]
    if SILU:
        acc = acc / (1.0 + tl.exp(-acc))  # spelled out: tl.sigmoid is a stdlib jit function
    tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, acc.to(Y.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def _blocks(k: int, n_out: int, rows: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K): tl.dot needs every dim >= 16; decode batches are a few rows."""
    return (min(64, max(16, triton.next_power_of_2(rows))), min(128, max(16, triton.next_power_of_2(n_out))),
            min(64, max(16, triton.next_power_of_2(k))))


def _block_n(bn: int, n_out: int, tiles_with_rows: int, min_programs: int) -> int:
    """BLOCK_N halved (not below tl.dot's 16) until tiles x n-tiles reaches `min_programs`."""
    while bn > 16 and tiles_with_rows * triton.cdiv(n_out, bn) < min_programs:
        bn //= 2
    return bn


def _segmented(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, seg_start: torch.Tensor,
               seg_set: torch.Tensor, tile_seg: torch.Tensor, tile_m: torch.Tensor, bm: int, silu: bool,
               min_programs: int = 0) -> torch.Tensor:
    n_tokens, k = x.shape
    n_out = w.shape[1]
    y = torch.empty((n_tokens, n_out), dtype=x.dtype, device=x.device)
    _, bn, bk = _blocks(k, n_out, bm)
    # the tiles that hold rows (a fixed grid's others return at once), without the host: at most
    # one per BLOCK_M rows (more only where segments split them)
    bn = _block_n(bn, n_out, min(tile_seg.numel(), triton.cdiv(n_tokens, bm)), min_programs)
    grid = (tile_seg.numel(), triton.cdiv(n_out, bn))
    _segmented_linear[grid](x, w, bias, y, seg_start, seg_set, tile_seg, tile_m, k, n_out,
                            *x.stride(), *w.stride(), bias.stride(0), *y.stride(),
                            SILU=silu, UPCAST=_INTERPRETED or x.dtype == torch.float32,
                            IEEE_DOT=x.dtype == torch.float32, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    return y


def _segments(token_sets: torch.Tensor, A: int, n_tokens: int, k: int, n_out: int, fixed: bool):
    """(order, seg_start, seg_set, tile_seg, tile_m, BLOCK_M). Exact segments need the host (their
    lengths); `fixed` ones do not (every set is a segment, each with cdiv(n_tokens, BLOCK_M) tiles,
    the empty tiles return at once), so a CUDA graph can capture them."""
    order = torch.argsort(token_sets, stable=True)
    dev = token_sets.device
    if fixed:
        counts = (token_sets[:, None] == torch.arange(A, device=dev)).sum(0)  # no host sync, unlike bincount
        bm = _blocks(k, n_out, n_tokens)[0]
        per = triton.cdiv(n_tokens, bm)
        seg_set = torch.arange(A, device=dev, dtype=torch.int32)
        tiles = torch.arange(A * per, device=dev)  # not repeat_interleave: it copies from the host
        tile_seg, tile_m = tiles // per, tiles % per
    else:
        sets, counts = torch.unique_consecutive(token_sets[order], return_counts=True)
        if int(sets.min()) < 0 or int(sets.max()) >= A:
            raise AttentionInputError("token_sets", f"set indices in [0, {A - 1}]", f"[{int(sets.min())}, {int(sets.max())}]")
        lengths = counts.tolist()
        bm = _blocks(k, n_out, max(lengths, default=1))[0]
        tiles_per_seg = [-(-n // bm) for n in lengths]
        seg_set = sets.to(torch.int32)
        tile_seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(tiles_per_seg)).to(dev)
        tile_m = torch.cat([torch.arange(t) for t in tiles_per_seg]).to(dev)
    seg_start = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
    return order, seg_start, seg_set, tile_seg, tile_m, bm


def segmented_adapter(x: torch.Tensor, token_sets: torch.Tensor, down: torch.Tensor, down_bias: torch.Tensor,
                      up: torch.Tensor, up_bias: torch.Tensor, capturable: bool = False,
                      check_sets: bool = True, min_programs: int | None = None) -> torch.Tensor:
    """``up[a] @ silu(down[a] @ x + down_bias[a]) + up_bias[a]`` per token, a = token_sets[token].

    x [N, H]; token_sets [N] int64 in [0, A); down [A, r, H], down_bias [A, r], up [A, H, r],
    up_bias [A, H] -> [N, H] in x's dtype. Tokens are grouped by set here and put back after.
    `capturable`: the grid is sized without the host (a fixed grid), so a CUDA graph can capture it
    when `check_sets=False` too (the range check reads the indices on the host); each set's weights
    are still read once per tile column. An index out of range gives wrong rows if unchecked.
    `min_programs` (default `MIN_PROGRAMS`): narrower output tiles where the grid would have fewer
    programs (a few decode rows), so more of the GPU streams the weights.
    """
    min_programs = MIN_PROGRAMS if min_programs is None else min_programs
    if x.dim() != 2 or token_sets.shape != x.shape[:1]:
        raise AttentionInputError("x, token_sets", "x [N, H] and token_sets [N]",
                                  f"{tuple(x.shape)} and {tuple(token_sets.shape)}")
    A, r, H = down.shape
    if x.shape[1] != H or up.shape != (A, H, r) or down_bias.shape != (A, r) or up_bias.shape != (A, H):
        raise AttentionInputError("adapter weights", f"down [A, r, {x.shape[1]}], up [A, {x.shape[1]}, r], biases [A, r] "
                                  "and [A, H]", f"{tuple(down.shape)}, {tuple(up.shape)}")
    if x.device.type == "cpu" and not _INTERPRETED:
        raise AttentionInputError("x.device", "a CUDA tensor (or TRITON_INTERPRET=1 set before importing triton)",
                                  str(x.device))
    if x.numel() == 0:
        return torch.empty_like(x)
    if capturable and check_sets and (int(token_sets.min()) < 0 or int(token_sets.max()) >= A):
        raise AttentionInputError("token_sets", f"set indices in [0, {A - 1}]",
                                  f"[{int(token_sets.min())}, {int(token_sets.max())}]")
    order, seg_start, seg_set, tile_seg, tile_m, bm = _segments(token_sets, A, x.shape[0], H, r, capturable)
    xs = x.index_select(0, order).contiguous()
    d = _segmented(xs, down, down_bias, seg_start, seg_set, tile_seg, tile_m, bm, True, min_programs)  # (N, r)
    y = _segmented(d, up, up_bias, seg_start, seg_set, tile_seg, tile_m, bm, False, min_programs)  # (N, H)
    return y.index_select(0, torch.argsort(order))
