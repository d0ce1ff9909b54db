"""The device-resident decode loop (issue 16, item 1): static cache, IO binding on device tensors,
CUDA graphs. The CPU tests run the same code on torch CPU tensors against the host path; the `gpu`
tests run it on CUDA (skipped without one)."""

from __future__ import annotations

import contextlib
import types

import numpy as np
import pytest
import torch

from allspark.errors import BackendError, ConfigError
from allspark.export.specs import decoder_spec
from allspark.model.decoder import DecoderModule, StaticDecoderModule
from allspark.model.registry import random_inputs
from allspark.runtime import GenerationConfig, Request, Runtime
from allspark.runtime.decoding import SLOT_ROUNDING, host_state, rounded_max_len

HAS_CUDA = torch.cuda.is_available()


def _has_ort_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


GENERATIONS = [GenerationConfig(max_new_tokens=10, ignore_eos=True),
               GenerationConfig(strategy="beam", num_beams=3, max_new_tokens=6, ignore_eos=True),
               GenerationConfig(strategy="sample", max_new_tokens=6, seed=3, ignore_eos=True)]


def _requests(rt: Runtime) -> list[Request]:
    rng = np.random.default_rng(0)
    reqs = [Request("language", {"text": "describe the scene"}), Request("code", {"text": "def f(x): return"})]
    return reqs + [Request(m, random_inputs(rt.config.modality(m), rng)) for m in ("rgb", "table")]


def _same_answers(a: Runtime, b: Runtime) -> None:
    reqs = _requests(a)
    for gen in GENERATIONS:
        for x, y in zip(a.predict_batch(reqs, gen), b.predict_batch(reqs, gen)):
            assert x.tokens == y.tokens, (gen.strategy, x.modality)
            if x.values is not None:
                np.testing.assert_allclose(x.values, y.values, rtol=1e-4, atol=1e-5)


def test_static_decoder_matches_growing_decoder(tiny_model):
    """Same logits and cache on the valid positions, with left padding and a past."""
    spec = decoder_spec(tiny_model)
    ex = spec.example(3, 2)
    with torch.no_grad():
        ref = DecoderModule(tiny_model)(*spec.forward_args(ex))
        first = ex[spec.cache.past[0]]
        B, kvh, P, D = first.shape
        T = ex["inputs_embeds"].shape[1]
        past = [torch.zeros(B, kvh, P + T + 4, D) for _ in spec.cache.past]
        for buf, n in zip(past, spec.cache.past):
            buf[:, :, :P] = ex[n]
        mask = torch.zeros(B, P + T + 4, dtype=torch.int64)
        mask[:, :P + T] = ex["attention_mask"]
        out = StaticDecoderModule(tiny_model, inplace=True)(ex["inputs_embeds"], mask, ex["position_ids"],
                                                           ex["adapter_ids"], torch.arange(P, P + T), past)
    valid = ex["attention_mask"].bool()
    torch.testing.assert_close(out[0][valid[:, P:]], ref[0][valid[:, P:]], atol=1e-5, rtol=1e-5)
    for got, want in zip(out[2:], ref[2:]):
        assert got is not None and got.shape[2] == P + T + 4
        sel = valid[:, None, :, None].expand_as(want)
        torch.testing.assert_close(got[:, :, :P + T][sel], want[sel], atol=1e-5, rtol=1e-5)
    assert out[2] is past[0]  # written in place


def test_torch_device_resident_matches_host(build):
    host = Runtime.load(build, backend="torch", verify=False)
    dev = Runtime.load(build, backend="torch", verify=False, device_resident=True)
    assert not host.device_resident and dev.device_resident
    _same_answers(host, dev)


@pytest.mark.parametrize("static_cache", [True, False])
def test_onnxruntime_device_resident_matches_host(build, static_cache):
    """IO binding on torch CPU tensors: the code path CUDA takes, run on the CPU provider; on the
    static-cache graph (the default where the build has it) and on the growing one."""
    host = Runtime.load(build, verify=False)
    dev = Runtime.load(build, verify=False, device_resident=True, static_cache=static_cache)
    assert not host.device_resident and dev.device_resident and dev.backend.static_cache == static_cache
    _same_answers(host, dev)


