"""Iteration-level batching of generation streams: concurrent streams share every decode step.

    submit(request, config, on_token) -> Stream          from any thread
    the loop (one thread):
      admit   newcomers' prefill together (Runtime.prefill: left-padded, one decoder call),
              each picks its first token; they join the running batch between two steps
      step    one decoder call for every running stream: its last token, its own KV cache rows
              (left-padded to the batch's longest), its own adapter set and position
      leave   finished (EOS, max_new_tokens) or cancelled streams drop out and free their rows;
              cache columns that are padding for every remaining stream are trimmed

    batch KV cache, per layer: (streams, kv_heads, P, head_dim), left padding masked out
      stream a: [pad pad a0 a1 a2 a3]      attention_mask [0 0 1 1 1 1]
      stream b: [b0 b1 b2 b3 b4 b5]        attention_mask [1 1 1 1 1 1]

A stream's tokens are those `Runtime.generate` gives it alone (greedy, or seeded sampling with its
own random stream: `TokenPicker`); padding is masked, so only the order of float sums can differ.
Beam search keeps its beams in one request: such streams run alone (`Runtime.predict`) on a worker
thread. Works over any backend (onnxruntime in-process, or the BLS backend inside Triton).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ..contract import tensors as C
from ..errors import AllSparkError, DeadlineExceeded, InputError, NumericsError
from ..model.generation import GenerationConfig, Strategy, TokenPicker
from ..model.pipeline import Prediction
from .decoding import HostStepper
from .runtime import Request, Runtime

log = logging.getLogger(__name__)
OnToken = Callable[[int], None]


class Cancelled(AllSparkError):
    """The stream was cancelled (its client went away) before it finished."""


class Stream:
    """One submitted generation: a future of its `Prediction`, its tokens so far, cancel()."""

    def __init__(self, request: Request, config: GenerationConfig, on_token: OnToken | None,
                 timeout_s: float | None = None):
        self.request, self.config, self.on_token = request, config, on_token
        self.future: Future[Prediction] = Future()
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()
        self.deadline = None if not timeout_s else self.submitted + timeout_s

    def overdue(self) -> bool:
        return self.deadline is not None and time.perf_counter() > self.deadline

    def cancel(self) -> None:
        """Leave at the next step; the future then fails with `Cancelled`."""
        self.cancelled.set()

    def result(self, timeout: float | None = None) -> Prediction:
        return self.future.result(timeout)


@dataclass
class _Slot:
    """A running stream's state outside the batched arrays."""

    stream: Stream
    picker: TokenPicker
    last: int  # the token to feed at the next step


@dataclass
class _Batch:
    """The running streams: row i of the decode state belongs to slots[i]."""

    slots: list[_Slot] = field(default_factory=list)
    state: HostStepper | None = None


