"""`allspark new` writes the LLM tensor by tensor from the meta device, in the requested dtype."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from allspark.errors import ConfigError
from allspark.model.checkpoint import load_checkpoint
from allspark.model.fresh import INIT_STD, llm_tensor, new_checkpoint


def _llm_state(ckpt):
    state = {}
    for f in sorted((ckpt / "llm").glob("*.safetensors")):
        state.update(load_file(f))
    return state


def test_new_fp16_loads_and_runs(tmp_path):
    written = new_checkpoint("tiny", tmp_path / "ck", modalities=["language", "rgb"], dtype="fp16", progress=False)
    manifest = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    assert manifest["dtype"] == "float16" and written["llm_bytes"] > 0
    state = _llm_state(tmp_path / "ck")
    assert {t.dtype for t in state.values()} == {torch.float16}
    for name, t in state.items():
        if name.endswith("norm.weight"):
            assert torch.equal(t, torch.ones_like(t))
        elif t.numel() > 1000:  # transformers' LLaMA init: N(0, 0.02)
            assert abs(t.float().std().item() - INIT_STD) < 0.1 * INIT_STD, name
    packs = load_file(tmp_path / "ck" / "packs" / "rgb.safetensors")
    assert {t.dtype for t in packs.values() if t.is_floating_point()} == {torch.float16}
    model = load_checkpoint(tmp_path / "ck")
    rows = [model.prepare("language", {"text": "hello"}, "say"), model.prepare("rgb", {"image": torch.rand(3, 32, 32).numpy()})]
    assert all(torch.isfinite(y).all() for y in model(rows))


def test_new_dtypes_hold_one_draw(tmp_path):
    """fp32 and fp16 checkpoints of one seed: the same LLM values up to fp16 rounding; another seed differs."""
    new_checkpoint("tiny", tmp_path / "a", modalities=["language"], dtype="fp32", progress=False)
    new_checkpoint("tiny", tmp_path / "b", modalities=["language"], dtype="fp16", progress=False)
    new_checkpoint("tiny", tmp_path / "c", modalities=["language"], seed=1, progress=False)
    a, b, c = (_llm_state(tmp_path / k) for k in "abc")
    assert a.keys() == b.keys() == c.keys()
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(a[name].half(), b[name])
    assert not torch.equal(a[name], c[name])


def test_llm_tensor_is_deterministic():
    x = llm_tensor("model.layers.0.mlp.up_proj.weight", (8, 4), 3, 0, torch.float32)
    assert torch.equal(x, llm_tensor("model.layers.0.mlp.up_proj.weight", (8, 4), 3, 0, torch.float32))
    assert not torch.equal(x, llm_tensor("model.layers.0.mlp.up_proj.weight", (8, 4), 4, 0, torch.float32))


def test_new_rejects_unknown_dtype(tmp_path):
    with pytest.raises(ConfigError, match="dtype: expected one of"):
        new_checkpoint("tiny", tmp_path / "ck", dtype="int4", progress=False)
    assert not (tmp_path / "ck").exists()
