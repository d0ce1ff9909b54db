"""Runtime: onnxruntime backend vs torch backend end to end per modality, mixed batches, threads,
generation strategies, bad input."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from allspark.errors import InputError, UnknownModalityError
from allspark.modalities import Modality
from allspark.model.registry import random_inputs
from allspark.runtime import GenerationConfig, Request, Runtime

ALL = [m.value for m in Modality]
REL_TOL = 1e-4  # regression, fp32


@pytest.fixture(scope="module")
def ort_rt(build):
    return Runtime.load(build)


@pytest.fixture(scope="module")
def torch_rt(build):
    return Runtime.load(build, backend="torch")


@pytest.fixture(scope="module")
def requests_(ort_rt):
    rng = np.random.default_rng(99)
    return {m: [random_inputs(ort_rt.config.modality(m), rng, v) for v in range(3)] for m in ALL}


def assert_same(a, b, what=""):
    assert a.modality == b.modality
    assert a.label == b.label, what
    assert a.text == b.text and a.tokens == b.tokens, what
    if a.values is not None:
        np.testing.assert_allclose(a.values, b.values, rtol=REL_TOL, atol=1e-5, err_msg=what)
    if a.scores is not None:
        assert max(abs(a.scores[k] - b.scores[k]) for k in a.scores) < 1e-4, what


@pytest.mark.parametrize("modality", ALL)
def test_onnxruntime_matches_torch_backend(ort_rt, torch_rt, requests_, modality):
    for i, x in enumerate(requests_[modality]):
        assert_same(ort_rt.predict(modality, x), torch_rt.predict(modality, x), f"{modality}[{i}]")


def test_torch_backend_matches_reference_model(torch_rt, tiny_model, tiny_inputs):
    for m in ("rgb", "graph", "point_cloud"):
        p = torch_rt.predict(m, tiny_inputs[m])
        row = tiny_model.prepare(m, tiny_inputs[m])
        ref = tiny_model.postprocess(row, tiny_model([row])[0])
        if ref.label is not None:
            assert p.label == ref.label
        else:
            np.testing.assert_allclose(p.values, ref.values, rtol=1e-5, atol=1e-5)


def test_greedy_text_matches_reference_generate(ort_rt, tiny_model, tiny_inputs):
    x = tiny_inputs["language"]
    p = ort_rt.generate("language", x, config=GenerationConfig(max_new_tokens=12))
    assert p.tokens == tiny_model.generate([tiny_model.prepare("language", x)], max_new_tokens=12)[0]


def test_max_new_tokens_is_bounded_by_the_builds_positions(ort_rt, tiny_inputs, requests_):
    """One bound, checked once where a request enters: past it a generating row fails alone, clearly."""
    n = ort_rt.max_positions
    with pytest.raises(InputError, match=rf"language: input 'max_new_tokens': expected 1\.\.{n} \(the build's maximum positions\), got {n + 1}"):
        ort_rt.generate("language", tiny_inputs["language"], config=GenerationConfig(max_new_tokens=n + 1))
    out = ort_rt.predict_batch([Request("rgb", requests_["rgb"][0]), Request("language", tiny_inputs["language"])],
                               GenerationConfig(max_new_tokens=n + 1))
    assert out[0].label is not None and isinstance(out[1], InputError)


def test_mixed_batch_equals_single_runs(ort_rt, requests_):
    reqs = [Request(m, requests_[m][v]) for v in range(2) for m in ALL]
    batched = ort_rt.predict_batch(reqs)
    for r, b in zip(reqs, batched):
        assert_same(b, ort_rt.predict(r.modality, r.inputs), r.modality)
        assert {"encoder", "decoder", "total"} <= set(b.timings_ms)


def test_bad_request_fails_alone(ort_rt, requests_):
    reqs = [Request("rgb", requests_["rgb"][0]), Request("hsi", {"spectrum": np.zeros(5)}),
            Request("video", {}), Request("sar", requests_["sar"][0])]
    out = ort_rt.predict_batch(reqs)
    assert isinstance(out[1], InputError) and out[1].field == "spectrum"
    assert isinstance(out[2], UnknownModalityError)
    assert_same(out[0], ort_rt.predict("rgb", requests_["rgb"][0]))
    assert_same(out[3], ort_rt.predict("sar", requests_["sar"][0]))


@pytest.mark.parametrize("modality,bad", [
    ("rgb", {"image": np.full((28, 28, 3), np.nan, np.float32)}), ("msi", {"image": np.zeros((16, 16, 3))}),
    ("hsi", {"spectrum": np.zeros(103, np.complex64)}), ("sar", {"image": np.zeros((4, 4, 2))}),
    ("table", {"discrete": [1, 2], "continuous": np.zeros(9)}), ("trajectory", {"observed": np.zeros((8, 3))}),
    ("graph", {"series": np.zeros((12, 12, 1)), "time_of_day": 0, "day_of_week": 9}),
    ("point_cloud", {"points": np.zeros((10, 4))}), ("language", {"text": "   "}), ("code", {"text": None}),
])
def test_bad_input_per_modality_and_runtime_keeps_serving(ort_rt, requests_, modality, bad):
    with pytest.raises(InputError) as e:
        ort_rt.predict(modality, bad)
    assert e.value.modality == modality
    assert ort_rt.predict(modality, requests_[modality][0]).modality == modality


def test_concurrent_predicts_equal_serial(ort_rt, requests_):
    reqs = [(m, requests_[m][v]) for v in range(3) for m in ALL] * 2
    serial = [ort_rt.predict(m, x) for m, x in reqs]
    with ThreadPoolExecutor(8) as pool:
        threaded = list(pool.map(lambda r: ort_rt.predict(*r), reqs))
    for s, t in zip(serial, threaded):
        assert_same(s, t)


def test_beam_search_and_sampling(ort_rt, torch_rt, requests_):
    x = requests_["code"][0]
    lynx = GenerationConfig.lynx(max_new_tokens=12)
    a, b = ort_rt.generate("code", x, config=lynx), torch_rt.generate("code", x, config=lynx)
    assert a.tokens == b.tokens and len(a.tokens) > 0
    for seq in [a.tokens]:  # no-repeat 2-gram: no bigram twice
        bigrams = list(zip(seq, seq[1:]))
        assert len(bigrams) == len(set(bigrams))
    s1 = GenerationConfig(strategy="sample", seed=5, max_new_tokens=12)
    assert ort_rt.generate("code", x, config=s1).tokens == ort_rt.generate("code", x, config=s1).tokens
    assert ort_rt.generate("code", x, config=s1).tokens == torch_rt.generate("code", x, config=s1).tokens
    with pytest.raises(InputError, match="generation modality"):
        ort_rt.generate("rgb", requests_["rgb"][0])


def test_beam_search_scores_at_least_greedy(ort_rt, requests_):
    """Beam search explores a superset of greedy's path: its sequence log-prob is >= greedy's."""
    from allspark.runtime import runtime as R

    x = requests_["language"][1]
    g = ort_rt.generate("language", x, config=GenerationConfig(max_new_tokens=6)).tokens
    b = ort_rt.generate("language", x, config=GenerationConfig(strategy="beam", num_beams=4, max_new_tokens=6)).tokens

    def logprob(tokens):
        prep = ort_rt._prepare(Request("language", x))
        ids = prep.prompt_ids + tokens
        feed = ort_rt._left_pad([ort_rt._embed([ids])[0]], [ort_rt.adapter_index["language"]])
        logits = ort_rt.backend.decode(feed)[0][0]
        lp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
        n = len(prep.prompt_ids)
        return sum(lp[n - 1 + i, t] for i, t in enumerate(tokens))

    assert R is not None and len(g) == len(b) == 6
    assert logprob(b) >= logprob(g) - 1e-4


@pytest.mark.parametrize("which", ["ort", "torch"])
def test_prefill_returns_the_last_position_only(ort_rt, torch_rt, requests_, which):
    """`decode(feed, last=True)` is the full decode's last position (a prefill needs no more: a long
    prompt's full logits are B x T x vocab floats), and the prefill asks for it."""
    rt = {"ort": ort_rt, "torch": torch_rt}[which]
    rows = [rt.prepare(Request(m, requests_[m][0])) for m in ("language", "rgb")]
    feed, out = rt.prefill(rows)
    full = rt.backend.decode(feed)
    T = feed["attention_mask"].shape[1]
    assert full.logits.shape[1] == full.hidden.shape[1] == T > 1
    assert out.logits.shape == (2, 1, full.logits.shape[2]) and out.hidden.shape == (2, 1, full.hidden.shape[2])
    assert out.logits.dtype == out.hidden.dtype == np.float32
    np.testing.assert_array_equal(out.logits[:, 0], full.logits[:, -1])
    np.testing.assert_array_equal(out.hidden[:, 0], full.hidden[:, -1])
    for p, q in zip(out.present, full.present):
        np.testing.assert_array_equal(p, q)


def test_unknown_backend_and_provider(build):
    from allspark.errors import AllSparkError, BackendError

    with pytest.raises(AllSparkError, match="backend"):
        Runtime.load(build, backend="tensorflow")
    with pytest.raises(BackendError, match="not available"):
        Runtime.load(build, providers=["tensorrt"])


def test_memory_returns_after_a_large_batch_when_asked(build):
    """`shrink_arena`: ONNX Runtime's arena gives back what a large batch grew it to (the serving
    models ask for this). Measured on the tiny build, 128 RGB rows: 98 -> 641 MB and it stays there
    without it; 98 -> 455 -> 150 MB with it."""
    import numpy as np

    from allspark.model.registry import random_inputs
    from allspark.runtime import Request, Runtime

    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    rt = Runtime.load(build, threads=1, shrink_arena=True)
    x = random_inputs(rt.config.modality("rgb"), np.random.default_rng(0))
    for _ in range(3):
        rt.predict("rgb", x)
    base = rss_mb()
    rt.predict_batch([Request("rgb", x)] * 128)
    for _ in range(3):
        rt.predict("rgb", x)
    assert rss_mb() - base < 150, f"RSS {rss_mb():.0f} MB after the batch against {base:.0f} MB before"
