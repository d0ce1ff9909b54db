"""Weight-only int4/int8 builds: the block packing against ONNX Runtime's kernels, the streamed export
(graph traced on fake parameters, weights written from the checkpoint a tensor at a time), parity
recorded relative and re-checked by `verify`, the runtime's answers next to the fp32 build's, and the
reduced-depth twin on the streamed path."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from allspark.errors import ConfigError
from allspark.export.build import export_build, resolve_precision
from allspark.export.quantize import QuantConfig, dequantize_rows, quantize_experts, quantize_rows
from allspark.export.verify import verify_build
from allspark.onnxrt import session


def _run(nodes, inits, inputs, outputs, feed):
    g = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(a, n) for n, a in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                          ir_version=10)
    import onnxruntime as ort

    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k", [96, 100])  # whole blocks, and a last block padded
def test_matmul_nbits_runs_what_we_pack(bits, k):
    """MatMulNBits (accuracy level 0: fp32 arithmetic) on our packing equals A @ dequantized(W)^T, and
    dequantization stays within half a quantization step of W (one step for the values clamped at
    the far end: the symmetric range is -8..7 steps, the block's largest magnitude sits at -8)."""
    q = QuantConfig(bits=bits, block_size=32, accuracy_level=0)
    rng = np.random.default_rng(bits + k)
    w = rng.normal(0, 0.1, (48, k)).astype(np.float32)  # a Linear's (N, K)
    packed, scales = quantize_rows(w, q)
    deq = dequantize_rows(packed, scales, k, q)
    step = np.abs(np.repeat(scales, 32, axis=1)[:, :k])  # (MLAS stores symmetric scales signed)
    err = np.abs(deq - w)
    assert np.all(err <= step + 1e-6) and np.mean(err <= 0.5 * step + 1e-6) > 0.97
    a = rng.normal(0, 1, (5, k)).astype(np.float32)
    node = helper.make_node("MatMulNBits", ["a", "b", "s"], ["y"], domain="com.microsoft", K=k, N=48, bits=bits,
                            block_size=32, accuracy_level=0)
    y = _run([node], {"b": packed, "s": scales}, [helper.make_tensor_value_info("a", TensorProto.FLOAT, [None, k])],
             [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 48])], {"a": a})
    np.testing.assert_allclose(y, a @ deq.T, atol=2e-4, rtol=1e-4)


def test_qmoe_runs_what_we_pack():
    """QMoE with one-hot routing, our expert packing: each row through its own set, SiLU between."""
    q = QuantConfig(bits=4, block_size=32, accuracy_level=0)
    rng = np.random.default_rng(0)
    A, H, r = 3, 64, 32
    down, up = rng.normal(0, 0.1, (A, r, H)).astype(np.float32), rng.normal(0, 0.1, (A, H, r)).astype(np.float32)
    b1, b2 = rng.normal(0, 0.1, (A, r)).astype(np.float32), rng.normal(0, 0.1, (A, H)).astype(np.float32)
    (w1, s1), (w2, s2) = quantize_experts(down, q), quantize_experts(up, q)
    x, ids = rng.normal(0, 1, (6, H)).astype(np.float32), np.array([0, 2, 1, 1, 2, 0])
    node = helper.make_node("QMoE", ["x", "route", "w1", "s1", "b1", "w2", "s2", "b2"], ["y"], domain="com.microsoft",
                            activation_type="silu", k=1, normalize_routing_weights=1, expert_weight_bits=4,
                            block_size=32, accuracy_level=0)
    y = _run([node], {"w1": w1, "s1": s1, "b1": b1, "w2": w2, "s2": s2, "b2": b2},
             [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, H]),
              helper.make_tensor_value_info("route", TensorProto.FLOAT, [None, A])],
             [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, H])],
             {"x": x, "route": np.eye(A, dtype=np.float32)[ids]})
    d1 = [dequantize_rows(w1[a].reshape(r, -1, 16), s1[a], H, q) for a in range(A)]
    d2 = [dequantize_rows(w2[a].reshape(H, -1, 16), s2[a], r, q) for a in range(A)]
    ref = np.stack([(lambda z: z / (1 + np.exp(-z)))(x[t] @ d1[ids[t]].T + b1[ids[t]]) @ d2[ids[t]].T + b2[ids[t]]
                    for t in range(len(ids))])
    np.testing.assert_allclose(y, ref, atol=1e-4)


