"""Fused attention: the Triton kernel and the SDPA fallback against a plain-torch fp32 reference.

Without a GPU the kernel runs under TRITON_INTERPRET=1 (set here, before anything imports triton;
it is read when `triton.jit` decorates the kernel). With a GPU the same cases run the compiled
kernel on CUDA tensors, and the `gpu` tests compare it with SDPA in fp16/bf16.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from allspark.kernels import AttentionInputError, attention  # noqa: E402
from allspark.kernels.op import attention_op  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
# Tolerances against an fp32 reference computed from the same (rounded) inputs: the output's
# own rounding dominates (fp16 ulp 2^-10, bf16 ulp 2^-7 relative).
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5),
       torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=1e-2, rtol=2e-2)}
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def reference(q, k, v, key_padding_mask=None, causal=False, scale=None):
    """Plain fp32 attention; rows that see no key are zero."""
    q, k, v = q.float(), k.float(), v.float()
    n_q, n_k = q.shape[2], k.shape[2]
    s = (q @ k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    allowed = torch.ones(q.shape[0], 1, n_q, n_k, dtype=torch.bool, device=q.device)
    if causal:  # bottom-right aligned: query i sees keys j <= i + (Nk - Nq)
        i = torch.arange(n_q, device=q.device)[:, None]
        allowed = allowed & (torch.arange(n_k, device=q.device)[None, :] <= i + n_k - n_q)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    return p @ v


def make_mask(kind, B, n_k):
    """None | 'ragged' (different token counts) | 'empty_row' (row 0 has no key) | 'left_pad'."""
    if kind is None:
        return None
    m = torch.ones(B, n_k, dtype=torch.bool)
    lengths = [max(1, n_k - 1 - b * (3 + n_k // 3)) for b in range(B)]  # row b keeps lengths[b]
    for b, length in enumerate(lengths):
        if kind == "ragged":
            m[b, length:] = False
        elif kind == "left_pad":
            m[b, : n_k - length] = False
    if kind == "empty_row":
        m[0] = False
    return m.to(DEVICE)


def make_qkv(B, H, n_q, n_k, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, D, generator=g).to(DEVICE, dtype) for n in (n_q, n_k, n_k))
    return q, k, v


def check(out, ref, dtype):
    assert out.dtype == dtype and out.shape == ref.shape
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.float(), ref, **TOL[dtype])


# (B, H, Nq, Nk, D, causal, mask kind, dtype): odd sizes, not the full cross product.
CASES = [
    (1, 1, 1, 1, 64, False, None, F32),
    (2, 2, 1, 7, 64, False, "ragged", F32),
    (2, 2, 32, 197, 88, False, "ragged", F32),  # bridge × EVA tokens, head dim 88
    (2, 2, 32, 197, 88, False, "ragged", F16),
    (2, 2, 32, 197, 88, False, "ragged", BF16),
    (1, 2, 32, 901, 64, False, None, F16),
    (2, 1, 32, 7, 128, False, "empty_row", F32),  # a row with every key masked -> zeros
    (2, 2, 1, 197, 64, False, "empty_row", F16),
    (2, 2, 20, 20, 64, True, "left_pad", F32),  # decoder prefill with left-padded rows
    (2, 2, 33, 33, 88, True, "left_pad", F16),
    (2, 1, 33, 33, 128, True, "left_pad", BF16),
    (1, 2, 7, 40, 128, True, None, F32),  # prefill after 33 cached keys (bottom-right)
    (1, 1, 32, 7, 64, True, None, F32),  # more queries than keys: the first 25 see nothing
    (1, 2, 5, 13, 40, False, "ragged", F32),  # D = 40: padded to 64 in the kernel
    (2, 1, 3, 11, 8, False, None, F16),  # D = 8 < the smallest tl.dot size
    (1, 2, 32, 7, 96, False, "ragged", F16),
]


@pytest.mark.parametrize("B,H,n_q,n_k,D,causal,mask_kind,dtype", CASES)
def test_triton_kernel_matches_reference(B, H, n_q, n_k, D, causal, mask_kind, dtype):
    pytest.importorskip("triton")
    q, k, v = make_qkv(B, H, n_q, n_k, D, dtype)
    mask = make_mask(mask_kind, B, n_k)
    out = attention(q, k, v, mask, causal=causal, backend="triton")
    check(out, reference(q, k, v, mask, causal), dtype)
    if mask_kind == "empty_row":
        assert torch.equal(out[0], torch.zeros_like(out[0]))


@pytest.mark.parametrize("B,H,n_q,n_k,D,mask_kind,dtype", [
    (2, 2, 1, 600, 64, None, F32),  # decode: one query over a long cache
    (2, 2, 4, 777, 88, "ragged", F16),  # a few queries, ragged keys, padded head dim
    (2, 1, 1, 300, 32, "empty_row", F32),  # a row that sees no key in any split: zeros
])
def test_split_k_decode_kernel_matches_reference(B, H, n_q, n_k, D, mask_kind, dtype):
    """Few queries over many keys take the split-K kernel and its merge (flash-decoding)."""
    pytest.importorskip("triton")
    from allspark.kernels.flash_attention import num_splits

    assert num_splits(B * H, n_q, n_k, False, torch.device("cpu")) > 1
    assert num_splits(B * H, 32, n_k, False, torch.device("cpu")) == 1  # bridge-like: the plain kernel
    q, k, v = make_qkv(B, H, n_q, n_k, D, dtype)
    mask = make_mask(mask_kind, B, n_k)
    out = attention(q, k, v, mask, backend="triton")
    check(out, reference(q, k, v, mask), dtype)
    if mask_kind == "empty_row":
        assert torch.equal(out[0], torch.zeros_like(out[0]))


SLOW_CASES = [
    (2, 2, 32, 901, 128, False, "ragged", F32),
    (2, 2, 32, 901, 128, False, "ragged", F16),
    (2, 2, 32, 901, 128, False, "ragged", BF16),
    (1, 2, 901, 901, 88, False, None, F16),  # EVA self-attention at the paper's token count
    (2, 1, 129, 901, 128, True, "left_pad", F32),
]


@pytest.mark.slow
@pytest.mark.parametrize("B,H,n_q,n_k,D,causal,mask_kind,dtype", SLOW_CASES)
def test_triton_kernel_large(B, H, n_q, n_k, D, causal, mask_kind, dtype):
    test_triton_kernel_matches_reference(B, H, n_q, n_k, D, causal, mask_kind, dtype)


def test_triton_kernel_strided_inputs_and_scale():
    pytest.importorskip("triton")
    # q as the model makes it: (B, N, H, D) viewed as (B, H, N, D); k, v slices of one kv tensor.
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 9, 2, 88, generator=g).to(DEVICE).transpose(1, 2)
    kv = torch.randn(2, 2, 2, 30, 88, generator=g).to(DEVICE)
    k, v = kv[0], kv[1]
    mask = make_mask("ragged", 2, 30)
    out = attention(q, k, v, mask, scale=0.3, backend="triton")
    check(out, reference(q, k, v, mask, scale=0.3), F32)
    assert out.is_contiguous()


def _eva_like(layout, B, H, n, dtype):
    """q, k, v with head dim 88 in the layouts the kernel's alignment hint distinguishes."""
    g = torch.Generator().manual_seed(7)
    if layout == "contiguous":  # [B, H, N, 88]: every stride a multiple of 8
        return tuple(torch.randn(B, H, n, 88, generator=g).to(DEVICE, dtype) for _ in range(3))
    if layout == "fused_qkv":  # EVA's qkv projection (B, N, 3, H, 88) split and transposed
        qkv = torch.randn(B, n, 3, H, 88, generator=g).to(DEVICE, dtype)
        return tuple(qkv[:, :, i].transpose(1, 2) for i in range(3))
    # rows 90 elements apart: not a multiple of 8, so the kernel gets no alignment hint
    return tuple(torch.randn(B, H, n, 90, generator=g).to(DEVICE, dtype)[..., :88] for _ in range(3))


