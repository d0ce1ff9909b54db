"""The attention kernel compiled for an H100 (sm_90) without a GPU: Triton's compiler and ptxas run
on CPU. Checks what the head dim 88 change is for: with the ALIGN hint the K/V tiles load in 16-byte
vectors through cp.async, as at head dim 128; without it one 2-byte element at a time. Timing needs
a GPU; this only shows the instructions. Runs in a subprocess, as tests/test_kernels.py turns on
TRITON_INTERPRET (which replaces the kernel with the interpreter's) for the whole pytest process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

_SCRIPT = r"""
import json, re, sys
from collections import Counter
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from allspark.kernels import flash_attention as fa

def ptx_loads(head_dim, align, n=901, heads=16):
    kern = fa._attn_fwd
    names = kern.arg_names
    block_m, block_n, block_d, warps, stages = fa._launch_config(n, head_dim, n)
    consts = dict(HEAD_DIM=head_dim, ALIGN=align, stride_qd=1, stride_kd=1, stride_vd=1, stride_od=1,
                  BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, HAS_MASK=False, CAUSAL=False,
                  UPCAST=False, IEEE_DOT=False)
    # contiguous fp16 [8, heads, n, head_dim]: Triton marks an int argument divisible by 16 if it is
    vals = {}
    for x in "qkvo":
        vals.update({f"stride_{x}m": head_dim, f"stride_{x}n": head_dim, f"stride_{x}h": n * head_dim,
                     f"stride_{x}b": heads * n * head_dim})
    sig, attrs = {}, {}
    for i, a in enumerate(names):
        if a in consts:
            sig[a] = "constexpr"
        elif a in ("Q", "K", "V", "O", "MASK"):
            sig[a] = "*fp16"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif a == "qk_scale":
            sig[a] = "fp32"
        else:
            sig[a] = "i32"
            if vals.get(a, 1) % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kern, signature=sig, attrs=attrs,
                    constexprs={(names.index(k),): v for k, v in consts.items()})
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                         options=dict(num_warps=warps, num_stages=stages)).asm["ptx"]
    return dict(Counter(re.findall(r"ld\.global[.\w]*|cp\.async\.c[ag]\.shared\.global", ptx)))

print(json.dumps({f"{d}/{a}": ptx_loads(d, a) for d, a in ((88, 8), (88, 1), (128, 8))}))
"""


def test_head_dim_88_compiles_to_vector_loads_for_sm90():
    triton = pytest.importorskip("triton")
    pytest.importorskip("triton.backends.nvidia")
    if not triton.__version__.startswith("3.9"):  # the script drives compiler internals (ASTSource)
        pytest.skip(f"written against triton 3.9's compiler API, this is {triton.__version__}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    if proc.returncode != 0:
        if "ptxas" in proc.stderr.lower() and "not found" in proc.stderr.lower():
            pytest.skip("no ptxas in this triton install")
        raise AssertionError(proc.stderr[-3000:])
    loads = json.loads(proc.stdout.strip().splitlines()[-1])
    aligned, plain, d128 = loads["88/8"], loads["88/1"], loads["128/8"]
    assert aligned.get("ld.global.v4.b32", 0) > 0 and aligned.get("cp.async.cg.shared.global", 0) > 0
    assert "ld.global.b16" not in aligned
    assert aligned == d128  # head dim 88 now loads as 128 does
    assert plain.get("ld.global.b16", 0) > 0 and "cp.async.cg.shared.global" not in plain  # as before
