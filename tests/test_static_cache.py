"""The decoder's static-cache graph (allspark.export.static_cache): the same answers as the growing
decoder, exported and checked like it, and stepped by the onnxruntime backend on buffers it writes in
place (torch CPU tensors here; the same code binds CUDA memory on a GPU)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from allspark.contract import tensors as C
from allspark.errors import BackendError
from allspark.export.validate import _real_positions
from allspark.export.verify import verify_report
from allspark.model.decoder import DecoderModule, StaticCacheDecoderModule, split_mask
from allspark.model.registry import random_inputs
from allspark.runtime import GenerationConfig, Request, Runtime
from allspark.runtime.decoding import host_state


def _prefill_then_step(model, S: int, stale: float):
    """Prefill 5 left-padded tokens then 2 more, through the growing decoder and through a static
    buffer of S slots that starts filled with `stale` garbage."""
    c, L = model.config.llm, model.config.llm.num_layers
    g = torch.Generator().manual_seed(0)
    B, P, T = 3, 5, 2
    mask = torch.ones(B, P + T, dtype=torch.int64)
    mask[1, :2], mask[2, :4] = 0, 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    ids = torch.tensor([0, 1, 2]) % len(model.modalities)
    emb = torch.randn(B, P + T, c.hidden_size, generator=g)
    with torch.no_grad():
        empty = [torch.zeros(B, c.num_kv_heads, 0, c.head_dim)] * (2 * L)
        grow1 = DecoderModule(model)(emb[:, :P], mask[:, :P], pos[:, :P], ids, empty)
        grow2 = DecoderModule(model)(emb[:, P:], mask, pos[:, P:], ids, list(grow1[2:]))
        bufs = [stale * torch.randn(B, c.num_kv_heads, S, c.head_dim, generator=g) for _ in range(2 * L)]
        smask = torch.zeros(B, S, dtype=torch.int64)
        smask[:, :P] = mask[:, :P]
        st = StaticCacheDecoderModule(model)
        st1 = st(emb[:, :P], smask, pos[:, :P], ids, torch.arange(P), bufs)
        for b, n in zip(bufs, st1[2:]):
            b[:, :, :P] = n
        smask[:, P:P + T] = 1
        st2 = st(emb[:, P:], smask, pos[:, P:], ids, torch.arange(P, P + T), bufs)
    return mask, (grow1, grow2), (st1, st2)


@pytest.mark.parametrize("stale", [0.0, 100.0])
def test_static_graph_module_matches_the_growing_decoder(tiny_model, stale):
    """Prefill and a step give the growing decoder's logits and keys/values; whatever lies in the
    buffer's unwritten slots does not count."""
    mask, (g1, g2), (s1, s2) = _prefill_then_step(tiny_model, 16, stale)
    valid = mask[:, :5].bool()
    torch.testing.assert_close(s1[0][valid], g1[0][valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s2[0], g2[0], atol=1e-5, rtol=1e-5)
    for new, grown in zip(s2[2:], g2[2:]):
        assert new.shape[2] == 2  # only this call's keys/values come back
        torch.testing.assert_close(new, grown[:, :, 5:], atol=1e-5, rtol=1e-5)


def test_split_mask_sees_earlier_slots_and_its_own_tokens_causally():
    mask = torch.tensor([[0, 1, 1, 1, 1, 0]])  # slot 0 padding, slots 1-2 written, 3-4 this call's
    m = split_mask(mask, torch.tensor([3, 4]))[0, 0]  # (T=2, S + T = 8)
    assert m[:, :6].tolist() == [[False, True, True, False, False, False]] * 2  # earlier calls' valid slots
    assert m[:, 6:].tolist() == [[True, False], [True, True]]  # own tokens, causal


def test_parity_counts_the_tokens_at_cache_position():
    """The static graph's new tokens lie at `cache_position`, not at the mask's end: parity must
    compare them (a check over no elements would pass anything)."""
    mask = np.array([[1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 0, 0]])
    keep = _real_positions(("batch", 4, "seq_len", 8), mask, (2, 4, 2, 8), np.array([2, 3]))
    assert keep[0].all() and keep[1].all()
    assert not _real_positions(("batch", "seq_len"), mask, (2, 2)).any()  # the growing rule: the mask's end


def test_export_records_the_static_graph_as_a_decoder_artifact(build):
    rt = Runtime.load(build, verify=False)
    dec = rt.manifest["components"][C.DECODER_COMPONENT]
    art = dec["artifacts"][C.STATIC_CACHE.name]
    assert C.STATIC_DECODER not in rt.manifest["components"]  # not a component: Triton never sees it
    assert art["file"] == "decoder_static.onnx" and (build / art["file"]).is_file()
    assert art["cache"]["past"] == dec["cache"]["past"] and art["cache"]["new"][0] == "new_key.0"
    assert art["parity"]["passed"] and art["parity"]["tolerance_abs"] == 1e-4
    errs = [o["max_abs"] for o in art["parity"]["outputs"].values()]
    assert 0 < max(errs) <= 1e-4  # measured over real elements, not vacuously
    assert {t["name"] for t in art["inputs"]} >= {C.CACHE_POSITION, "past_key.0"}
    assert art["attention_ops"] == {"Softmax": rt.config.llm.num_layers}  # split attention, no cache copy


def test_verify_checks_the_static_graph_and_reports_its_damage(build, tmp_path):
    (report,) = [r for r in verify_report(build) if r.name == C.DECODER_COMPONENT]
    assert report.ok and any(line.startswith("static cache parity:") for line in report.checked)
    bad = tmp_path / "b"
    shutil.copytree(build, bad)
    with open(bad / "decoder_static.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\0" * 64)
    (report,) = [r for r in verify_report(bad) if r.name == C.DECODER_COMPONENT]
    assert any("decoder_static.onnx" in p for p in report.problems)
    # re-signed but altered (a weight changed, its hash updated): the static graph's own parity catches it
    import json

    import onnx

    from allspark.fsutil import sha256_file

    shutil.copy(build / "decoder_static.onnx", bad / "decoder_static.onnx")
    model = onnx.load(str(bad / "decoder_static.onnx"))
    w = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    w.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(w) + 0.5, w.name))
    onnx.save(model, str(bad / "decoder_static.onnx"))
    m = json.loads((bad / "manifest.json").read_text())
    m["components"]["decoder"]["artifacts"][C.STATIC_CACHE.name]["sha256"] = {
        "decoder_static.onnx": sha256_file(bad / "decoder_static.onnx")}
    (bad / "manifest.json").write_text(json.dumps(m))
    (report,) = [r for r in verify_report(bad) if r.name == C.DECODER_COMPONENT]
    assert [p for p in report.problems if p.startswith("static cache parity drifted")], report.problems
    assert any(line.startswith("parity:") for line in report.checked)  # the growing graph is still fine


