"""Iteration-level batching (`GenerationScheduler`): streams that share decode steps, join between
steps and leave when done get exactly the tokens `Runtime.generate` gives each alone."""

from __future__ import annotations

import threading
import time

import pytest

from allspark.errors import DeadlineExceeded, InputError
from allspark.runtime import GenerationConfig, Request, Runtime
from allspark.runtime.scheduler import Cancelled, GenerationScheduler

PROMPTS = [("language", "a cat sat on the mat"), ("code", "def f(x): return x + 1"),
           ("language", "hi"), ("code", "for i in range(10):\n    print(i * i)  # squares"),
           ("language", "remote sensing of crops in spring and autumn"), ("code", "x = 1")]


@pytest.fixture(scope="module")
def rt(build):
    return Runtime.load(build)


def _alone(rt, m, text, cfg):
    return rt.generate(m, {"text": text}, config=cfg).tokens


def test_streams_that_share_steps_get_their_solo_tokens(rt):
    cfg = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    sched = GenerationScheduler(rt)
    started = threading.Event()
    try:
        first = [sched.submit(Request(m, {"text": t}), cfg, on_token=lambda tok: started.set()) for m, t in PROMPTS[:3]]
        assert started.wait(60)  # the first streams are running: the next ones join between steps
        later = [sched.submit(Request(m, {"text": t}), GenerationConfig(max_new_tokens=n, ignore_eos=True))
                 for (m, t), n in zip(PROMPTS[3:], (5, 9, 12))]
        got = [s.result(120).tokens for s in first + later]
    finally:
        sched.close()
    want = [_alone(rt, m, t, cfg) for m, t in PROMPTS[:3]] + \
           [_alone(rt, m, t, GenerationConfig(max_new_tokens=n, ignore_eos=True)) for (m, t), n in zip(PROMPTS[3:], (5, 9, 12))]
    assert got == want
    assert [len(g) for g in got] == [12, 12, 12, 5, 9, 12]
    st = sched.stats
    assert st["step_rows"] == sum(len(g) - 1 for g in got)  # every token after the first is one row of a step
    assert st["steps"] < st["step_rows"]  # ... and streams shared steps


def test_sampling_and_beams_match_their_solo_runs(rt):
    sample = GenerationConfig(strategy="sample", max_new_tokens=8, seed=7, top_k=5, top_p=0.95, ignore_eos=True)
    beams = GenerationConfig.lynx(max_new_tokens=6)
    sched = GenerationScheduler(rt)
    try:
        streamed: list[int] = []
        a = sched.submit(Request("language", {"text": "sample me"}), sample, on_token=streamed.append)
        b = sched.submit(Request("code", {"text": "beam me"}), beams)
        c = sched.submit(Request("language", {"text": "greedy alongside"}), GenerationConfig(max_new_tokens=8))
        ga, gb, gc = a.result(120), b.result(120), c.result(120)
    finally:
        sched.close()
    assert ga.tokens == _alone(rt, "language", "sample me", sample) == streamed
    assert gb.tokens == _alone(rt, "code", "beam me", beams)
    assert gc.tokens == _alone(rt, "language", "greedy alongside", GenerationConfig(max_new_tokens=8))
    assert ga.text == rt.generate("language", {"text": "sample me"}, config=sample).text


def test_a_cancelled_stream_leaves_and_bad_requests_fail_alone(rt):
    sched = GenerationScheduler(rt)
    seen = threading.Event()
    counts = {"n": 0}

    def on_token(tok):
        counts["n"] += 1
        if counts["n"] == 3:
            seen.set()

    try:
        long = sched.submit(Request("language", {"text": "go on"}), GenerationConfig(max_new_tokens=400, ignore_eos=True),
                            on_token=on_token)
        bad = sched.submit(Request("rgb", {"text": "x"}))  # a head modality
        worse = sched.submit(Request("language", {}))  # no text
        ok = sched.submit(Request("code", {"text": "print(1)"}), GenerationConfig(max_new_tokens=4))
        assert seen.wait(60)
        long.cancel()
        with pytest.raises(Cancelled):
            long.result(60)
        with pytest.raises(InputError):
            bad.result(60)
        with pytest.raises(InputError, match="text"):
            worse.result(60)
        assert len(ok.result(60).tokens) == 4
        assert counts["n"] < 400
        for _ in range(100):
            if sched.running() == 0:
                break
            threading.Event().wait(0.05)
        assert sched.running() == 0  # its rows were freed
    finally:
        sched.close()


def test_close_drains_running_streams(rt):
    sched = GenerationScheduler(rt)
    s = sched.submit(Request("language", {"text": "finish me"}), GenerationConfig(max_new_tokens=10, ignore_eos=True))
    sched.close(drain=True, timeout=120)
    assert len(s.result(0).tokens) == 10
    with pytest.raises(Exception, match="closed"):
        sched.submit(Request("language", {"text": "too late"}))


def test_a_stream_past_its_timeout_fails_alone(rt):
    sched = GenerationScheduler(rt)
    try:
        slow = sched.submit(Request("language", {"text": "never ends"}),  # the longest a build allows, slowly
                            GenerationConfig(max_new_tokens=rt.max_positions, ignore_eos=True), timeout_s=0.3,
                            on_token=lambda tok: time.sleep(0.002))
        fine = sched.submit(Request("code", {"text": "x = 2"}), GenerationConfig(max_new_tokens=6, ignore_eos=True),
                            timeout_s=120)
        with pytest.raises(DeadlineExceeded, match="timeout of 300 ms"):
            slow.result(60)
        assert len(fine.result(60).tokens) == 6
        with pytest.raises(InputError, match="timeout"):
            sched.submit(Request("code", {"text": "x"}), timeout_s=-1)
        with pytest.raises(InputError, match=rf"max_new_tokens.*expected 1\.\.{rt.max_positions} \(the build's maximum positions"):
            sched.submit(Request("code", {"text": "x"}), GenerationConfig(max_new_tokens=rt.max_positions + 1))
    finally:
        sched.close()


def test_close_cancels_what_outlives_the_drain_timeout(rt):
    sched = GenerationScheduler(rt)
    started = threading.Event()
    endless = sched.submit(Request("language", {"text": "on and on"}),
                           GenerationConfig(max_new_tokens=rt.max_positions, ignore_eos=True),
                           on_token=lambda tok: started.set() or time.sleep(0.002))
    assert started.wait(60)
    t0 = time.monotonic()
    sched.close(drain=True, timeout=0.3)
    assert time.monotonic() - t0 < 10
    with pytest.raises(Cancelled):
        endless.result(0)


def test_alone_says_whether_a_token_callback_delays_other_streams(rt):
    """`alone()` (read by the serving response queue from inside `on_token`): true for a lone
    stream, false while streams share a step."""
    cfg = GenerationConfig(max_new_tokens=6, ignore_eos=True)
    sched = GenerationScheduler(rt)
    try:
        seen: list[bool] = []
        sched.submit(Request("code", {"text": "x = 1"}), cfg, on_token=lambda tok: seen.append(sched.alone())).result(60)
        assert seen == [True] * 6
        shared: list[bool] = []
        go = threading.Event()
        streams = [sched.submit(Request(m, {"text": t}), cfg, on_token=lambda tok: (go.wait(60), shared.append(sched.alone())))
                   for m, t in PROMPTS[:3]]
        go.set()  # all three are admitted by now, or join between steps: most steps are shared
        for s in streams:
            s.result(60)
        assert shared.count(False) >= len(shared) // 2, shared
    finally:
        sched.close()