def test_quant_options_are_checked():
    with pytest.raises(ConfigError, match="power of two"):
        QuantConfig(block_size=48)
    with pytest.raises(ConfigError, match="4 or 8"):
        QuantConfig(bits=3)
    with pytest.raises(ConfigError, match="accuracy-level"):
        QuantConfig(accuracy_level=7)


def test_components_kept_at_int8():
    q = QuantConfig(bits=4, int8_components=("point_cloud_encoder",))
    assert q.for_component("point_cloud_encoder").bits == 8 and q.precision_of("point_cloud_encoder") == "int8"
    assert q.for_component("decoder") is q and q.precision_of("decoder") == "int4"
    assert QuantConfig(bits=8, int8_components=("decoder",)).for_component("decoder").bits == 8
    assert q.to_json()["int8_components"] == ["point_cloud_encoder"]


def test_unknown_int8_component_is_refused(ckpt, tmp_path):
    with pytest.raises(ConfigError, match=r"--int8-components: \['sar_encodr'\] are not components.*sar_encoder"):
        export_build(ckpt, tmp_path / "b", modalities=["sar"], precision="int4", progress=False,
                     quant={"int8_components": ("sar_encodr",)})
    assert not (tmp_path / "b").exists()


def test_default_precision_follows_the_checkpoint(ckpt, tmp_path):
    from allspark.model.fresh import new_checkpoint

    new_checkpoint("tiny", tmp_path / "h", modalities=["sar"], dtype="fp16", progress=False)
    assert resolve_precision(None, ckpt).value == "fp32"
    assert resolve_precision(None, tmp_path / "h").value == "fp16"
    assert resolve_precision("int4", tmp_path / "h").value == "int4"
    with pytest.raises(ConfigError, match="precision"):
        resolve_precision("int3", ckpt)