def test_static_steps_match_host_steps_and_write_the_buffers_in_place(build):
    """Logits step by step against the host path (growing graph), and the workspace's buffers keep
    their addresses while their slots fill."""
    host = Runtime.load(build, verify=False)
    dev = Runtime.load(build, verify=False, device_resident=True)
    assert dev.backend.static_cache and C.DECODER_COMPONENT not in dev.backend.sessions  # opened on demand only
    rows = [host.prepare(Request("language", {"text": "describe the scene"})),
            host.prepare(Request("code", {"text": "def f(x):"}))]
    feed, out = host.prefill(rows)
    dfeed, dout = dev.prefill(rows, on_device=True)
    np.testing.assert_allclose(dout.logits[:, -1], out.logits[:, -1], atol=1e-4)
    sel, mask = np.arange(2), feed[C.ATTENTION_MASK]
    pos, ids = feed[C.POSITION_IDS][:, -1:], feed[C.ADAPTER_IDS]
    hs = host_state(host.backend, host.cache.past, list(out.present), mask, pos, ids)
    ds = dev.backend.start_generation(dout.present, sel, mask, pos, ids, 64)
    kv = ds.work.cache.kv[0]
    addr = kv.data_ptr()
    try:
        for step, tok in enumerate(([5, 7], [9, 11], [3, 3])):
            np.testing.assert_allclose(ds.step(np.array(tok), None), hs.step(np.array(tok), None), atol=1e-4)
            P = mask.shape[1] + step + 1
            assert ds.work.cache.length == P
            np.testing.assert_allclose(kv[:, :, :P].numpy(), hs.past[0], atol=1e-5)  # same cache, in place
        assert kv.data_ptr() == addr  # (beam reordering: the runtime tests' beam searches)
    finally:
        ds.close()


def test_static_backend_opens_the_growing_decoder_for_the_host_path(build):
    """Past the model's positions a generation runs on host arrays: the growing decoder opens then."""
    host = Runtime.load(build, verify=False)
    dev = Runtime.load(build, verify=False, device_resident=True, max_positions=24)
    reqs = [Request("language", {"text": "describe the scene"}),
            Request("table", random_inputs(host.config.modality("table"), np.random.default_rng(1)))]
    gen = GenerationConfig(max_new_tokens=20, ignore_eos=True)
    got, want = dev.predict_batch(reqs, gen), host.predict_batch(reqs, gen)
    assert got[0].tokens == want[0].tokens and len(got[0].tokens) == 20
    assert got[1].label == want[1].label
    assert C.DECODER_COMPONENT in dev.backend.sessions


