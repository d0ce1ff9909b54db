"""fp16 checkpoints export at their own size: the fp32 reference is computed block by block, and the
manifest (and `allspark verify`) say so."""

from __future__ import annotations

import copy

import numpy as np
import torch

from allspark.export.build import export_build
from allspark.export.specs import component_specs
from allspark.export.upcast import fp32_reference
from allspark.export.validate import reference
from allspark.export.verify import verify_report
from allspark.model.checkpoint import load_checkpoint
from allspark.model.fresh import new_checkpoint


def test_blockwise_reference_equals_fp32_on_the_rounded_weights(tiny_model):
    half = copy.deepcopy(tiny_model).half()
    exact = copy.deepcopy(half).float()  # the same fp16-rounded weights, all in fp32 at once
    dec = {s.name: s for s in component_specs(half)}["decoder"]
    ref = {s.name: s for s in component_specs(exact)}["decoder"]
    hooks = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in half.modules()]  # (adapters hook layers)
    got, how = reference(dec)
    want, how32 = reference(ref)
    assert "float16 weights" in how and "upcast one at a time" in how and "fp32 weights" in how32
    for g, w in zip(got, want):
        for k in w:
            if k.startswith("out:"):
                np.testing.assert_allclose(g[k], w[k], rtol=0, atol=1e-6, err_msg=k)
    # afterwards: every weight back in fp16 (bit for bit), no hook left behind
    for (n, a), (_, b) in zip(half.named_parameters(), exact.named_parameters()):
        assert a.dtype == torch.float16 and torch.equal(a.float(), b), n
    assert hooks == [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in half.modules()]


def test_fp32_reference_leaves_fp32_modules_alone(tiny_model):
    before = [p.data_ptr() for p in tiny_model.parameters()]
    with fp32_reference(tiny_model) as how:
        assert "fp32 weights" in how
    assert before == [p.data_ptr() for p in tiny_model.parameters()]


def test_fp16_checkpoint_exports_fp16_with_a_described_reference(tmp_path):
    new_checkpoint("tiny", tmp_path / "ck", modalities=["language"], dtype="fp16", progress=False)
    model = load_checkpoint(tmp_path / "ck", dtype=None)  # its own dtype, built without an fp32 copy
    assert {p.dtype for p in model.llm.parameters()} == {torch.float16}
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    m = export_build(tmp_path / "ck", tmp_path / "b", precision="fp16", progress=False)
    dec = m["components"]["decoder"]
    assert dec["parity"]["passed"] and "float16 weights" in dec["parity"]["reference"]
    report = {r.name: r for r in verify_report(tmp_path / "b")}
    assert report["decoder"].ok
    assert any("against PyTorch in fp32 on the checkpoint's float16 weights" in c for c in report["decoder"].checked)


def test_reference_keeps_fp32_buffers_and_skips_meta_weights(tiny_model):
    """An fp16 module's fp32 buffers (the rotary frequencies) stay fp32 and bit-identical across
    references; meta weights (a streamed export's unused ones) are neither the dtype nor touched.
    (Restoring every tensor "to fp16" rounded the frequencies after the first validation case.)"""
    half = copy.deepcopy(tiny_model).half()
    for mod in half.modules():  # as load_checkpoint(dtype=None) builds it: fp16 weights, fp32 frequencies
        if type(mod).__name__.endswith("RotaryEmbedding"):
            mod.inv_freq = mod.inv_freq.float()
    freqs = {n: b.clone() for n, b in half.named_buffers() if "inv_freq" in n}
    dec = {s.name: s for s in component_specs(half)}["decoder"]
    first, _ = reference(dec)
    again, _ = reference(dec)
    for a, b in zip(first, again):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    for n, b in half.named_buffers():
        if n in freqs:
            assert b.dtype == torch.float32 and torch.equal(b, freqs[n]), n
    meta = torch.nn.Linear(4, 4, device="meta", dtype=torch.float16)
    holder = torch.nn.ModuleDict({"real": torch.nn.Linear(4, 4), "unused": meta})
    with fp32_reference(holder) as how:
        assert "fp32 weights" in how and meta.weight.is_meta and meta.weight.dtype == torch.float16


def test_streamed_fp32_export_of_an_fp16_checkpoint_meets_fp32_parity(tmp_path):
    new_checkpoint("tiny", tmp_path / "ck", modalities=["language"], dtype="fp16", progress=False)
    m = export_build(tmp_path / "ck", tmp_path / "b", precision="fp32", stream=True, progress=False)
    dec = m["components"]["decoder"]["parity"]
    assert dec["passed"] and dec["tolerance_abs"] == 1e-4
    assert max(o["max_abs"] for o in dec["outputs"].values()) < 1e-4