@pytest.fixture(scope="module")
def int4_build(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "int4"
    return out, export_build(ckpt, out, modalities=["rgb", "table", "language", "point_cloud"], precision="int4",
                             progress=False)


def test_int4_build_quantizes_checks_and_verifies(int4_build, build):
    out, m = int4_build
    assert m["precision"] == "int4" and m["quantization"]["bits"] == 4
    dec = m["components"]["decoder"]
    qf = dec["artifacts"]["onnx"]["quantization"]
    # every Linear of the 4 layers (7 each) and lm_head: MatMulNBits; no fp32 copy of a weight left
    assert qf["matmul_nbits"] == 4 * 7 + 1 and qf["weights_quantized"] == 29
    graph = onnx.load(str(out / "decoder.onnx"), load_external_data=False).graph
    assert not [i for i in graph.initializer if i.name.endswith("proj.weight")]
    for name, c in m["components"].items():
        p = c["parity"]
        assert p["passed"] and "tolerance_rms" in p, name
        assert c["export_process"].startswith("in process, streamed")
    # the decoder's int4 error is real (measured, not zero) and the head's fp32 weights are exact
    assert 1e-3 < max(e["rel_rms"] for e in dec["parity"]["outputs"].values()) < dec["parity"]["tolerance_rms"]
    assert max(e["max_rel"] for e in dec["parity"]["outputs"].values()) > 1e-3  # recorded for information
    assert max(e["max_abs"] for e in m["components"]["table_head"]["parity"]["outputs"].values()) < 1e-5
    fp32 = json.loads((build / "manifest.json").read_text())["components"]["decoder"]["artifacts"]["onnx"]["bytes"]
    assert dec["artifacts"]["onnx"]["bytes"] < 0.5 * fp32
    # the point-cloud encoder stays int8 (the registry's encoder_min_bits), judged at int8's tolerance
    assert m["quantization"]["int8_components"] == ["point_cloud_encoder"]
    pc = m["components"]["point_cloud_encoder"]
    assert pc["precision"] == "int8" and pc["artifacts"]["onnx"]["quantization"]["bits"] == 8
    assert pc["parity"]["tolerance_rms"] < dec["parity"]["tolerance_rms"]
    bits = {a.i for n in onnx.load(str(out / "point_cloud_encoder.onnx"), load_external_data=False).graph.node
            if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"}
    assert bits == {8}
    # the embedding table is kept fp16 (half the bytes), its rows cast back to fp32: a rounding error, measured
    emb = m["components"]["embed_tokens"]
    assert emb["artifacts"]["onnx"]["quantization"]["tables_fp16"] == 1
    g = onnx.load(str(out / "embed_tokens.onnx"), load_external_data=False).graph
    assert [i.data_type for i in g.initializer] == [onnx.TensorProto.FLOAT16]
    assert [o.type.tensor_type.elem_type for o in g.output] == [onnx.TensorProto.FLOAT]
    assert 0 < max(e["rel_rms"] for e in emb["parity"]["outputs"].values()) < emb["parity"]["tolerance_rms"] == 1e-3
    assert verify_build(out) == []


def test_int4_answers_stay_near_fp32(int4_build, build):
    from allspark.model.registry import random_inputs
    from allspark.runtime import Runtime

    q, f = Runtime.load(int4_build[0]), Runtime.load(build)
    rng = np.random.default_rng(0)
    for _ in range(3):
        x = random_inputs(q.config.modality("table"), rng)
        a, b = q.predict("table", x).values, f.predict("table", x).values
        assert np.abs(a - b).max() <= 0.35 * max(np.abs(b).max(), 1e-6)
        img = random_inputs(q.config.modality("rgb"), rng)
        sa, sb = q.predict("rgb", img).scores, f.predict("rgb", img).scores
        assert max(abs(sa[k] - sb[k]) for k in sb) < 0.05  # probabilities over 45 classes


def test_int8_streamed_with_a_twin_decoder(ckpt, tmp_path):
    """int8 with `--parity twin`: the decoder is checked through its 2-layer twin, written by the same
    streamed code into validation/, and `verify` re-runs the twin."""
    m = export_build(ckpt, tmp_path / "b", modalities=["sar"], precision="int8", parity="twin", progress=False)
    p = m["components"]["decoder"]["parity"]
    assert p["passed"] and "first 2 of 4" in p["scope"] and (tmp_path / "b" / p["twin_graph"]).is_file()
    assert 0 < max(e["rel_rms"] for e in p["outputs"].values()) < p["tolerance_rms"]
    assert verify_build(tmp_path / "b") == []


def test_quantized_adapters_become_qmoe(tmp_path):
    """Adapter widths in whole blocks (the demo preset: 128 -> 64): the stacked sets are QMoE, and
    `--adapter-weights float` keeps MoE for comparison."""
    from allspark.model.fresh import new_checkpoint

    new_checkpoint("demo", tmp_path / "ck", modalities=["language", "sar"], progress=False)
    m = export_build(tmp_path / "ck", tmp_path / "q", precision="int4", progress=False)
    dec = m["components"]["decoder"]
    assert dec["artifacts"]["onnx"]["adapter_ops"] == {"QMoE": 4} and dec["parity"]["passed"]
    sess = session(tmp_path / "q" / "decoder.onnx")  # runs
    assert sess.get_inputs()[0].name == "inputs_embeds"
    m = export_build(tmp_path / "ck", tmp_path / "f", modalities=["language"], precision="int4", progress=False,
                     quant={"adapters": False})
    assert m["components"]["decoder"]["artifacts"]["onnx"]["adapter_ops"] == {"MoE": 4}


def test_streamed_export_never_materializes_the_model(ckpt, monkeypatch, tmp_path):
    """The writer reads each parameter once, one at a time; parity materializes only the component it
    checks, and every parameter is back on the meta device afterwards."""
    from allspark.model import skeleton

    reads: list[str] = []
    real_read = skeleton.CheckpointTensors.read

    def spy(self, name):
        reads.append(name)
        return real_read(self, name)

    monkeypatch.setattr(skeleton.CheckpointTensors, "read", spy)
    held = []
    real_load = skeleton.load_skeleton

    def keep(*a, **k):
        model, t = real_load(*a, **k)
        held.append(model)
        return model, t

    import allspark.export.build as B

    monkeypatch.setattr(B, "load_skeleton", keep)
    export_build(ckpt, tmp_path / "b", modalities=["sar"], precision="int4", progress=False)
    (model,) = held
    assert all(p.is_meta for p in model.parameters())
    assert "llm.lm_head.weight" in reads and any(n.startswith("packs.sar.encoder") for n in reads)
    # the writer reads a tensor once per graph that holds it; parity reads the checked module once more
    assert reads.count("llm.model.layers.0.self_attn.q_proj.weight") == 2


def test_int4_decoder_skeleton_runs_in_the_decode_bench(int4_build, tmp_path):
    """The int4 decoder without its packed weights (what a GPU machine receives for the int4 decode
    target): its MatMulNBits blocks are dropped too, refilled with random bytes there, and it runs."""
    import onnx

    from allspark.bench.decode import run_decode_bench
    from allspark.bench.skeleton import strip

    out, m = int4_build
    skel = tmp_path / "skel"
    skel.mkdir()
    for name in ("embed_tokens", "decoder"):
        src = out / m["components"][name]["artifacts"]["onnx"]["file"]
        facts = strip(src, skel / f"{name}.onnx")
        kept = onnx.load(str(skel / f"{name}.onnx"), load_external_data=False)
        packed = [i for i in kept.graph.initializer if i.data_type == onnx.TensorProto.UINT8 and i.doc_string]
        assert facts["bytes"] < 2_000_000 and (name == "embed_tokens" or packed)
    r = run_decode_bench(["tiny"], [2], context=4, steps=2, warmup=0, device="cpu", ways=("onnxruntime-host",),
                         progress=False, onnx_dirs={"tiny": skel})
    entry = r["presets"]["tiny"]
    assert entry["2"]["onnxruntime-host"]["finite"], entry
    # the bandwidth figure reads the int4 graph's own bytes, well under the fp32 parameters' 4 bytes each
    assert 0 < entry["given_decoder_weight_bytes"] < entry["decoder_parameters"] * 4 * 0.6


def test_gpu_check_int4_stage_rehearses_on_a_carried_skeleton(int4_build, tmp_path, capsys):
    """`make gpu-check`'s int4 stage: the int4 build kept as a skeleton (`--make-int4-skeleton`),
    decoded through `bench decode` at its own preset, judged against the <= 1.6 ms goal."""
    import json

    from allspark.bench import gpu_check as g

    out, _ = int4_build
    skel = tmp_path / "int4-skeleton"
    assert g.main(["--make-int4-skeleton", str(out), "--int4", str(skel)]) == 0
    assert json.loads((skel / "manifest.json").read_text())["skeleton"]
    res = tmp_path / "dry"
    assert g.main(["--dry-run", "--stages", "int4", "--int4", str(skel), "--out", str(res)]) == 0
    assert json.loads((res / "stage-int4.json").read_text())["rc"] == 0
    t = json.loads((res / "summary.json").read_text())["targets"]["int4_decode_ms"]
    assert t["by"] == "tiny, onnxruntime-host" and t["measured"] > 0 and t["met"] == (t["measured"] <= 1.6)
    assert "| paper decoder in int4" in (res / "README.md").read_text() and "| <= 1.6 |" in (res / "README.md").read_text()
    # without a skeleton the stage says what it needs instead of failing
    assert g.main(["--dry-run", "--stages", "int4", "--int4", str(tmp_path / "none"), "--out", str(res)]) == 0
    assert "--make-int4-skeleton" in json.loads((res / "stage-int4.json").read_text())["skipped"]
