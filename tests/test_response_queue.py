"""The served streams' response queue (`allspark.serving.models.stream.ResponseQueue`): a response is
sent on the caller's thread only when no other stream would wait for it, otherwise in order on the
queue's own thread; a failed send does not stop the queue; close sends what is queued."""

from __future__ import annotations

import threading
import time

from allspark.serving.models.stream import ResponseQueue


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
    assert time.perf_counter() - t < 0.05  # the caller did not wait for the sends
    q.close(5)
    assert [tag for tag, _ in sent] == ["0", "1", "2", "3", "4"]
    assert {ident for _, ident in sent} != {threading.get_ident()}


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
