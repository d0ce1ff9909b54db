"""Reference model: shapes per modality, mixed batches equal single rows, adapter selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from allspark.modalities import Modality
from allspark.model import HeadKind, spec
from allspark.model.registry import random_inputs, specs

ALL_MODALITIES = [m.value for m in Modality]

ATOL_FP32 = 1e-5  # batch vs single row: only padding and summation order differ


# what each modality's head does, as in the paper's task list (a registry edit that changes one fails here)
PAPER_HEADS = {Modality.LANGUAGE: HeadKind.GENERATION, Modality.CODE: HeadKind.GENERATION,
               Modality.TABLE: HeadKind.REGRESSION, Modality.RGB: HeadKind.CLASSIFICATION,
               Modality.MSI: HeadKind.CLASSIFICATION, Modality.HSI: HeadKind.PIXEL_CLASSIFICATION,
               Modality.SAR: HeadKind.CLASSIFICATION, Modality.TRAJECTORY: HeadKind.REGRESSION,
               Modality.GRAPH: HeadKind.REGRESSION, Modality.POINT_CLOUD: HeadKind.CLASSIFICATION}


def test_registry_covers_every_modality():
    assert list(specs())[:len(Modality)] == [m.value for m in Modality]  # built-ins first, in adapter order
    assert set(PAPER_HEADS) == set(Modality)
    for m in Modality:
        s = spec(m)
        assert s.head is PAPER_HEADS[m], f"{m.value}: head {s.head}, the paper's is {PAPER_HEADS[m]}"
        for preset, mc in s.presets.items():  # a classifying head has one output per label
            if s.head.classifies:
                assert s.out_dim(mc) == len(mc.labels), (m.value, preset)
        # the paper gives a prompt for every modality but code
        assert bool(s.prompts) == (m != Modality.CODE)


@pytest.mark.parametrize("modality", ALL_MODALITIES)
def test_forward_shape_per_modality(tiny_model, tiny_inputs, modality):
    row = tiny_model.prepare(modality, tiny_inputs[modality])
    (y,) = tiny_model([row])
    mc, s = tiny_model.config.modality(modality), spec(modality)
    want = tiny_model.config.llm.vocab_size if s.head == HeadKind.GENERATION else s.out_dim(mc)
    assert y.shape == (want,)
    assert torch.isfinite(y).all()
    out = tiny_model.postprocess(row, y) if s.head != HeadKind.GENERATION else None
    if s.head in (HeadKind.CLASSIFICATION, HeadKind.PIXEL_CLASSIFICATION):
        assert out.label in mc.labels and abs(sum(out.scores.values()) - 1) < 1e-5
    elif s.head == HeadKind.REGRESSION:
        assert np.isfinite(out.values).all()


def test_encoder_token_counts(tiny_model, tiny_inputs):
    rgb = tiny_model.prepare("rgb", tiny_inputs["rgb"])
    media = tiny_model.pack("rgb").encoder(**tiny_model.tensors([rgb]))
    assert media.shape[1] == tiny_model.config.modality("rgb").encoder.num_tokens
    bridged = tiny_model.media_tokens(Modality.RGB, tiny_model.tensors([rgb]))
    assert bridged.shape == (1, tiny_model.config.bridge.num_latents, tiny_model.config.llm.hidden_size)


def test_mixed_batch_equals_rows_alone(tiny_model, tiny_inputs):
    rng = np.random.default_rng(7)
    order = list(rng.permutation(ALL_MODALITIES)) + ["rgb", "language"]  # repeats share encoder calls
    rows = [tiny_model.prepare(m, tiny_inputs[m]) for m in order]
    batched = tiny_model(rows)
    for r, y in zip(rows, batched):
        (alone,) = tiny_model([r])
        torch.testing.assert_close(y, alone, atol=ATOL_FP32, rtol=1e-5, msg=lambda s: f"{r.modality}: {s}")


def test_mixed_generation_equals_alone(tiny_model, tiny_inputs):
    rows = [tiny_model.prepare(m, tiny_inputs[m]) for m in ("language", "code", "rgb")]
    together = tiny_model.generate(rows, max_new_tokens=8)
    for r, toks in zip(rows, together):
        assert tiny_model.generate([r], max_new_tokens=8)[0] == toks
    assert all(len(t) > 0 for t in together)


def test_each_row_uses_its_own_adapter_set(tiny_model, tiny_inputs):
    """The same embeddings with another adapter set must change the output."""
    row = tiny_model.prepare("language", tiny_inputs["language"])
    b = tiny_model.build_batch([row, row])
    b.adapter_ids = torch.tensor([tiny_model.adapter_index("language"), tiny_model.adapter_index("code")])
    with torch.no_grad():
        h = tiny_model.decode(b).last_hidden_state[:, -1]
    assert (h[0] - h[1]).abs().max() > 1e-3


def test_llm_without_adapter_ids_is_an_error(tiny_model):
    from allspark.model.adapters import MissingAdapterIds

    with pytest.raises(MissingAdapterIds):
        tiny_model.llm(input_ids=torch.tensor([[1, 2, 3]]))


def test_shape_variants_preprocess_to_native_size(tiny_model):
    rng = np.random.default_rng(0)
    for m in ("rgb", "msi", "sar", "point_cloud"):
        mc = tiny_model.config.modality(m)
        a = tiny_model.prepare(m, random_inputs(mc, rng, 0))
        b = tiny_model.prepare(m, random_inputs(mc, rng, 1))
        for k in a.tensors:
            assert a.tensors[k].shape == b.tensors[k].shape, (m, k)


def test_trajectory_prediction_is_in_world_coordinates(tiny_model, tiny_inputs):
    x = tiny_inputs["trajectory"]
    shifted = {"observed": x["observed"] + np.float32(100.0)}
    ya = tiny_model.postprocess(r := tiny_model.prepare("trajectory", x), tiny_model([r])[0]).values
    yb = tiny_model.postprocess(r := tiny_model.prepare("trajectory", shifted), tiny_model([r])[0]).values
    assert ya.shape == (12, 2)
    np.testing.assert_allclose(yb - ya, 100.0, atol=1e-3)  # translation-equivariant by construction


def test_graph_prediction_adds_each_nodes_last_reading(tiny_model, tiny_inputs):
    """Issue 30: the graph head predicts each node's change from its last speed reading, so a head
    that outputs zeros is the last-value forecast."""
    from dataclasses import replace

    from allspark.modalities.graph import last_value

    mc, s = tiny_model.config.modality("graph"), spec("graph")
    x = tiny_inputs["graph"]
    row = tiny_model.prepare("graph", x)
    zero = s.postprocess(mc, np.zeros(s.out_dim(mc), np.float32), row.context)
    np.testing.assert_array_equal(zero, last_value(x, zero.shape))  # (nodes, horizon)
    y = np.arange(s.out_dim(mc), dtype=np.float32)
    np.testing.assert_allclose(s.postprocess(mc, y, row.context) - zero, y.reshape(zero.shape), atol=1e-5)
    # a config stored before `residual` existed reads as False: its head predicts the speeds themselves
    absolute = replace(mc, encoder=replace(mc.encoder, residual=False))
    _, ctx = s.preprocess(absolute, s.schema(absolute).validate("graph", x))
    np.testing.assert_array_equal(s.postprocess(absolute, y, ctx), y.reshape(zero.shape))


def test_a_graph_config_stored_without_residual_reads_as_absolute(tiny_model):
    from allspark.model.config import AllSparkConfig

    d = tiny_model.config.to_dict()
    graph = next(m for m in d["modalities"] if m["modality"] == "graph")
    assert graph["encoder"].pop("residual") is True  # tiny (and demo) forecast the change
    assert AllSparkConfig.from_dict(d).modality("graph").encoder.residual is False


def test_grouped_adapters_equal_per_row_gather(tiny_model, tiny_inputs):
    """The reference computes adapters grouped by set (each set's weights once); it equals the
    per-row gather on a batch that mixes sets in any order."""
    order = ["code", "rgb", "language", "rgb", "sar", "code"]
    rows = [tiny_model.prepare(m, tiny_inputs[m]) for m in order]
    grouped = tiny_model(rows)
    try:
        for a in tiny_model.adapters:
            a.impl = "gather"
        gathered = tiny_model(rows)
    finally:
        for a in tiny_model.adapters:
            a.impl = "grouped"
    for g, h in zip(grouped, gathered):
        torch.testing.assert_close(g, h, atol=1e-5, rtol=1e-5)
