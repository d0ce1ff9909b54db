"""Iteration-level batching of generation streams: concurrent streams share every decode step.

    submit(request, config, on_token) -> Stream          from any thread
    the loop (one thread):
      admit   newcomers' prefill together (Runtime.prefill: left-padded, one decoder call, on the
              device where the runtime keeps the cache there), each picks its first token; they
              join the decode state's free slots between two steps
      step    one decoder call for every slot of the decode state: each stream's last token, its own
              KV cache row, adapter set and position (free slots ride along and are ignored)
      leave   finished (EOS, max_new_tokens) or cancelled streams free their slots

The decode state (`allspark.runtime.decoding`, made by `Runtime.decode_state`) is the one
`Runtime.generate` steps: on the device plane a static cache whose free rows take newcomers in
place (slot-based in-flight batching: the cache never goes through host memory), on the host plane
host arrays. A row's cache columns need not be contiguous; padding is masked:
      slot 0: [a0 a1 a2 a3 a4 a5]        attention_mask [1 1 1 1 1 1]
      slot 1: [x  x  b0 b1 b2 b3]        attention_mask [0 0 1 1 1 1]   (b joined at column 2)

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
from dataclasses import dataclass

import numpy as np

from ..contract import tensors as C
from ..errors import AllSparkError, DeadlineExceeded, InputError, NumericsError
from ..model.generation import GenerationConfig, Strategy, TokenPicker
from ..model.pipeline import Prediction
from .decoding import DecodeState
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


class GenerationScheduler:
    def __init__(self, runtime: Runtime, max_streams: int = 64, beam_workers: int = 4):
        self.rt, self.max_streams = runtime, max_streams
        self._pending: list[Stream] = []
        self._cv = threading.Condition()
        self._closed = False
        self._state: DecodeState | None = None  # its occupants are the running streams' _Slots
        self._beams = ThreadPoolExecutor(max_workers=beam_workers, thread_name_prefix="allspark-beam")
        self.stats = {"steps": 0, "step_rows": 0, "prefills": 0, "streams": 0}
        self._stepping = 0  # streams in the step (or admission) under way: `alone`'s hint
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

    def alone(self) -> bool:
        """A hint for `on_token` callbacks: no other stream is in this step or waiting, so time they
        spend on the scheduler's thread delays no one else (read without the lock: it may be stale)."""
        return self._stepping <= 1 and not self._pending

    def running(self) -> int:
        with self._cv:
            return len(self._slots()) + len(self._pending)

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
        for s in self._pending + [sl.stream for sl in self._slots()]:
            s.cancel()

    def _slots(self) -> list[_Slot]:
        return [] if self._state is None else [o for o in self._state.occupants if o is not None]

    # ---- the loop -----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._pending and self._state is None and not self._closed:
                    self._cv.wait()
                if self._closed and not self._pending and self._state is None:
                    return
                room = max(0, self.max_streams - len(self._slots()))
                new, self._pending = self._pending[:room], self._pending[room:]
            try:
                if new:
                    self._admit(new)
                if self._state is not None:
                    self._step()
            except Exception as e:  # a failed decoder call fails the streams it carried, not the loop
                log.exception("generation step failed")
                for sl in self._slots():
                    self._fail(sl.stream, e)
                self._end()

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
            feed, out = self.rt.prefill(rows, bad=bad, on_device=self.rt.device_resident)
        except Exception as e:
            for s in ok:
                self._fail(s, e)
            return
        self.stats["prefills"] += 1
        first = out.logits[:, -1]  # (n, V)
        self._stepping = len(ok) + len(self._slots())
        keep: list[int] = []
        slots: list[_Slot] = []
        eos = self.rt.tokenizer.eos_token_id
        for i, (s, row) in enumerate(zip(ok, rows)):
            if i in bad or not np.isfinite(first[i]).all():
                self._fail(s, NumericsError(row.modality, bad.get(i, "decoder")))
                continue
            length = int(feed[C.ATTENTION_MASK][i].sum())
            if self.rt.device_resident and length + s.config.max_new_tokens > self.rt.max_positions:
                self._fail(s, InputError(row.modality, "max_new_tokens", f"at most {self.rt.max_positions - length} "
                                         f"for a {length}-token prompt (the runtime's max_positions, "
                                         f"{self.rt.max_positions})", str(s.config.max_new_tokens)))
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
            budgets = [sl.stream.config.max_new_tokens for sl in slots]
            mask, pos, ids = feed[C.ATTENTION_MASK][k], feed[C.POSITION_IDS][k, -1:], feed[C.ADAPTER_IDS][k]
            if self._state is None:
                self._state = self.rt.decode_state(out.present, k, mask, pos, ids, max(budgets), slots, budgets)
            else:
                self._state.join(slots, out.present, k, mask, pos, ids, budgets)

    def _step(self) -> None:
        st = self._state
        assert st is not None
        tokens = np.asarray([0 if sl is None else sl.last for sl in st.occupants], np.int64)  # free slots: any token
        logits = st.step(tokens, None)
        self.stats["steps"] += 1
        finite = np.isfinite(logits).all(axis=1)  # one pass over the rows, not one per row
        gone, picking = [], []
        for i, sl in enumerate(st.occupants):
            if sl is None:
                continue
            self.stats["step_rows"] += 1
            if not finite[i]:
                self._fail(sl.stream, NumericsError(sl.stream.request.modality, "decoder"))
            elif sl.stream.cancelled.is_set():
                self._fail(sl.stream, Cancelled("cancelled"))
            elif sl.stream.overdue():
                self._fail(sl.stream, _overdue(sl.stream))
            else:
                picking.append(i)
                continue
            gone.append(i)
        slots = [st.occupants[i] for i in picking]
        self._stepping = len(slots)
        for i, sl, tok in zip(picking, slots, TokenPicker.pick_each([sl.picker for sl in slots], logits[picking])):
            if tok is not None:
                sl.last = tok
                self._emit(sl, tok)
            if sl.picker.done:
                self._finish(sl)
                gone.append(i)
        if len(gone) == sum(o is not None for o in st.occupants):
            self._end()
        elif gone:
            st.drop(gone)

    def _end(self) -> None:
        """No stream left: the decode state (a device workspace: back to its pool) goes."""
        if self._state is not None:
            self._state.close()
            self._state = None

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
