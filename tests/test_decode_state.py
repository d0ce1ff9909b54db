"""The one decode state (`allspark.runtime.decoding`): rows are slots that streams join and leave
between steps, on the host plane (host arrays) and the device plane (a static cache written in
place; the same code on torch CPU tensors here). A joined row's logits equal the same row decoded
alone, whatever the slot and columns it was given; the scheduler's streams equal `Runtime.generate`
alone on every plane."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from allspark.contract import tensors as C
from allspark.runtime import GenerationConfig, Request, Runtime
from allspark.runtime.decoding import GrowingState, SlotState
from allspark.runtime.scheduler import GenerationScheduler

PLANES = {
    "host": dict(),
    "ort-static": dict(device_resident=True),
    "ort-growing-device": dict(device_resident=True, static_cache=False),
    "torch-static": dict(backend="torch", device_resident=True),
}
TEXTS = [("language", "describe the scene"), ("code", "def f(x): return x"), ("language", "hi"),
         ("code", "for i in range(3):\n    print(i)"), ("language", "crops in spring and autumn near the river")]


@pytest.fixture(scope="module", params=list(PLANES))
def plane(request, build):
    return request.param, Runtime.load(build, verify=False, **PLANES[request.param])


def _prefill(rt: Runtime, texts):
    rows = [rt.prepare(Request(m, {"text": t})) for m, t in texts]
    feed, out = rt.prefill(rows, on_device=rt.device_resident)
    k = np.arange(len(rows))
    return out, k, feed[C.ATTENTION_MASK], feed[C.POSITION_IDS][:, -1:], feed[C.ADAPTER_IDS]


def _alone(rt: Runtime, text, tokens):
    """Logits of one row decoded alone on the host plane, feeding `tokens` one by one."""
    out, k, mask, pos, ids = _prefill(rt, [text])
    st = rt.decode_state(out.present, k, mask, pos, ids, len(tokens))
    try:
        return [st.step(np.array([t]), None)[0] for t in tokens]
    finally:
        st.close()


def test_rows_joining_freed_slots_decode_as_if_alone(plane, build):
    name, rt = plane
    host = Runtime.load(build, verify=False)
    out, k, mask, pos, ids = _prefill(rt, TEXTS[:2])
    st = rt.decode_state(out.present, k, mask, pos, ids, 8, owners=["a", "b"], budgets=[8, 8])
    assert isinstance(st, GrowingState if name in ("host", "ort-growing-device") else SlotState)
    toks = [5, 9, 11, 3, 7, 2, 4, 6]
    try:
        for t in toks[:3]:
            st.step(np.array([t, t]), None)
        st.drop([0])  # "a" leaves; "c" (a longer prompt) takes its slot between two steps
        assert st.occupants == [None, "b"]
        if isinstance(st, SlotState):
            ptr = st.work.cache.kv[0].data_ptr()
        out2, k2, mask2, pos2, ids2 = _prefill(rt, [TEXTS[4]])
        st.join(["c"], out2.present, k2, mask2, pos2, ids2, [8])
        assert st.occupants == ["c", "b"]  # in the free slot: no row added
        if isinstance(st, SlotState):
            assert st.work.cache.kv[0].data_ptr() == ptr  # same workspace, written in place
        got = [st.step(np.array([t, t]), None) for t in toks[3:]]
        # "c" alone, and "b" alone (its first three steps fed the same tokens)
        want_c = _alone(host, TEXTS[4], toks[3:])
        want_b = _alone(host, TEXTS[1], toks)[3:]
        for g, c, b in zip(got, want_c, want_b):
            np.testing.assert_allclose(g[0], c, atol=2e-4)
            np.testing.assert_allclose(g[1], b, atol=2e-4)
        # more newcomers than free slots: the state grows; everyone keeps decoding as if alone
        out3, k3, mask3, pos3, ids3 = _prefill(rt, TEXTS[2:4])
        st.join(["d", "e"], out3.present, k3, mask3, pos3, ids3, [4, 4])
        assert sorted(o for o in st.occupants if o) == ["b", "c", "d", "e"]
        g = st.step(np.array([8] * len(st.occupants)), None)
        want_d = _alone(host, TEXTS[2], [8])[0]
        np.testing.assert_allclose(g[st.occupants.index("d")], want_d, atol=2e-4)
        st.drop([st.occupants.index(o) for o in ("b", "c", "d")])  # three of four leave: the rows are packed
        assert [o for o in st.occupants if o] == ["e"]
        g = st.step(np.array([1] * len(st.occupants)), None)
        want_e = _alone(host, TEXTS[3], [8, 1])[1]
        np.testing.assert_allclose(g[st.occupants.index("e")], want_e, atol=2e-4)
    finally:
        st.close()


def test_a_static_cache_whose_columns_run_out_moves_to_a_longer_one(build):
    rt = Runtime.load(build, verify=False, device_resident=True)
    host = Runtime.load(build, verify=False)
    out, k, mask, pos, ids = _prefill(rt, TEXTS[:1])
    st = rt.decode_state(out.present, k, mask, pos, ids, 4, owners=["a"], budgets=[0])  # sized for 4 tokens
    first = st.work.cache.max_len
    n = first - mask.shape[1] + 3  # past the end of the first workspace
    toks = [int(t) for t in np.random.default_rng(0).integers(3, 60, n)]
    try:
        got = [st.step(np.array([t]), None)[0] for t in toks]
        assert st.work.cache.max_len > first
    finally:
        st.close()
    want = _alone(host, TEXTS[0], toks)
    np.testing.assert_allclose(np.stack(got), np.stack(want), atol=2e-4)


def test_scheduler_streams_equal_their_solo_tokens_on_every_plane(plane):
    name, rt = plane
    cfg = GenerationConfig(max_new_tokens=10, ignore_eos=True)
    sample = GenerationConfig(strategy="sample", max_new_tokens=7, seed=5, top_k=5, ignore_eos=True)
    sched = GenerationScheduler(rt)
    started = threading.Event()
    try:
        first = [sched.submit(Request(m, {"text": t}), cfg, on_token=lambda tok: started.set()) for m, t in TEXTS[:3]]
        assert started.wait(60)
        later = [sched.submit(Request(m, {"text": t}), c) for (m, t), c in zip(TEXTS[3:], (sample, cfg))]
        got = [s.result(120).tokens for s in first + later]
    finally:
        sched.close()
    want = [rt.generate(m, {"text": t}, config=c).tokens for (m, t), c in zip(TEXTS, [cfg] * 3 + [sample, cfg])]
    assert got == want, name
    assert sched.stats["steps"] < sched.stats["step_rows"]  # streams shared steps


def test_host_arrays_keep_an_fp16_cache_fp16():
    """A device cache moved to the host plane (a generation past `max_positions`) keeps fp16, which
    the host plane keeps between steps; bfloat16, which numpy lacks, becomes float32."""
    import torch

    from allspark.runtime.decoding import host_arrays

    cache = [torch.randn(3, 2, 5, 4).to(torch.float16), torch.randn(3, 2, 5, 4).to(torch.bfloat16)]
    a, b = host_arrays(cache, np.array([2, 0]))
    assert a.dtype == np.float16 and b.dtype == np.float32 and a.shape == b.shape == (2, 2, 5, 4)
    np.testing.assert_array_equal(a, cache[0][[2, 0]].numpy())
    np.testing.assert_array_equal(b, cache[1][[2, 0]].float().numpy())