class GenerationScheduler:
    def __init__(self, runtime: Runtime, max_streams: int = 64, beam_workers: int = 4):
        self.rt, self.max_streams = runtime, max_streams
        self._pending: list[Stream] = []
        self._cv = threading.Condition()
        self._closed = False
        self._batch = _Batch()
        self._beams = ThreadPoolExecutor(max_workers=beam_workers, thread_name_prefix="allspark-beam")
        self.stats = {"steps": 0, "step_rows": 0, "prefills": 0, "streams": 0}
        self._thread = threading.Thread(target=self._loop, name="allspark-scheduler", daemon=True)
        self._thread.start()

    # ---- API ----------------------------------------------------------------------------------
    def submit(self, request: Request, config: GenerationConfig | None = None, on_token: OnToken | None = None,
               timeout_s: float | None = None) -> Stream:
        """Queue a generation; `on_token(id)` is called (on the scheduler's thread) per new token. A
        stream still running `timeout_s` after submission fails with `DeadlineExceeded`."""
        if timeout_s is not None and timeout_s < 0:
            raise InputError(request.modality, "timeout", "a timeout >= 0 seconds (0: none)", str(timeout_s))
        s = Stream(request, config or self.rt.default_generation, on_token, timeout_s)
        self.rt.check_max_new_tokens(request.modality, s.config.max_new_tokens)
        if s.config.strategy == Strategy.BEAM and s.config.num_beams > 1:
            self._beams.submit(self._solo, s)
            return s
        with self._cv:
            if self._closed:
                raise AllSparkError("the generation scheduler is closed")
            self._pending.append(s)
            self._cv.notify()
        return s

    def running(self) -> int:
        with self._cv:
            return len(self._batch.slots) + len(self._pending)

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking streams; with `drain`, let the running ones finish for up to `timeout`
        seconds, then cancel what still runs (a stuck or endless stream cannot hold shutdown)."""
        with self._cv:
            self._closed = True
            if not drain:
                self._cancel_all()
            self._cv.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("generation: streams still running after %.1f s of draining; cancelling them", timeout or 0)
            with self._cv:
                self._cancel_all()
                self._cv.notify()
            self._thread.join(30)
        self._beams.shutdown(wait=drain and not self._thread.is_alive(), cancel_futures=True)

    def _cancel_all(self) -> None:
        for s in self._pending + [sl.stream for sl in self._batch.slots]:
            s.cancel()

    # ---- the loop -----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._batch.slots and not self._closed:
                    self._cv.wait()
                if self._closed and not self._pending and not self._batch.slots:
                    return
                room = max(0, self.max_streams - len(self._batch.slots))
                new, self._pending = self._pending[:room], self._pending[room:]
            try:
                if new:
                    self._admit(new)
                if self._batch.slots:
                    self._step()
            except Exception as e:  # a failed decoder call fails the streams it carried, not the loop
                log.exception("generation step failed")
                for sl in self._batch.slots:
                    self._fail(sl.stream, e)
                self._batch = _Batch()

    def _admit(self, streams: list[Stream]) -> None:
        rows, ok = [], []
        for s in streams:
            if s.cancelled.is_set():
                self._fail(s, Cancelled("cancelled before it started"))
                continue
            if s.overdue():
                self._fail(s, _overdue(s))
                continue
            try:
                row = self.rt.prepare(s.request)
                if self.rt.routes[row.modality].head is not None:
                    raise InputError(row.modality, "modality", "a generation modality", "a modality with a head")
                rows.append(row)
                ok.append(s)
            except Exception as e:  # this request alone fails
                self._fail(s, e)
        if not rows:
            return
        bad: dict[int, str] = {}
        try:
            feed, out = self.rt.prefill(rows, bad=bad)
        except Exception as e:
            for s in ok:
                self._fail(s, e)
            return
        self.stats["prefills"] += 1
        first = out.logits[:, -1]  # (n, V)
        keep: list[int] = []
        slots: list[_Slot] = []
        eos = self.rt.tokenizer.eos_token_id
        for i, (s, row) in enumerate(zip(ok, rows)):
            if i in bad or not np.isfinite(first[i]).all():
                self._fail(s, NumericsError(row.modality, bad.get(i, "decoder")))
                continue
            picker = TokenPicker(s.config, None if s.config.ignore_eos else eos, [row.prompt_ids])
            tok = picker.pick(first[i])
            sl = _Slot(s, picker, tok if tok is not None else -1)
            if tok is not None:
                self._emit(sl, tok)
            if picker.done or sl.stream.cancelled.is_set():
                self._finish(sl)
                continue
            keep.append(i)
            slots.append(sl)
        if keep:
            k = np.asarray(keep)
            self._join(slots, [p[k] for p in out.present], feed[C.ATTENTION_MASK][k],
                       feed[C.POSITION_IDS][k, -1:], feed[C.ADAPTER_IDS][k])

    def _join(self, slots: list[_Slot], past: list[np.ndarray], mask: np.ndarray, pos: np.ndarray,
              ids: np.ndarray) -> None:
        b = self._batch
        if not b.slots:
            self._batch = _Batch(slots, HostStepper(self.rt.backend, self.rt.cache.past, past, mask, pos, ids))
            return
        b.state.join(past, mask, pos, ids)
        b.slots += slots

    def _step(self) -> None:
        b = self._batch
        tokens = np.asarray([sl.last for sl in b.slots], np.int64)
        logits = b.state.step(tokens, None)
        self.stats["steps"] += 1
        self.stats["step_rows"] += len(tokens)
        stay = []
        for i, sl in enumerate(b.slots):
            if not np.isfinite(logits[i]).all():
                self._fail(sl.stream, NumericsError(sl.stream.request.modality, "decoder"))
                continue
            if sl.stream.cancelled.is_set():
                self._fail(sl.stream, Cancelled("cancelled"))
                continue
            if sl.stream.overdue():
                self._fail(sl.stream, _overdue(sl.stream))
                continue
            tok = sl.picker.pick(logits[i])
            if tok is not None:
                sl.last = tok
                self._emit(sl, tok)
            if sl.picker.done:
                self._finish(sl)
            else:
                stay.append(i)
        if len(stay) < len(b.slots):
            self._keep(stay)

    def _keep(self, rows: list[int]) -> None:
        """Drop the other rows, and the leading cache columns that are padding for every row left."""
        b = self._batch
        if not rows:
            self._batch = _Batch()
            return
        b.slots = [b.slots[i] for i in rows]
        b.state.keep(rows)

    # ---- results ------------------------------------------------------------------------------
    def _emit(self, sl: _Slot, tok: int) -> None:
        if sl.stream.on_token is not None:
            try:
                sl.stream.on_token(tok)
            except Exception as e:  # the consumer is gone (or broken): this stream ends
                log.debug("on_token failed (%s): cancelling the stream", e)
                sl.stream.cancel()

    def _finish(self, sl: _Slot) -> None:
        s = sl.stream
        if s.cancelled.is_set():
            self._fail(s, Cancelled("cancelled"))
            return
        text = self.rt.detokenize(sl.picker.tokens).strip()
        self.stats["streams"] += 1
        if not s.future.done():
            s.future.set_result(Prediction(s.request.modality, text=text, tokens=list(sl.picker.tokens)))

    def _fail(self, s: Stream, e: BaseException) -> None:
        if not s.future.done():
            s.future.set_exception(e)

    def _solo(self, s: Stream) -> None:
        """A beam-search stream: the runtime's own generate, alone (its tokens arrive at the end)."""
        try:
            p = self.rt.predict(s.request.modality, s.request.inputs, s.request.prompt, s.config)
            for tok in p.tokens or []:
                if s.on_token is not None:
                    s.on_token(tok)
            s.future.set_result(p)
        except Exception as e:
            self._fail(s, e)


def _overdue(s: Stream) -> DeadlineExceeded:
    return DeadlineExceeded(f"{s.request.modality}: the request's timeout of "
                            f"{1e3 * (s.deadline - s.submitted):.0f} ms expired before it finished")