def test_workspaces_are_reused_and_bounded(build):
    rt = Runtime.load(build, backend="torch", verify=False, device_resident=True)
    req = [Request("language", {"text": "a scene"})]
    rt.predict_batch(req, GenerationConfig(max_new_tokens=3))
    pool = rt.backend._pool
    (key, stack), = pool.free.items()
    assert key[0] == 1 and key[1] % SLOT_ROUNDING == 0 and len(stack) == 1
    work = stack[0]
    rt.predict_batch(req, GenerationConfig(max_new_tokens=3))
    assert pool.free[key] == [work]  # the same workspace came back


def test_generation_past_the_models_positions_falls_back_to_host_arrays(build):
    """A static cache cannot outgrow max_position_embeddings: such a generation runs on the host
    path (as on CPU) instead of failing the batch."""
    host = Runtime.load(build, backend="torch", verify=False)
    dev = Runtime.load(build, backend="torch", verify=False, device_resident=True,
                       max_positions=24)  # a prompt of ~10 tokens + 20 new ones passes it
    reqs = [Request("language", {"text": "describe the scene"}), Request("table", random_inputs(
        host.config.modality("table"), np.random.default_rng(1)))]
    gen = GenerationConfig(max_new_tokens=20, ignore_eos=True)
    got, want = dev.predict_batch(reqs, gen), host.predict_batch(reqs, gen)
    assert got[0].tokens == want[0].tokens and len(got[0].tokens) == 20
    assert got[1].label == want[1].label
    assert rounded_max_len(1, 512) == SLOT_ROUNDING and rounded_max_len(513, 512) is None


def test_pool_keeps_a_bounded_number_of_idle_workspaces():
    from types import SimpleNamespace

    from allspark.runtime.decoding import CachePool

    made = []
    pool = CachePool(lambda b, n: made.append((b, n)) or SimpleNamespace(cache=SimpleNamespace(batch=b, max_len=n)),
                     keep=2)
    works = [pool.acquire(b, 64) for b in (1, 2, 3)]
    for w in works:
        pool.release(w)
    assert len(pool.order) == 2 and works[0] not in pool.order  # the least recently returned went
    assert pool.acquire(3, 64) is works[2] and len(made) == 3


def test_cuda_options_fail_clearly_without_a_gpu(build):
    if HAS_CUDA:
        pytest.skip("this machine has a GPU")
    with pytest.raises(BackendError, match="no CUDA GPU"):
        Runtime.load(build, backend="torch", verify=False, device="cuda")
    with pytest.raises(BackendError, match="cuda_graphs needs device='cuda'"):
        Runtime.load(build, backend="torch", verify=False, cuda_graphs=True)
    limit = Runtime.load(build, verify=False).config.llm.max_position_embeddings
    with pytest.raises(ConfigError, match=r"max_positions: expected an integer in 1\.\."):
        Runtime.load(build, verify=False, max_positions=limit + 1)


def test_host_state_grows_the_cache(build):
    rt = Runtime.load(build, verify=False)
    past = [np.zeros((2, rt.kv_shape[0], 3, rt.kv_shape[1]), np.float32) for _ in rt.cache.past]
    s = host_state(rt.backend, rt.cache.past, past, np.ones((2, 3), np.int64), np.full((2, 1), 2), np.zeros(2, np.int64))
    logits = s.step(np.array([5, 6]), None)
    assert logits.shape == (2, rt.config.llm.vocab_size) and s.past[0].shape[2] == 4
    s.step(np.array([5, 6]), np.array([1, 1]))
    assert s.past[0].shape[2] == 5 and s.mask.shape == (2, 5)


def test_bench_decode_runs_each_way(tmp_path):
    from allspark.bench.decode import format_table, run_decode_bench

    WAYS = ("torch-host", "torch-static", "onnxruntime-host", "onnxruntime-device", "onnxruntime-static")
    r = run_decode_bench(["tiny"], [2], context=5, steps=2, warmup=1, device="cpu",
                         ways=WAYS, progress=False)
    row = r["presets"]["tiny"]["2"]
    for way in WAYS:
        assert row[way]["finite"] and row[way]["median_ms"] > 0, row[way]
    assert set(row["ratios"]) == {"ort_device_vs_host", "ort_static_vs_host", "ort_static_vs_device"}
    assert "tiny b=2" in format_table(r)