@pytest.mark.parametrize("layout,align", [("contiguous", 8), ("fused_qkv", 8), ("odd_stride", 1)])
@pytest.mark.parametrize("dtype", [F16, F32])
def test_head_dim_88_matches_sdpa_fallback(layout, align, dtype):
    """EVA's head dim 88, padded to 128 lanes in registers; aligned layouts take the vector-load
    hint (HEAD_DIM constexpr + ALIGN), the others the plain path: both equal the SDPA fallback."""
    pytest.importorskip("triton")
    from allspark.kernels.flash_attention import alignment

    q, k, v = _eva_like(layout, 2, 2, 37, dtype)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    assert alignment(q, k, v, out) == (align if dtype == F16 else align // 2 or 1)
    mask = make_mask("ragged", 2, 37)
    got = attention(q, k, v, mask, backend="triton")
    want = attention(q, k, v, mask, backend="sdpa")
    check(got, want.float(), dtype)
    check(got, reference(q, k, v, mask), dtype)


# ---- the SDPA fallback and the custom op ------------------------------------------------------


@pytest.mark.parametrize("backend", ["auto", "sdpa"])
@pytest.mark.parametrize("B,H,n_q,n_k,D,causal,mask_kind,dtype", [
    (2, 2, 32, 197, 88, False, "ragged", F32),
    (2, 2, 32, 7, 64, False, "empty_row", F32),
    (2, 2, 20, 20, 64, True, "left_pad", F16),
    (1, 1, 32, 7, 64, True, None, F32),
])
def test_fallback_matches_reference(backend, B, H, n_q, n_k, D, causal, mask_kind, dtype):
    q, k, v = (t.cpu() for t in make_qkv(B, H, n_q, n_k, D, dtype))
    mask = make_mask(mask_kind, B, n_k)
    mask = None if mask is None else mask.cpu()
    out = attention(q, k, v, mask, causal=causal, backend=backend)
    check(out, reference(q, k, v, mask, causal), dtype)
    if mask_kind == "empty_row":
        assert torch.equal(out[0], torch.zeros_like(out[0]))


def test_custom_op_opcheck():
    q, k, v = make_qkv(2, 2, 5, 9, 16, F32)
    mask = make_mask("empty_row", 2, 9)
    torch.library.opcheck(attention_op, (q.cpu(), k.cpu(), v.cpu(), mask.cpu(), False, None))
    torch.library.opcheck(attention_op, (q.cpu(), k.cpu(), v.cpu(), None, True, 0.5))


def test_custom_op_fake_kernel():
    # The fake kernel must give the real output's shape, dtype and layout.
    q, k, v = (t.cpu() for t in make_qkv(1, 2, 3, 5, 16, F16))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        out = torch.ops.allspark.attention(fq, fk, fv, None, False, None)
    assert out.shape == (1, 2, 3, 16) and out.dtype == F16 and out.is_contiguous()


# ---- input validation -------------------------------------------------------------------------


def _ok(n_q=4, n_k=6, D=16, dtype=F32):
    return make_qkv(2, 2, n_q, n_k, D, dtype)


@pytest.mark.parametrize("mutate,fragments", [
    (lambda q, k, v, m: (q.double(), k, v, m), ["q", "float32, float16 or bfloat16", "float64"]),
    (lambda q, k, v, m: (q, k.half(), v, m), ["k.dtype", "torch.float32", "torch.float16"]),
    (lambda q, k, v, m: (q[0], k, v, m), ["q", "rank 4", "rank 3"]),
    (lambda q, k, v, m: (q, k[..., :8], v, m), ["k.shape[3] (head_dim)", "16", "8"]),
    (lambda q, k, v, m: (q, k, v[:, :1], m), ["v.shape[1] (heads)", "2", "1"]),
    (lambda q, k, v, m: (q, k, v[:, :, :5], m), ["v.shape[2] (keys)", "6", "5"]),
    (lambda q, k, v, m: (q, k, v, m[:, :5]), ["key_padding_mask.shape", "(2, 6)", "(2, 5)"]),
    (lambda q, k, v, m: (q, k, v, m.float()), ["key_padding_mask.dtype", "torch.bool",
                                               "torch.float32"]),
])
def test_validation_errors_name_tensor_expected_actual(mutate, fragments):
    q, k, v = _ok()
    m = torch.ones(2, 6, dtype=torch.bool, device=DEVICE)
    q, k, v, m = mutate(q, k, v, m)
    with pytest.raises(AttentionInputError) as e:
        attention(q, k, v, m)
    for frag in fragments:
        assert frag in str(e.value)


def test_head_dim_over_128_and_bad_backend_raise():
    q, k, v = _ok(D=136)
    with pytest.raises(AttentionInputError, match=r"head_dim.*1\.\.128.*136"):
        attention(q, k, v)
    q, k, v = _ok()
    with pytest.raises(AttentionInputError, match="backend"):
        attention(q, k, v, backend="cudnn")
    assert issubclass(AttentionInputError, ValueError)


# ---- GPU: the compiled kernel against SDPA ----------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [F16, BF16])
@pytest.mark.parametrize("B,H,n_q,n_k,D,causal,mask_kind", [
    (8, 8, 32, 901, 64, False, "ragged"),
    (2, 16, 901, 901, 88, False, None),
    (4, 32, 96, 96, 128, True, "left_pad"),
])
def test_gpu_kernel_matches_sdpa(dtype, B, H, n_q, n_k, D, causal, mask_kind):
    pytest.importorskip("triton")
    q, k, v = make_qkv(B, H, n_q, n_k, D, dtype)
    mask = make_mask(mask_kind, B, n_k)
    out = attention(q, k, v, mask, causal=causal)  # auto: the custom op's CUDA kernel
    fallback = attention(q, k, v, mask, causal=causal, backend="sdpa")
    torch.testing.assert_close(out, fallback, **TOL[dtype])
    check(out, reference(q, k, v, mask, causal), dtype)


# ---- the benchmark (shapes and JSON only; no timing is asserted) ------------------------------


def test_preset_shapes_paper():
    from allspark.bench.kernels import preset_shapes

    shapes = {s["name"]: s for s in preset_shapes("paper")}
    assert {s["Nk"] for n, s in shapes.items() if n.startswith("bridge")} == {197, 577, 901}
    assert shapes["bridge_xattn_n901"]["Nq"] == 32 and shapes["bridge_xattn_n901"]["D"] == 64
    assert shapes["eva_self_attn"]["D"] == 88 and shapes["eva_self_attn"]["H"] == 16
    assert shapes["decoder_prefill"] == dict(shapes["decoder_prefill"], H=32, D=128, Nq=96,
                                             Nk=96, causal=True)


def test_bench_smoke_writes_json(tmp_path, capsys):
    from allspark.bench.kernels import main

    out = tmp_path / "kernels.json"
    assert main(["--out", str(out), "--presets", "tiny", "--repeat", "2"]) == 0
    result = json.loads(out.read_text())
    assert {"device", "gpu", "presets", "repeat"} <= set(result)
    assert result["presets"] == ["tiny"] and result["repeat"] == 2
    if HAS_CUDA:
        row = result["gpu_cases"][0]
        assert {"triton", "sdpa", "unfused"} == set(row["results"])
        assert {"ms", "tbps", "tflops", "frac_peak_bw"} <= set(row["results"]["triton"])
        return
    assert result["device"] == "cpu" and result["gpu"] == "not available"
    rows = result["cpu_cases"]
    assert {r["part"] for r in rows} == {"layer", "attention_only"}
    assert {r["intra_op_threads"] for r in rows} == {1, "default"}
    for r in rows:
        assert r["fused_attention_nodes"] == 1 and r["unfused_attention_nodes"] == 0
        assert r["max_abs_diff"] < 1e-4
        assert math.isclose(r["unfused_over_fused"], r["unfused_ms"] / r["fused_ms"])
    assert "unfused/fused" in capsys.readouterr().out


# ---- the segmented adapter kernel (SGMV) ----------------------------------------------------------


def _adapter_reference(x, sets, down, db, up, ub):
    """Per token, in float64: up[a] @ silu(down[a] @ x + db[a]) + ub[a]."""
    x, down, db, up, ub = (t.double() for t in (x, down, db, up, ub))
    d = torch.einsum("nh,nrh->nr", x, down[sets]) + db[sets]
    d = d * torch.sigmoid(d)
    return torch.einsum("nr,nhr->nh", d, up[sets]) + ub[sets]


@pytest.mark.parametrize("n,hidden,r,num_sets,used", [
    (1, 40, 24, 3, [2]),  # one decode row
    (37, 48, 20, 5, [0, 3, 4]),  # sets 1 and 2 absent; sizes not multiples of any block
    (70, 33, 17, 4, [0, 1, 2, 3]),
])
@pytest.mark.parametrize("capturable", [False, True], ids=["exact-segments", "fixed-grid"])
def test_sgmv_matches_reference(n, hidden, r, num_sets, used, capturable):
    from allspark.kernels.sgmv import segmented_adapter

    g = torch.Generator().manual_seed(n)
    mk = lambda *s: torch.randn(*s, generator=g).to(DEVICE)  # noqa: E731
    x, down, db, up, ub = mk(n, hidden), mk(num_sets, r, hidden), mk(num_sets, r), mk(num_sets, hidden, r), mk(num_sets, hidden)
    sets = torch.tensor(used, device=DEVICE)[torch.randint(0, len(used), (n,), generator=g).to(DEVICE)]
    got = segmented_adapter(x, sets, down, db, up, ub, capturable=capturable)
    torch.testing.assert_close(got.double(), _adapter_reference(x, sets, down, db, up, ub), **TOL[F32])


@pytest.mark.parametrize("capturable", [False, True], ids=["exact-segments", "fixed-grid"])
def test_sgmv_narrow_tiles_match_reference(capturable):
    """`min_programs`: output tiles narrowed to 16 where a few rows make a small grid; same answer."""
    from allspark.kernels import sgmv

    assert sgmv._block_n(128, 1024, 1, 0) == 128 and sgmv._block_n(128, 1024, 1, 264) == 16
    assert sgmv._block_n(128, 1024, 1, 32) == 32 and sgmv._block_n(128, 4096, 8, 64) == 128
    g = torch.Generator().manual_seed(7)
    mk = lambda *s: torch.randn(*s, generator=g).to(DEVICE)  # noqa: E731
    x, down, db, up, ub = mk(3, 72), mk(4, 40, 72), mk(4, 40), mk(4, 72, 40), mk(4, 72)  # tails masked
    sets = torch.tensor([2, 0, 2], device=DEVICE)
    want = _adapter_reference(x, sets, down, db, up, ub)
    for m in (0, 64):
        got = sgmv.segmented_adapter(x, sets, down, db, up, ub, capturable=capturable, min_programs=m)
        torch.testing.assert_close(got.double(), want, **TOL[F32])


def test_sgmv_refuses_bad_inputs():
    from allspark.kernels.sgmv import segmented_adapter

    x = torch.zeros(4, 8, device=DEVICE)
    w = (torch.zeros(2, 3, 8, device=DEVICE), torch.zeros(2, 3, device=DEVICE), torch.zeros(2, 8, 3, device=DEVICE),
         torch.zeros(2, 8, device=DEVICE))
    with pytest.raises(AttentionInputError, match="set indices in \\[0, 1\\]"):
        segmented_adapter(x, torch.tensor([0, 1, 2, 0], device=DEVICE), *w)
    with pytest.raises(AttentionInputError, match="token_sets"):
        segmented_adapter(x, torch.tensor([0, 1], device=DEVICE), *w)
    with pytest.raises(AttentionInputError, match="set indices in \\[0, 1\\]"):  # the fixed grid checks too
        segmented_adapter(x, torch.tensor([0, 1, 2, 0], device=DEVICE), *w, capturable=True)


def _gpu_adapter_case(seed: int, n: int):
    """fp16 CUDA inputs for the segmented kernel: x [n, 512], ten sets of 512 -> 256 -> 512."""
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: (torch.randn(*s, generator=g) * 0.2).cuda().half()  # noqa: E731
    x, down, db, up, ub = mk(n, 512), mk(10, 256, 512), mk(10, 256), mk(10, 512, 256), mk(10, 512)
    return g, x, torch.randint(0, 10, (n,), generator=g).cuda(), (down, db, up, ub)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_sgmv_fp16_on_gpu():
    from allspark.kernels.sgmv import segmented_adapter

    _, x, sets, w = _gpu_adapter_case(0, 200)
    got = segmented_adapter(x, sets, *w)
    torch.testing.assert_close(got.double(), _adapter_reference(x, sets, *w), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_sgmv_captured_in_a_cuda_graph():
    """The fixed-grid path inside a CUDA graph (set indices unchecked there: the check reads them on
    the host): replays follow new rows and new sets in place."""
    from allspark.kernels.sgmv import segmented_adapter

    g, x, sets, w = _gpu_adapter_case(1, 64)
    segmented_adapter(x, sets, *w, capturable=True)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = segmented_adapter(x, sets, *w, capturable=True, check_sets=False)
    for seed in (2, 3):
        g.manual_seed(seed)
        x.copy_((torch.randn(64, 512, generator=g) * 0.2).cuda().half())
        sets.copy_(torch.randint(0, 3, (64,), generator=g).cuda())  # fewer sets: empty segments
        y.fill_(float("nan"))
        graph.replay()
        torch.testing.assert_close(y.double(), _adapter_reference(x, sets, *w), atol=2e-2, rtol=2e-2)


def test_adapter_bench_cases_on_the_interpreter():
    """`bench kernels`' adapter cases (GPU-timed there) built and checked on the CPU interpreter: both
    tilings give the same answer; the timer is the only part faked."""
    from allspark.bench.kernels import ADAPTER_BATCHES, adapter_cases

    rows = adapter_cases(["tiny"], 1, device="cpu", timer=lambda fn, n: 1.0, min_programs=64)
    assert len(rows) == 2 * len(ADAPTER_BATCHES)
    for r in rows:
        assert set(r["results"]) == {"default", "narrow"} and r["narrow_speedup"] == 1.0
        assert r["max_abs_diff"] < 1e-4 and r["weight_bytes"] > 0
    assert {r["sets_used"] for r in rows if r["rows"] == 1} == {1}
