"""Grouped-query attention end to end on a tiny config (4 query heads sharing 2 key/value heads, as
TinyLlama's 32 share 4): the PyTorch model, its equivalence with multi-head attention on repeated
key/value heads, the exported decoder's KV cache and parity, and the runtime against the reference
(predictions, greedy and beam generation)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from allspark.contract import read_manifest
from allspark.contract.tensors import cache_names, past_names
from allspark.errors import ConfigError
from allspark.model.config import AllSparkConfig, LLMConfig
from allspark.model.model import AllSpark
from allspark.model.presets import get_preset
from allspark.model.registry import random_inputs
from allspark.model.tokenizer import train_tokenizer
from allspark.runtime import GenerationConfig, Request, Runtime

MODALITIES = ["language", "code", "hsi"]  # three adapter sets; hsi: an encoder, a bridge and a head
KV_HEADS = 2
FP32_ATOL = 1e-4


def _model(num_kv_heads: int, seed: int = 0) -> AllSpark:
    cfg = get_preset("tiny", MODALITIES)
    cfg = dataclasses.replace(cfg, name=f"tiny-kv{num_kv_heads}",
                              llm=dataclasses.replace(cfg.llm, num_kv_heads=num_kv_heads))
    torch.manual_seed(seed)
    model = AllSpark(cfg, tokenizer=train_tokenizer(cfg.llm.vocab_size))
    with torch.no_grad():  # as build_model: adapters that make a difference
        for a in model.adapters:
            a.up_weight.normal_(0.0, 0.05)
    return model


@pytest.fixture(scope="module")
def gqa_model():
    return _model(KV_HEADS)


@pytest.fixture(scope="module")
def gqa_inputs(gqa_model):
    rng = np.random.default_rng(7)
    return {m: [random_inputs(gqa_model.config.modality(m), rng, v) for v in range(2)] for m in MODALITIES}


@pytest.fixture(scope="module")
def gqa_build(gqa_model, tmp_path_factory):
    """The GQA model as a checkpoint, exported (fused attention, fp32): about 20 s on 2 cores."""
    from allspark.export.build import export_build
    from allspark.model.checkpoint import save_checkpoint

    ck = save_checkpoint(gqa_model, tmp_path_factory.mktemp("gqa") / "ck")
    out = ck.parent / "build"
    export_build(ck, out, progress=False)
    return out


@pytest.fixture(scope="module")
def gqa_rt(gqa_build):
    return Runtime.load(gqa_build)


def _rows(model, inputs):
    return [model.prepare(m, inputs[m][0]) for m in MODALITIES]


# ---- config and PyTorch model ---------------------------------------------------------------------


def test_kv_heads_config():
    c = LLMConfig(vocab_size=10, hidden_size=64, num_layers=1, num_heads=4, intermediate_size=8, adapter_size=2)
    assert c.num_kv_heads == 4  # 0 means multi-head attention
    with pytest.raises(ConfigError, match="must divide by num_kv_heads 3"):
        dataclasses.replace(c, num_kv_heads=3)
    base = get_preset("base")
    assert (base.llm.num_heads, base.llm.num_kv_heads, base.llm.head_dim) == (32, 4, 64)
    assert AllSparkConfig.from_dict(json.loads(json.dumps(base.to_dict()))) == base


def test_pytorch_model_has_grouped_kv_projections_and_cache(gqa_model, gqa_inputs):
    c = gqa_model.config.llm
    assert gqa_model.llm.config.num_key_value_heads == KV_HEADS
    attn = gqa_model.llm.model.layers[0].self_attn
    assert tuple(attn.q_proj.weight.shape) == (c.num_heads * c.head_dim, c.hidden_size)
    assert tuple(attn.k_proj.weight.shape) == tuple(attn.v_proj.weight.shape) == (KV_HEADS * c.head_dim, c.hidden_size)
    from transformers import DynamicCache

    with torch.no_grad():
        b = gqa_model.build_batch(_rows(gqa_model, gqa_inputs))
        cache = DynamicCache()
        gqa_model.decode(b, cache, use_cache=True)
    B, T = b.attention_mask.shape
    assert tuple(cache.layers[0].keys.shape) == tuple(cache.layers[-1].values.shape) == (B, KV_HEADS, T, c.head_dim)


def test_gqa_equals_mha_with_repeated_kv_heads(gqa_model, gqa_inputs):
    """Query head h reads key/value head h // (heads / kv_heads): copying each K/V projection that
    many times into a multi-head model gives the same outputs (mixed batch, left padding)."""
    c = gqa_model.config.llm
    mha = _model(0, seed=1)
    rep = c.num_heads // KV_HEADS
    state = {}
    for k, v in gqa_model.state_dict().items():
        if k.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight")):
            v = v.view(KV_HEADS, c.head_dim, c.hidden_size).repeat_interleave(rep, 0).reshape(-1, c.hidden_size)
        state[k] = v
    mha.load_state_dict(state, strict=True)
    rows = _rows(gqa_model, gqa_inputs)
    with torch.no_grad():
        b = gqa_model.build_batch(rows)
        real = b.attention_mask.bool()
        h_gqa = gqa_model.decode(b).last_hidden_state
        h_mha = mha.decode(b).last_hidden_state
        torch.testing.assert_close(h_gqa[real], h_mha[real], atol=1e-5, rtol=1e-5)
        # and transformers' eager attention (what `export --no-fuse` traces) agrees with SDPA
        gqa_model.llm.config._attn_implementation = "eager"
        try:
            h_eager = gqa_model.decode(b).last_hidden_state
        finally:
            gqa_model.llm.config._attn_implementation = "sdpa"
        torch.testing.assert_close(h_eager[real], h_gqa[real], atol=1e-5, rtol=1e-5)
    assert gqa_model.generate(rows, max_new_tokens=6, stop_at_eos=False) == \
        mha.generate(rows, max_new_tokens=6, stop_at_eos=False)


# ---- export -------------------------------------------------------------------------------------------


def test_exported_decoder_cache_has_kv_heads_and_passes_parity(gqa_build, gqa_model):
    m = read_manifest(gqa_build)
    c = gqa_model.config.llm
    assert m["config"]["llm"]["num_kv_heads"] == KV_HEADS
    dec = m["components"]["decoder"]
    assert dec["cache"] == {"past": past_names(c.num_layers), "present": cache_names(c.num_layers, "present")}
    dims = {t["name"]: t["dims"] for t in dec["inputs"] + dec["outputs"]}
    for name in dec["cache"]["past"]:
        assert dims[name] == ["batch", KV_HEADS, "past_len", c.head_dim], name
    for name in dec["cache"]["present"]:
        assert dims[name] == ["batch", KV_HEADS, "total_len", c.head_dim], name
    assert dec["artifacts"]["onnx"]["attention_ops"] == {"Attention": c.num_layers}
    for name, comp in m["components"].items():
        assert comp["parity"]["passed"], name
        assert max(e["max_abs"] for e in comp["parity"]["outputs"].values()) <= FP32_ATOL, name
    assert dec["adapters"]["torch_grouped_vs_gather_max_abs"] < 1e-5
    from allspark.onnxrt import session

    past = [i for i in session(gqa_build / "decoder.onnx").get_inputs() if i.name.startswith("past_")]
    assert len(past) == 2 * c.num_layers and all(i.shape[1] == KV_HEADS for i in past)


def test_exported_decoder_matches_transformers_over_prefill_and_greedy_steps(gqa_build, gqa_model, gqa_inputs):
    from test_export import _ort_greedy

    rows = _rows(gqa_model, gqa_inputs)
    with torch.no_grad():
        batch = gqa_model.build_batch(rows)
    assert len(set(batch.adapter_ids.tolist())) == 3 and (batch.attention_mask == 0).any()
    got, logits = _ort_greedy(gqa_build, batch, steps=10)
    assert got.tolist() == gqa_model.generate(rows, max_new_tokens=11, stop_at_eos=False)
    with torch.no_grad():
        ref = gqa_model.llm.lm_head(gqa_model.decode(batch).last_hidden_state[:, -1]).numpy()
    np.testing.assert_allclose(logits[0], ref, atol=FP32_ATOL)


# ---- runtime ------------------------------------------------------------------------------------------


def test_runtime_predictions_equal_reference(gqa_rt, gqa_model, gqa_inputs):
    for x in gqa_inputs["hsi"]:
        p = gqa_rt.predict("hsi", x)
        row = gqa_model.prepare("hsi", x)
        ref = gqa_model.postprocess(row, gqa_model([row])[0])
        assert p.label == ref.label
        assert max(abs(p.scores[k] - ref.scores[k]) for k in p.scores) < 1e-4
    reqs = [Request(m, gqa_inputs[m][v]) for v in range(2) for m in ("hsi", "language")]
    for r, b in zip(reqs, gqa_rt.predict_batch(reqs)):  # mixed batch == alone
        single = gqa_rt.predict(r.modality, r.inputs)
        assert (b.label, b.text, b.tokens) == (single.label, single.text, single.tokens)


def test_runtime_generation_equals_reference(gqa_rt, gqa_build, gqa_model, gqa_inputs):
    for m in ("language", "code"):
        x = gqa_inputs[m][1]
        row = gqa_model.prepare(m, x)
        greedy = GenerationConfig(max_new_tokens=10)
        assert gqa_rt.generate(m, x, config=greedy).tokens == gqa_model.generate([row], config=greedy)[0]
    beams = GenerationConfig.lynx(max_new_tokens=8)  # 5 beams: the cache reordered every step
    x = gqa_inputs["code"][0]
    want = gqa_model.generate([gqa_model.prepare("code", x)], config=beams)[0]
    assert gqa_rt.generate("code", x, config=beams).tokens == want
    assert Runtime.load(gqa_build, backend="torch").generate("code", x, config=beams).tokens == want


@pytest.mark.slow
def test_unfused_export_of_grouped_attention(gqa_build, tmp_path):
    """`export --no-fuse`: transformers' eager attention (K/V repeated per group) in MatMul/Softmax."""
    from allspark.export.build import export_build

    ck = gqa_build.parent / "ck"
    m = export_build(ck, tmp_path / "nofuse", modalities=["language"], fuse=False, progress=False)
    dec = m["components"]["decoder"]
    assert "Attention" not in dec["artifacts"]["onnx"]["attention_ops"] and dec["parity"]["passed"]