# ---- on a CUDA GPU -----------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("graphs", [False, True])
def test_gpu_torch_device_resident_matches_host_round_trip(build, graphs):
    """Same device, same numerics: the host-array loop against the static cache (eager, or replayed
    CUDA graphs; the graph reuses its workspace on the second call)."""
    host = Runtime.load(build, backend="torch", verify=False, device="cuda", device_resident=False)
    dev = Runtime.load(build, backend="torch", verify=False, device="cuda", cuda_graphs=graphs)
    assert dev.device_resident and not host.device_resident
    reqs = _requests(host)
    gen = GenerationConfig(max_new_tokens=10, ignore_eos=True)
    want = [p.tokens for p in host.predict_batch(reqs, gen)]
    assert [p.tokens for p in dev.predict_batch(reqs, gen)] == want
    assert [p.tokens for p in dev.predict_batch(reqs, gen)] == want


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_onnxruntime_device_resident_matches_host_round_trip(build):
    if not _has_ort_cuda():
        pytest.skip("this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
    host = Runtime.load(build, verify=False, providers=["cuda"], device_resident=False)
    dev = Runtime.load(build, verify=False, providers=["cuda"])
    assert dev.device_resident and not host.device_resident
    _same_answers(host, dev)


def test_skeleton_round_trip_runs_in_the_decode_bench(build, tmp_path, monkeypatch):
    """A weightless skeleton of the build's graphs (what a GPU machine receives) gets seeded weights
    and runs both onnxruntime ways of `bench decode`; the torch model is then shapes alone (at paper
    size its fp32 weights would be 27 GB that nothing reads)."""
    import onnx

    from allspark.model import factory

    real, metas = factory.build_model, []

    def build_model(*a, **k):
        m = real(*a, **k)
        metas.append(all(p.is_meta for p in m.parameters()))
        return m

    monkeypatch.setattr(factory, "build_model", build_model)

    from allspark.bench.decode import run_decode_bench
    from allspark.bench.skeleton import fill, is_skeleton, strip

    skel = tmp_path / "skel"
    skel.mkdir()
    for name in ("embed_tokens", "decoder"):
        facts = strip(build / f"{name}.onnx", skel / f"{name}.onnx")
        assert facts["dropped_elements"] > 0 and facts["bytes"] < (build / f"{name}.onnx").stat().st_size
        assert is_skeleton(skel / f"{name}.onnx") and not is_skeleton(build / f"{name}.onnx")
    filled = fill(skel / "decoder.onnx", tmp_path / "decoder.onnx")
    assert not is_skeleton(filled)
    onnx.checker.check_model(str(filled), full_check=True)
    r = run_decode_bench(["tiny"], [2], context=4, steps=2, warmup=0, device="cpu",
                         ways=("onnxruntime-host", "onnxruntime-device"), progress=False, onnx_dirs={"tiny": skel})
    entry = r["presets"]["tiny"]
    assert entry["graphs"].startswith("given")
    assert entry["2"]["onnxruntime-host"]["finite"] and entry["2"]["onnxruntime-device"]["finite"]
    assert entry["2"]["onnxruntime-host"]["p90_ms"] >= entry["2"]["onnxruntime-host"]["median_ms"]
    assert metas == [True] and entry["decoder_parameters"] > 0


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_device_resident_prefill_hands_stage_outputs_on_without_host_copies(build, backend, monkeypatch):
    """Encoder, bridge and prompt-embedding outputs go to the decoder as device tensors: the host
    versions of those calls are never made, and the answers are the host path's."""
    host = Runtime.load(build, backend=backend, verify=False)
    dev = Runtime.load(build, backend=backend, verify=False, device_resident=True)

    def host_call(*args, **kwargs):
        raise AssertionError("a stage's output came back to the host")

    for name in ("encode", "bridge", "embed"):
        monkeypatch.setattr(dev.backend, name, host_call)
    fed = []
    prefill = dev.backend.prefill_on_device
    monkeypatch.setattr(dev.backend, "prefill_on_device", lambda feed: fed.append(feed["inputs_embeds"]) or prefill(feed))
    rng = np.random.default_rng(5)
    reqs = [Request(m, random_inputs(dev.config.modality(m), rng)) for m in ("rgb", "table", "sar")]
    reqs.append(Request("language", {"text": "describe the scene"}))
    gen = GenerationConfig(max_new_tokens=4, ignore_eos=True)
    for x, y in zip(dev.predict_batch(reqs, gen), host.predict_batch(reqs, gen)):
        assert x.tokens == y.tokens and x.label == y.label, x.modality
        if x.values is not None:
            np.testing.assert_allclose(x.values, y.values, rtol=1e-4, atol=1e-5)
    assert fed and all(isinstance(e, torch.Tensor) for e in fed)  # the decoder's input never was a host array


def test_device_stage_non_finite_rows_fail_alone(build, monkeypatch):
    """A row whose encoder output (a device tensor) is not finite gets a NumericsError naming the
    encoder; the other rows of the batch are answered."""
    from allspark.errors import NumericsError

    dev = Runtime.load(build, verify=False, device_resident=True)
    real = dev.backend.encode_on_device

    def poisoned(component, tensors):
        y = real(component, tensors)
        y[0, 0, 0] = float("nan")
        return y

    monkeypatch.setattr(dev.backend, "encode_on_device", poisoned)
    rng = np.random.default_rng(2)
    reqs = [Request("rgb", random_inputs(dev.config.modality("rgb"), rng)) for _ in range(2)]
    out = dev.predict_batch(reqs)
    assert isinstance(out[0], NumericsError) and "encoder" in str(out[0])
    assert out[1].label is not None


# ---- request stages as CUDA graphs (allspark.runtime.stage_graphs) --------------------------------


def test_static_prefill_matches_the_eager_prefill(tiny_model):
    """What the torch backend captures as the prefill graph (the static decoder over empty buffers of
    the prompt's length) gives the eager prefill's last logits and hidden state, and its cache on
    every valid position, with left padding and mixed adapter sets."""
    from allspark.bench.decode import _manifest
    from allspark.contract import tensors as C
    from allspark.runtime.torch_backend import TorchBackend, _left_padded

    be = TorchBackend(_manifest(tiny_model), tiny_model, device="cpu", device_resident=True)
    rng = np.random.default_rng(0)
    B, T, H = 3, 7, tiny_model.config.llm.hidden_size
    mask = np.ones((B, T), np.int64)
    mask[1, :3] = mask[2, :1] = 0  # left padding
    pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    feed = {C.INPUTS_EMBEDS: rng.standard_normal((B, T, H)).astype(np.float32), C.ATTENTION_MASK: mask,
            C.POSITION_IDS: pos, C.ADAPTER_IDS: np.array([0, 3, 7])}
    feed.update({n: np.zeros((B, *be._kv[:1], 0, be._kv[1]), np.float32) for n in be.cache.past})
    want = be.prefill_on_device(feed)
    inputs = [be._t(feed[n]) for n in C.DECODER_INPUTS]
    valid = torch.from_numpy(mask).bool()[:, None, :, None]
    for pad in (0, 5):  # and left-padded to a longer bucket, its cache sliced back to the prompt's length
        with torch.no_grad():
            got = be._static_prefill(*_left_padded(torch, inputs, pad))
        np.testing.assert_allclose(got[0].numpy(), want.logits, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(got[1].numpy(), want.hidden, atol=1e-5, rtol=1e-5)
        for g, w in zip(got[2:], want.present):
            g = g[:, :, pad:]
            assert g.shape == w.shape
            sel = valid.expand_as(w)
            torch.testing.assert_close(g[sel], w[sel], atol=1e-5, rtol=1e-5)


class _FakeCuda:
    """Enough of torch.cuda for StageGraphs' bookkeeping on a CPU: a 'graph' remembers the function
    run while it captured, and a replay runs it again on the graph's static inputs into its outputs."""

    def __init__(self):
        self.capturing = None

    class CUDAGraph:
        def replay(self):
            for o, n in zip(self.outputs, self.fn(*self.static)):
                o.copy_(n)

    Stream = current_stream = staticmethod(lambda: types.SimpleNamespace(wait_stream=lambda s: None))
    synchronize = staticmethod(lambda: None)
    stream = staticmethod(lambda s: contextlib.nullcontext())

    @contextlib.contextmanager
    def graph(self, g, capture_error_mode=None):
        self.capturing = g
        try:
            yield
        finally:
            self.capturing = None


def test_stage_graphs_keep_a_bounded_lru_and_fall_back_when_capture_fails():
    import threading

    from allspark.runtime.stage_graphs import StageGraphs

    cuda = _FakeCuda()
    sg = StageGraphs(types.SimpleNamespace(cuda=cuda, no_grad=torch.no_grad), limit=2, capture_lock=threading.Lock(),
                     warm=1)

    def double(x):
        if x.shape[0] == 5 and cuda.capturing is not None:
            raise RuntimeError("operation not permitted when stream is capturing")
        out = (x * 2,)
        if cuda.capturing is not None:
            g = cuda.capturing
            g.fn, g.static, g.outputs = double, [x], out
        return out

    x = torch.arange(3.0)
    assert torch.equal(sg.run("enc", double, [x])[0], x * 2)
    y = sg.run("enc", double, [x + 1])[0]  # a replay, the new values copied into the graph's inputs
    assert torch.equal(y, (x + 1) * 2) and sg.captures == 1 and len(sg) == 1
    sg.run("enc", double, [torch.ones(4)])
    sg.run("enc", double, [torch.ones(6)])  # a third signature: the least recently used goes
    assert len(sg) == 2 and sg.captures == 3
    assert torch.equal(sg.run("enc", double, [torch.ones(5)])[0], torch.full((5,), 2.0))  # eager instead
    assert list(sg.failures.values()) == ["RuntimeError: operation not permitted when stream is capturing"]
    assert torch.equal(sg.run("enc", double, [torch.ones(5)])[0], torch.full((5,), 2.0))  # no second try
    assert sg.captures == 3 and len(sg) == 2

    lazy = StageGraphs(types.SimpleNamespace(cuda=cuda, no_grad=torch.no_grad), limit=1, capture_lock=threading.Lock())
    lazy.run("enc", double, [x])  # seen once: eager, nothing captured (a one-off shape pays no capture)
    assert lazy.captures == 0 and len(lazy) == 0
    assert torch.equal(lazy.run("enc", double, [x + 2])[0], (x + 2) * 2) and lazy.captures == 1
    lazy.run("enc", double, [torch.ones(4)])
    lazy.run("enc", double, [torch.ones(4)])  # captured; the first one is evicted (limit 1)...
    lazy.run("enc", double, [x])
    assert lazy.captures == 2  # ...and counts its sightings from zero: no capture on every return
    lazy.run("enc", double, [x])
    assert lazy.captures == 3

    small = StageGraphs(types.SimpleNamespace(cuda=cuda, no_grad=torch.no_grad), limit=16,
                        capture_lock=threading.Lock(), warm=1, max_bytes=64)
    small.run("enc", double, [torch.ones(6)])  # 48 bytes in and out
    small.run("enc", double, [torch.ones(4)])  # 32 more: over 64, the older goes
    assert len(small) == 1 and small.captures == 2

    entered = []

    @contextlib.contextmanager
    def warmup():
        entered.append(True)
        yield

    ctx = StageGraphs(types.SimpleNamespace(cuda=cuda, no_grad=torch.no_grad), limit=2, capture_lock=threading.Lock(),
                      warm=1, warmup=warmup)
    ctx.run("enc", double, [x])
    assert entered == [True]  # warm-up and capture ran inside the backend's context


def test_prefill_lengths_share_a_bucket():
    from allspark.runtime.stage_graphs import PREFILL_BUCKET, bucketed

    assert [bucketed(n) for n in (1, PREFILL_BUCKET, PREFILL_BUCKET + 1, 183)] == [
        PREFILL_BUCKET, PREFILL_BUCKET, 2 * PREFILL_BUCKET, 192]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_stage_graphs_give_the_eager_answers_for_every_modality(build):
    """Every modality through the torch backend with its request stages as CUDA graphs, against the
    same backend eager: same labels, values and tokens; eager the first time a signature is seen, captured
    the second, replayed the third."""
    from tests.conftest import ALL_MODALITIES

    eager = Runtime.load(build, backend="torch", verify=False, device="cuda", cuda_graphs=False)
    graphs = Runtime.load(build, backend="torch", verify=False, device="cuda", cuda_graphs=True)
    rng = np.random.default_rng(2)
    reqs = [Request(m, random_inputs(eager.config.modality(m), rng)) for m in ALL_MODALITIES]
    gen = GenerationConfig(max_new_tokens=6, ignore_eos=True)
    want = eager.predict_batch(reqs, gen)
    for _ in range(3):
        for x, y in zip(want, graphs.predict_batch(reqs, gen)):
            assert not isinstance(y, Exception), y
            assert x.label == y.label and x.tokens == y.tokens, x.modality
            if x.values is not None:
                np.testing.assert_allclose(x.values, y.values, rtol=1e-3, atol=1e-4)
    assert graphs.backend.stages is not None and graphs.backend.stages.captures > 0
    assert not graphs.backend.stages.failures, graphs.backend.stages.failures
