"""Parity in slices: the decoder checked through a reduced-depth twin sharing its real first layers."""

from __future__ import annotations

import json

import onnx
import pytest

from allspark.errors import ConfigError
from allspark.export.build import export_build
from allspark.export.twin import needs_twin, reduced_depth
from allspark.export.verify import verify_report


def test_reduced_depth_shares_layers_and_restores(tiny_model):
    layers = list(tiny_model.llm.model.layers)
    n, cfg = tiny_model.llm.config.num_hidden_layers, tiny_model.config
    with reduced_depth(tiny_model, 2) as keep:
        assert keep == 2 and tiny_model.config.llm.num_layers == 2
        assert list(tiny_model.llm.model.layers) == layers[:2]  # the same modules, so the same weights
    assert list(tiny_model.llm.model.layers) == layers and tiny_model.llm.config.num_hidden_layers == n
    assert tiny_model.config is cfg
    with reduced_depth(tiny_model, 99) as keep:
        assert keep == n


def test_twin_parity_is_recorded_and_verified(ckpt, tmp_path):
    m = export_build(ckpt, tmp_path / "b", modalities=["language"], parity="twin", twin_layers=2, progress=False,
                     static_cache=True)
    dec = m["components"]["decoder"]
    p = dec["parity"]
    assert p["passed"] and p["scope"].startswith("reduced-depth twin: the first 2 of 4 decoder layers")
    assert p["twin_graph"] == "validation/decoder.twin.onnx" and p["twin_graph"] in m["sha256"]
    full = onnx.load(str(tmp_path / "b" / "decoder.onnx"), load_external_data=False)
    twin = onnx.load(str(tmp_path / "b" / p["twin_graph"]), load_external_data=False)
    attn = lambda g: sum(n.op_type == "Attention" for n in g.graph.node)  # noqa: E731
    assert (attn(full), attn(twin)) == (4, 2)  # the build keeps the full-depth graph
    assert len(dec["outputs"]) == 2 + 2 * 4  # logits, hidden state, present k/v per layer of the full graph
    static = dec["artifacts"]["onnx-static-cache"]["parity"]  # the static-cache graph: through its own twin
    assert static["passed"] and static["scope"] == p["scope"]
    assert static["twin_graph"] == "validation/decoder_static.twin.onnx" and static["twin_graph"] in m["sha256"]
    report = {r.name: r for r in verify_report(tmp_path / "b")}
    assert report["decoder"].ok and sum("reduced-depth twin" in c for c in report["decoder"].checked) == 2
    # a damaged twin graph is caught like any other file
    (tmp_path / "b" / p["twin_graph"]).write_bytes(b"garbage")
    assert not {r.name: r for r in verify_report(tmp_path / "b")}["decoder"].ok


def test_auto_uses_the_full_check_when_it_fits(build, tiny_model):
    m = json.loads((build / "manifest.json").read_text())
    assert "scope" not in m["components"]["decoder"]["parity"]
    assert not needs_twin(tiny_model, 0)


def test_parity_mode_is_validated(ckpt, tmp_path):
    with pytest.raises(ConfigError, match="parity: expected one of"):
        export_build(ckpt, tmp_path / "b", parity="some", progress=False)
    with pytest.raises(ConfigError, match="twin_layers"):
        export_build(ckpt, tmp_path / "b", twin_layers=0, progress=False)
