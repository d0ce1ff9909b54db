"""ONNX export: per-component parity, the decoder against transformers over prefill + 16 greedy
steps (three adapter sets, left padding), fused vs unfused graphs, manifest schema, verify, and
atomicity of the build directory."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
import torch

from allspark.contract import ManifestError, read_manifest, validate_manifest
from allspark.contract.tensors import past_names
from allspark.export.build import export_build
from allspark.export.specs import component_specs
from allspark.export.validate import _real_positions
from allspark.export.verify import verify_build
from allspark.model.checkpoint import load_checkpoint
from allspark.onnxrt import session

FP32_ATOL = 1e-4


def test_every_component_is_exported_checked_and_matches(build, tiny_model):
    m = read_manifest(build)
    names = {s.name for s in component_specs(tiny_model)}
    assert set(m["components"]) == names
    assert "rgb_encoder" in names and "language_head" not in names  # generation uses lm_head
    for name, c in m["components"].items():
        onnx.checker.check_model(str(build / c["artifacts"]["onnx"]["file"]), full_check=True)
        assert c["parity"]["passed"], name
        for out, e in c["parity"]["outputs"].items():
            assert e["max_abs"] <= FP32_ATOL, (name, out, e)
        # validated at shapes other than the export shape (batch 2)
        assert all(s[c["inputs"][0]["name"]][0] != 2 for s in c["parity"]["validation_shapes"])


def test_graphs_match_pytorch_on_fresh_inputs(build, tiny_model):
    """Independent of the recorded parity: new inputs (variant 3, batch 4) through ORT vs torch."""
    for spec in component_specs(tiny_model):
        values = spec.example(4, 3)
        with torch.no_grad():
            ref = spec.module(*spec.forward_args(values))
        ref = ref if isinstance(ref, tuple) else (ref,)
        sess = session(build / f"{spec.name}.onnx")
        got = sess.run([t.name for t in spec.outputs], {k: x.numpy() for k, x in values.items()})
        for t, g, r in zip(spec.outputs, got, ref):
            np.testing.assert_allclose(g, r.numpy(), atol=FP32_ATOL, rtol=1e-4, err_msg=f"{spec.name}.{t.name}")


def test_fused_attention_ops_are_in_the_graphs(build):
    m = read_manifest(build)
    onnx_facts = {n: c["artifacts"]["onnx"] for n, c in m["components"].items()}
    assert onnx_facts["decoder"]["attention_ops"] == {"Attention": m["config"]["llm"]["num_layers"]}
    assert onnx_facts["rgb_bridge"]["attention_ops"] == {"Attention": m["config"]["bridge"]["depth"]}


def _ort_greedy(build, batch, steps: int):
    """Prefill with an empty past, then `steps` greedy decode steps, all through ONNX Runtime."""
    m = read_manifest(build)
    L = m["config"]["llm"]["num_layers"]
    dec, emb = session(build / "decoder.onnx"), session(build / "embed_tokens.onnx")
    kv = [i for i in dec.get_inputs() if i.name.startswith("past_")][0].shape
    B = batch.inputs_embeds.shape[0]
    past = {n: np.zeros((B, kv[1], 0, kv[3]), np.float32) for n in past_names(L)}
    feed = {"inputs_embeds": batch.inputs_embeds.numpy(), "attention_mask": batch.attention_mask.numpy(),
            "position_ids": batch.position_ids.numpy(), "adapter_ids": batch.adapter_ids.numpy(), **past}
    mask, pos = batch.attention_mask.numpy(), batch.position_ids.numpy()[:, -1:]
    tokens, logits_seen = [], []
    for _ in range(steps + 1):
        outs = dec.run(None, feed)
        logits = outs[0][:, -1]
        logits_seen.append(logits)
        nxt = logits.argmax(-1)
        tokens.append(nxt)
        mask = np.concatenate([mask, np.ones((B, 1), np.int64)], 1)
        pos = pos + 1
        feed = {"inputs_embeds": emb.run(None, {"input_ids": nxt[:, None].astype(np.int64)})[0],
                "attention_mask": mask, "position_ids": pos, "adapter_ids": feed["adapter_ids"],
                **dict(zip(past_names(L), outs[2:]))}
    return np.stack(tokens, 1), logits_seen


def test_decoder_matches_transformers_over_prefill_and_16_greedy_steps(build, tiny_model, tiny_inputs):
    rows = [tiny_model.prepare(m, tiny_inputs[m]) for m in ("language", "rgb", "code")]
    with torch.no_grad():
        batch = tiny_model.build_batch(rows)
    assert len(set(batch.adapter_ids.tolist())) == 3 and (batch.attention_mask == 0).any()  # padded
    got, logits = _ort_greedy(build, batch, steps=16)
    # reference: transformers' LlamaModel + DynamicCache with the adapter hooks, no EOS stop
    want = tiny_model.generate(rows, max_new_tokens=17, stop_at_eos=False)
    assert got.tolist() == want
    # and the first step's logits numerically
    with torch.no_grad():
        ref = tiny_model.llm.lm_head(tiny_model.decode(batch).last_hidden_state[:, -1]).numpy()
    np.testing.assert_allclose(logits[0], ref, atol=FP32_ATOL)


def test_no_fuse_graphs_agree_with_fused(build, ckpt, tmp_path):
    out = tmp_path / "nofuse"
    m = export_build(ckpt, out, modalities=["hsi"], fuse=False, progress=False)
    assert not m["fused_attention"]
    for name in ("hsi_encoder", "hsi_bridge", "decoder"):
        ops = m["components"][name]["artifacts"]["onnx"]["attention_ops"]
        assert "Attention" not in ops and ops.get("Softmax", 0) > 0, name
    spec = {s.name: s for s in component_specs(load_checkpoint(ckpt, ["hsi"]))}
    for name in ("hsi_bridge", "decoder"):
        feed = {k: x.numpy() for k, x in spec[name].example(3, 2).items()}
        a = session(build / f"{name}.onnx").run(None, _remap_adapters(feed, name))
        b = session(out / f"{name}.onnx").run(None, feed)
        for t, x, y in zip(spec[name].outputs, a, b):
            keep = _real_positions(t.dims, feed.get("attention_mask"), x.shape)  # padding is meaningless
            np.testing.assert_allclose(x[keep], y[keep], atol=FP32_ATOL, err_msg=f"{name}.{t.name}")


def _remap_adapters(feed, name):
    """The hsi-only build has one adapter set (index 0); hsi is index 5 in the full build."""
    if name != "decoder":
        return feed
    return {**feed, "adapter_ids": np.full_like(feed["adapter_ids"], 5)}


def test_manifest_schema(build):
    m = read_manifest(build)
    assert m["format"] == "allspark-build" and m["schema_version"] == 2
    assert set(m["provenance"]) >= {"allspark", "torch", "onnx", "onnxruntime", "checkpoint_manifest_sha256"}
    dec = m["components"]["decoder"]
    assert [t["name"] for t in dec["inputs"][:4]] == ["inputs_embeds", "attention_mask", "position_ids", "adapter_ids"]
    assert dec["inputs"][4] == {"name": "past_key.0", "dtype": "float32", "dims": ["batch", 4, "past_len", 16]}
    assert dec["outputs"][0]["dims"] == ["batch", "seq_len", 512]
    assert m["routes"]["rgb"] == {"encoder": "rgb_encoder", "bridge": "rgb_bridge", "head": "rgb_head"}
    assert m["routes"]["language"] == {"encoder": None, "bridge": None, "head": None}
    assert dec["cache"]["past"][:2] == ["past_key.0", "past_value.0"] and len(dec["cache"]["present"]) == 8
    assert set(m["dims"]) == {"batch", "seq_len", "past_len", "total_len", "num_tokens"}
    for bad, msg in [({**m, "schema_version": 1}, "got 1 .*re-export it: allspark export"),
                     ({**m, "components": {**m["components"], "x": {}}}, "missing field 'kind'"),
                     ({k: v for k, v in m.items() if k != "opset"}, "missing field 'opset'"),
                     ({**m, "config": {}}, "incomplete model config"),
                     ({**m, "routes": {**m["routes"], "rgb": {"encoder": "nowhere"}}}, "not a component")]:
        with pytest.raises(ManifestError, match=msg):
            validate_manifest(bad)


def test_verify_catches_tampering_and_drift(build, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(build, b)
    assert verify_build(b) == []
    # 1. a byte flipped in a graph: the hash catches it
    f = b / "sar_head.onnx"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    problems = verify_build(b)
    assert len(problems) == 1 and problems[0].startswith("sar_head:") and "sha256" in problems[0]
    # 2. a re-signed but altered graph (weights changed, hash updated): parity catches it
    shutil.copy(build / "sar_head.onnx", f)
    model = onnx.load(str(f))
    w = model.graph.initializer[0]
    arr = onnx.numpy_helper.to_array(w) + 0.5
    w.CopyFrom(onnx.numpy_helper.from_array(arr, w.name))
    onnx.save(model, str(f))
    from allspark.fsutil import sha256_file
    mpath = b / "manifest.json"
    man = json.loads(mpath.read_text())
    man["components"]["sar_head"]["artifacts"]["onnx"]["sha256"] = {"sar_head.onnx": sha256_file(f)}
    mpath.write_text(json.dumps(man))
    problems = verify_build(b)
    assert len(problems) == 1 and "sar_head: parity drifted" in problems[0]


def test_killed_export_leaves_no_build(ckpt, tmp_path):
    out = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, "-m", "allspark", "export", str(ckpt), "--out", str(out), "--quiet"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".killed.tmp-*/*.onnx")):
        time.sleep(0.2)  # wait until it has written at least one graph
    assert list(tmp_path.glob(".killed.tmp-*/*.onnx")), "export never got going"
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert not out.exists()
    # the next export to the same place clears the dead temp dir
    from allspark.fsutil import remove_stale_temps
    remove_stale_temps(out)
    assert not list(tmp_path.glob(".killed.tmp-*"))


def test_failed_export_keeps_the_old_build(ckpt, build, tmp_path, monkeypatch):
    import allspark.export.build as B
    from allspark.export.validate import ParityError

    old = tmp_path / "old"
    shutil.copytree(build, old)
    before = (old / "manifest.json").read_text()

    def bad_compare(spec, path, cases, precision, sess=None):
        return {"validation_shapes": [], "outputs": {}, "tolerance_abs": 0.0, "passed": False, "failed": ["output"]}

    monkeypatch.setattr(B, "compare", bad_compare)
    with pytest.raises(ParityError, match="sar_head"):
        export_build(ckpt, old, modalities=["sar"], progress=False)
    assert (old / "manifest.json").read_text() == before
    assert not list(tmp_path.glob(".old.tmp-*"))


def test_cli_export_and_verify(ckpt, build, tmp_path, capsys):
    from allspark.cli import main

    assert main(["verify", str(build)]) == 0
    assert "intact" in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "nothing")]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_decoder_adapters_are_grouped_and_match(build, ckpt, tmp_path):
    """The default decoder computes adapters with com.microsoft.MoE (grouped by set); the per-row
    gather form (`--adapter-impl gather`) and an fp16 build match the same PyTorch reference."""
    m = read_manifest(build)
    dec = m["components"]["decoder"]
    n_adapters = len(range(0, m["config"]["llm"]["num_layers"], m["config"]["llm"]["adapter_freq"]))
    assert dec["adapters"]["impl"] == "moe" and dec["artifacts"]["onnx"]["adapter_ops"] == {"MoE": n_adapters}
    assert dec["adapters"]["torch_grouped_vs_gather_max_abs"] <= 1e-5
    for impl, precision, tol in (("gather", "fp32", 1e-5), ("moe", "fp16", 2e-2)):
        out = export_build(ckpt, tmp_path / f"{impl}-{precision}", modalities=["language", "code"], precision=precision,
                           adapter_impl=impl, progress=False)["components"]["decoder"]
        assert out["adapters"]["impl"] == impl and out["parity"]["passed"], (impl, precision)
        assert max(e["max_abs"] for k, e in out["parity"]["outputs"].items() if not k.startswith("present")) <= tol
        assert ("Einsum" if impl == "gather" else "MoE") in out["artifacts"]["onnx"]["adapter_ops"]