def test_static_cache_options_fail_clearly(build, ckpt, tmp_path):
    with pytest.raises(BackendError, match="needs device_resident"):
        Runtime.load(build, verify=False, static_cache=True, device_resident=False)
    plain = tmp_path / "plain"
    shutil.copytree(build, plain)
    import json

    m = json.loads((plain / "manifest.json").read_text())
    del m["components"]["decoder"]["artifacts"][C.STATIC_CACHE.name]
    (plain / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BackendError, match="allspark export --static-cache"):
        Runtime.load(plain, verify=False, static_cache=True, device_resident=True)
    rt = Runtime.load(plain, verify=False, device_resident=True)  # default: the growing graph then
    assert not rt.backend.static_cache


def test_static_artifact_is_validated_and_never_served_by_triton(build):
    import json

    from allspark.contract.manifest import ManifestError, validate_manifest
    from allspark.errors import ConfigError
    from allspark.serving.options import RepositoryOptions

    m = json.loads((build / "manifest.json").read_text())
    del m["components"]["decoder"]["artifacts"][C.STATIC_CACHE.name]["cache"]
    with pytest.raises(ManifestError, match="onnx-static-cache: missing field 'cache'"):
        validate_manifest(m)
    with pytest.raises(ConfigError, match="not a Triton model"):
        RepositoryOptions(target="gpu", layout="components", artifact=C.STATIC_CACHE.name)


def test_tensorrt_providers_run_the_static_graph_on_cuda():
    from allspark.runtime.onnxruntime_backend import _without_trt

    assert _without_trt(["tensorrt", "cuda"]) == ["cuda"] and _without_trt(["tensorrt"]) == ["cuda"]
    assert _without_trt(["cpu"]) == ["cpu"] and _without_trt(None) is None


def test_a_deferred_session_that_fails_to_open_says_why_every_time(build):
    dev = Runtime.load(build, verify=False, device_resident=True)

    def fail():
        raise BackendError("decoder.onnx: onnxruntime cannot load this graph (out of memory)")

    dev.backend.defer(C.DECODER_COMPONENT, fail)
    for _ in range(2):
        with pytest.raises(BackendError, match="out of memory"):
            dev.backend.session(C.DECODER_COMPONENT)


@pytest.mark.slow
def test_fp16_static_cache_build_generates_as_the_host_path(ckpt, tmp_path):
    """fp16: the static graph's fp16 buffers and inputs, the embedding cast, against the host path."""
    from allspark.export.build import export_build

    m = export_build(ckpt, tmp_path / "b16", modalities=["language", "rgb"], precision="fp16", progress=False,
                     static_cache=True)
    art = m["components"]["decoder"]["artifacts"][C.STATIC_CACHE.name]
    assert art["parity"]["passed"] and art["precision"] == "fp16"
    host = Runtime.load(tmp_path / "b16", verify=False)
    dev = Runtime.load(tmp_path / "b16", verify=False, device_resident=True)
    assert dev.backend.static_cache and dev.backend.kv_dtype == torch.float16
    rng = np.random.default_rng(3)
    reqs = [Request("language", {"text": "describe the scene"}),
            Request("rgb", random_inputs(host.config.modality("rgb"), rng))]
    gen = GenerationConfig(max_new_tokens=6, ignore_eos=True)
    for x, y in zip(dev.predict_batch(reqs, gen), host.predict_batch(reqs, gen)):
        assert x.tokens == y.tokens and x.label == y.label
    # the stages' outputs reach the decoder in the graph's fp16 (no float32 round trip); the prefill's
    # answer is the last position, float32, equal to the full decode's
    assert host.backend.embed(np.array([[5, 7]])).dtype == np.float16
    feed, out = host.prefill([host.prepare(r) for r in reqs])
    assert feed[C.INPUTS_EMBEDS].dtype == np.float16
    full = host.backend.decode(feed)
    assert out.logits.shape == (2, 1, full.logits.shape[2]) and out.logits.dtype == out.hidden.dtype == np.float32
    np.testing.assert_array_equal(out.logits[:, 0], full.logits[:, -1])
    np.testing.assert_array_equal(out.hidden[:, 0], full.hidden[:, -1])
    assert out.logits.base is None or out.logits.base.size == out.logits.size  # not a view of the full answer
    # the host plane keeps the graph's fp16 cache as it came (no float32 round trip per step)
    row = host.prepare(reqs[0])
    feed, out = host.prefill([row])
    st = host.decode_state(out.present, np.arange(1), feed[C.ATTENTION_MASK], feed[C.POSITION_IDS][:, -1:],
                           feed[C.ADAPTER_IDS], 2)
    st.step(np.array([5]), None)
    assert {p.dtype for p in st.past} == {np.dtype(np.float16)}
    st.close()
