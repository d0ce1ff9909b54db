"""`allspark_runtime`: the runtime layout's one process holding the build (decoupled, one instance).

    execute(requests) -> returns at once
      generation request   -> a stream of the GenerationScheduler (`Streams`, as `allspark_stream`)
      single-pass request  -> the single-pass queue; a worker thread takes everything queued (up to
                              max_batch_rows rows) and answers it with one `Runtime.predict_batch`
                              (`SinglePass`, as `allspark_entry`), one final response per request

Every graph is loaded once, whatever the instance counts: `--entry-instances` sets the number of
single-pass workers (batches answered at once) and of forwarder instances, not copies of the weights.
Single-pass requests arrive from the `allspark_entry` forwarder (clients' HTTP/unary gRPC calls
cannot reach a decoupled model); their rows keep an explicit batch dim.
"""

from __future__ import annotations

import logging
import queue
import threading

from .entry import SinglePass
from .requests import EntryContext
from .stream import DRAIN_SECONDS, Streams
from .triton import error_response, pb_utils

log = logging.getLogger(__name__)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        ctx = EntryContext.load(args, generation=True)
        self.ctx = ctx
        self.streams = Streams(ctx)
        self.single_pass = SinglePass(ctx, tagged_errors=True)
        self.max_rows = int(ctx.params.get("max_batch_rows", "32"))
        self.queue: queue.Queue = queue.Queue()
        self.workers = [threading.Thread(target=self._work, name=f"allspark-single-pass-{i}", daemon=True)
                        for i in range(int(ctx.params.get("single_pass_workers", "1")))]
        for w in self.workers:
            w.start()

    def execute(self, requests: list) -> None:
        for r in requests:
            try:
                generates = self.ctx.modality_of(r) not in self.ctx.batched
            except Exception as e:  # no modality can be told: the request's own error
                _send_final(r, error_response(e, r))
                continue
            if generates:
                self.streams.start(r)
            else:
                self.queue.put(r)

    def _work(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            batch, rows = [first], _rows(first)
            while rows < self.max_rows:  # whatever queued while the last batch ran joins this one
                try:
                    r = self.queue.get_nowait()
                except queue.Empty:
                    break
                if r is None:
                    self.queue.put(None)  # the stop signal is for every worker
                    break
                batch.append(r)
                rows += _rows(r)
            try:
                responses = self.single_pass(batch)
            except Exception as e:  # SinglePass isolates failures; this is a last resort
                responses = [error_response(e, r, tagged=True) for r in batch]
            for r, resp in zip(batch, responses):
                try:
                    _send_final(r, resp)
                except Exception as e:  # the client is gone
                    log.debug("could not answer a single-pass request: %s", e)
            # Triton counts a request in flight until its python object is gone: a worker waiting for
            # the next batch must not hold the last one (the model could not unload at shutdown)
            del first, batch, r, resp, responses

    def finalize(self) -> None:
        for _ in self.workers:  # one stop signal per worker (one alone left the others waiting out the join)
            self.queue.put(None)
        for w in self.workers:
            w.join(DRAIN_SECONDS)
        self.streams.close()


def _rows(request) -> int:
    """A request's rows: the leading dim of its first field (1 when it has none)."""
    for t in request.inputs():
        shape = t.shape()
        if shape and t.name() != "prompt":
            return int(shape[0])
    return 1


def _send_final(request, response) -> None:
    pb = pb_utils()
    request.get_response_sender().send(response, flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
