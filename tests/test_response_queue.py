"""The served streams' response queue (`allspark.serving.models.stream.ResponseQueue`): a response is
sent on the caller's thread only when no other stream would wait for it, otherwise in order on the
queue's own thread; a failed send does not stop the queue; close sends what is queued, and what
comes after on the caller's thread. And a stream's responses through it (`_TokenStream`, with a
stand-in for Triton's `triton_python_backend_utils`): tokens in order before the final one, a
failed send ends the stream, a final response that cannot be built still ends the client's wait."""

from __future__ import annotations

import sys
import threading
import time
import types

import numpy as np
import pytest

from allspark.runtime.scheduler import Cancelled
from allspark.serving.models.stream import ResponseQueue, _TokenStream


def _recorder():
    sent: list[tuple[str, int]] = []

    def job(tag: str, delay: float = 0.0):
        def run():
            time.sleep(delay)
            sent.append((tag, threading.get_ident()))
        return run

    return sent, job


def test_a_lone_stream_sends_on_its_own_thread():
    sent, job = _recorder()
    q = ResponseQueue(alone=lambda: True)
    try:
        q.send(job("a"))
        assert sent == [("a", threading.get_ident())]  # at once: no hand-off
    finally:
        q.close(5)


def test_shared_steps_hand_responses_to_the_queue_in_order():
    sent, job = _recorder()
    q = ResponseQueue(alone=lambda: False)
    t = time.perf_counter()
    for i in range(5):
        q.send(job(str(i), delay=0.05))
    assert time.perf_counter() - t < 0.2  # the caller did not wait for the sends (5 x 0.05 s)
    q.close(5)
    assert [tag for tag, _ in sent] == ["0", "1", "2", "3", "4"]
    assert threading.get_ident() not in {ident for _, ident in sent}


def test_nothing_overtakes_a_queued_response():
    """Alone again while responses are still queued: the next one queues behind them."""
    sent, job = _recorder()
    alone = [False]
    q = ResponseQueue(alone=lambda: alone[0])
    q.send(job("first", delay=0.1))
    alone[0] = True
    q.send(job("second"))
    q.close(5)
    assert [tag for tag, _ in sent] == ["first", "second"]


def test_a_failed_send_does_not_stop_the_queue():
    sent, job = _recorder()
    q = ResponseQueue(alone=lambda: False)

    def broken():
        raise RuntimeError("the client is gone")

    q.send(broken)
    q.send(job("after"))
    q.close(5)
    assert [tag for tag, _ in sent] == ["after"]


def test_after_close_responses_go_on_the_callers_thread():
    sent, job = _recorder()
    q = ResponseQueue(alone=lambda: False)
    q.send(job("queued", delay=0.05))
    q.close(5)
    q.send(job("after"))  # no thread left to take it: sent at once, here
    assert [tag for tag, _ in sent] == ["queued", "after"] and sent[1][1] == threading.get_ident()


class _Sender:
    def __init__(self, fail_at: int | None = None):
        self.got: list[tuple[dict, int]] = []
        self.fail_at = fail_at

    def send(self, response=None, flags=0):
        if self.fail_at is not None and len(self.got) == self.fail_at:
            self.got.append(({"failed": True}, flags))
            raise RuntimeError("the client is gone")
        self.got.append((response.outputs if response is not None else {}, flags))


class _Request:
    def __init__(self, sender):
        self.sender = sender

    def get_response_sender(self):
        return self.sender

    def request_id(self):
        return "r1"


class _Runtime:
    def detokenize(self, tokens):
        return " ".join(map(str, tokens))


@pytest.fixture
def pb(monkeypatch):
    """A stand-in for the python backend's utils module (it exists only inside a stub)."""
    m = types.ModuleType("triton_python_backend_utils")
    m.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1

    class Tensor:
        def __init__(self, name, value):
            if name.endswith("tokens") and value.dtype.kind not in "iu":
                raise TypeError("token ids must be integers")
            self.name, self.value = name, value

    class InferenceResponse:
        def __init__(self, output_tensors=None, error=None):
            self.outputs = {t.name: t.value for t in output_tensors or []}
            if error is not None:
                self.outputs["error"] = error

    class TritonError:
        INVALID_ARG, UNAVAILABLE, INTERNAL = (types.SimpleNamespace(name=n) for n in ("INVALID_ARG", "UNAVAILABLE",
                                                                                        "INTERNAL"))

        def __init__(self, msg, code=None):
            self.msg = msg

    m.Tensor, m.InferenceResponse, m.TritonError = Tensor, InferenceResponse, TritonError
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", m)
    return m


DTYPES = {"code.text_output": np.dtype(object), "code.tokens": np.dtype(np.int64), "code.final": np.dtype(bool)}


def _stream(sender, q):
    return _TokenStream(_Runtime(), _Request(sender), DTYPES, "code", q, every_token=True)


def test_a_streams_responses_keep_their_order_through_the_queue(pb):
    from allspark.model.pipeline import Prediction

    sender = _Sender()
    q = ResponseQueue(alone=lambda: False)
    s = _stream(sender, q)
    for tok in (5, 6, 7):
        s.token(tok)
    s.finish(Prediction("code", text="5 6 7", tokens=[5, 6, 7]))
    q.close(5)
    assert [list(o["code.tokens"]) for o, _ in sender.got] == [[5], [6], [7], [5, 6, 7]]
    assert [f for _, f in sender.got] == [0, 0, 0, 1] and bool(sender.got[-1][0]["code.final"][0])


def test_a_failed_queued_send_ends_the_stream(pb):
    sender = _Sender(fail_at=1)
    q = ResponseQueue(alone=lambda: False)
    s = _stream(sender, q)
    s.token(5)
    s.token(6)  # its send fails on the queue's thread
    deadline = time.monotonic() + 5
    while not s.gone and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(Cancelled):
        s.token(7)  # the scheduler then cancels the stream; its row is freed
    q.close(5)
    assert s.gone and isinstance(s.gone, bool)  # a flag: no traceback holding the request


def test_a_final_response_that_cannot_be_built_still_ends_the_wait(pb):
    from allspark.model.pipeline import Prediction

    sender = _Sender()
    q = ResponseQueue(alone=lambda: True)
    s = _stream(sender, q)
    s.every_token = False
    with pytest.raises((TypeError, ValueError)):
        s.finish(Prediction("code", text="x", tokens=["not an id"]))  # type: ignore[list-item]
    q.close(5)
    (out, flags), = sender.got
    assert flags == 1 and "error" in out  # an error response, flagged final
