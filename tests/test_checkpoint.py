"""Checkpoint directory round trip, integrity checks, Lynx and LLaMA-directory import."""

from __future__ import annotations

import json

import pytest
import torch

from allspark.errors import CheckpointError
from allspark.model.checkpoint import load_checkpoint, save_checkpoint
from allspark.model.lynx import convert_lynx, export_lynx_state, import_llama
from allspark.model.weights import load_state_dict_file


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_round_trip_is_bit_exact(tiny_model, tiny_inputs, tmp_path):
    save_checkpoint(tiny_model, tmp_path / "ck")
    loaded = load_checkpoint(tmp_path / "ck")
    _assert_same_weights(tiny_model, loaded)
    assert loaded.modalities == tiny_model.modalities
    for m in ("rgb", "table", "language"):
        ra, rb = tiny_model.prepare(m, tiny_inputs[m]), loaded.prepare(m, tiny_inputs[m])
        assert ra.prompt_ids == rb.prompt_ids  # the tokenizer survives too
        assert torch.equal(tiny_model([ra])[0], loaded([rb])[0])


def test_subset_of_modalities(tiny_model, tmp_path):
    save_checkpoint(tiny_model, tmp_path / "ck")
    two = load_checkpoint(tmp_path / "ck", modalities=["sar", "graph"])
    assert list(two.modalities) == ["sar", "graph"]
    torch.testing.assert_close(two.packs["sar"].state_dict(), tiny_model.packs["sar"].state_dict(), rtol=0, atol=0)
    # the stacked adapter set of 'graph' moved from index 8 to 1 and must be the same weights
    gi = tiny_model.adapter_index("graph")
    assert torch.equal(two.adapters[0].down_weight[1], tiny_model.adapters[0].down_weight[gi])
    save_checkpoint(two, tmp_path / "two")
    assert json.loads((tmp_path / "two/manifest.json").read_text())["modalities"] == ["sar", "graph"]
    with pytest.raises(CheckpointError, match="no pack for"):
        load_checkpoint(tmp_path / "two", modalities=["rgb"])


def test_fp16_checkpoint_stays_close(tiny_model, tmp_path):
    save_checkpoint(tiny_model, tmp_path / "ck", dtype=torch.float16)
    loaded = load_checkpoint(tmp_path / "ck")
    for k, v in tiny_model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, atol=2e-3, rtol=2e-3)


def test_tampered_or_malformed_checkpoints_are_refused(tiny_model, tmp_path):
    ck = save_checkpoint(tiny_model, tmp_path / "ck", )
    pack = ck / "packs/rgb.safetensors"
    data = bytearray(pack.read_bytes())
    data[-1] ^= 0xFF
    pack.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(ck)
    (ck / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="malformed JSON"):
        load_checkpoint(ck)
    (ck / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="expected format"):
        load_checkpoint(ck)
    with pytest.raises(CheckpointError, match="no manifest"):
        load_checkpoint(tmp_path / "nowhere")


def test_failed_save_leaves_nothing(tiny_model, tmp_path, monkeypatch):
    import allspark.model.checkpoint as C

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(C, "write_safetensors", boom)
    with pytest.raises(OSError):
        save_checkpoint(tiny_model, tmp_path / "ck")
    assert list(tmp_path.iterdir()) == []


def test_pack_with_wrong_keys_is_reported(tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    ck = save_checkpoint(tiny_model, tmp_path / "ck")
    sd = load_file(ck / "packs/sar.safetensors")
    sd["encoder.surprise"] = torch.zeros(1)
    del sd["encoder.conv1.weight"]
    save_file(sd, ck / "packs/sar.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys \['encoder.conv1.weight'\].*unexpected keys \['encoder.surprise'\]"):
        load_checkpoint(ck, modalities=["sar"], verify=False)


def _lynx_files(model, tmp_path, modality="rgb", with_head=True, extra=None):
    sd = export_lynx_state(model, modality)
    if not with_head:
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    sd["LLM.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # Lynx's buffer, to drop
    sd.update(extra or {})
    torch.save({"model": sd}, tmp_path / "lynx.pt")
    model.llm.save_pretrained(tmp_path / "vicuna")
    model.tokenizer.save_pretrained(tmp_path / "vicuna")
    return tmp_path / "lynx.pt", tmp_path / "vicuna"


def _tiny_dims(model, modality="rgb"):
    """What a `tiny` model's weights cannot tell: 2 heads of 16 (no ViT or Lynx convention), its labels."""
    return {"encoder": {"heads": 2}, "bridge": {"heads": 2}, "labels": list(model.config.modality(modality).labels)}


def test_lynx_round_trip_is_exact(tiny_model, tiny_inputs, tmp_path):
    lynx, vicuna = _lynx_files(tiny_model, tmp_path)
    assert load_state_dict_file(lynx)["LLM.model.layers.0.output_adapter.scaling"].shape == (1,)  # as Lynx stores it
    report = convert_lynx(lynx, vicuna, "rgb", tmp_path / "ck", config=_tiny_dims(tiny_model))
    assert not report.created
    assert "LLM.model.layers.0.self_attn.rotary_emb.inv_freq" in report.dropped
    model = load_checkpoint(tmp_path / "ck")
    ra, rb = tiny_model.prepare("rgb", tiny_inputs["rgb"]), model.prepare("rgb", tiny_inputs["rgb"])
    assert torch.equal(tiny_model([ra])[0], model([rb])[0])


def test_lynx_missing_head_is_fresh_and_left_over_keys_refused(tiny_model, tmp_path):
    lynx, vicuna = _lynx_files(tiny_model, tmp_path, with_head=False)
    report = convert_lynx(lynx, vicuna, "rgb", tmp_path / "ck", config=_tiny_dims(tiny_model))
    assert sorted(report.created) == ["head.proj.bias", "head.proj.weight"]
    lynx, vicuna = _lynx_files(tiny_model, tmp_path, extra={"text_decoder.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="text_decoder.weight"):
        convert_lynx(lynx, vicuna, "rgb", tmp_path / "ck2", config=_tiny_dims(tiny_model))


def test_lynx_import_checks_shapes(tiny_model, tmp_path):
    lynx, vicuna = _lynx_files(tiny_model, tmp_path, extra={"bridge.layers.0.1.3.weight": torch.zeros(64, 3)})
    with pytest.raises(CheckpointError, match=r"bridge.layers.0.1.3.weight: expected shape \(64, 128\), got \(64, 3\)"):
        convert_lynx(lynx, vicuna, "rgb", tmp_path / "ck", config=_tiny_dims(tiny_model))


def test_pickles_are_not_unpickled(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"model": Evil()}))
    with pytest.raises(CheckpointError, match="weights-only"):
        load_state_dict_file(tmp_path / "evil.pt")


def test_llama_directory_import(tiny_model, tmp_path):
    tiny_model.llm.save_pretrained(tmp_path / "vicuna")
    model = import_llama(tmp_path / "vicuna", preset="tiny", modalities=["table"])
    for k, v in tiny_model.llm.state_dict().items():
        assert torch.equal(model.llm.state_dict()[k], v), k
    assert model.tokenizer is None  # no tokenizer files in that directory
