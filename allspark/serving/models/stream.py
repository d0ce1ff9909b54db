"""`allspark_stream`: the python model behind the generation modalities' ensembles (`language`,
`code`): decoupled, one response per token.

    execute(requests) -> returns at once; each request becomes a stream of the model's
      GenerationScheduler (allspark.runtime.scheduler): prefilled with other newcomers, then one
      decoder step shared by every running stream per token -- in this process (runtime layout) or
      as one BLS call to the decoder per step (components layout)
      -> {text_output: piece, tokens: [id], final: false} per token, as it is chosen, then
      -> {text_output: full text, tokens: all ids, final: true}, flagged COMPLETE_FINAL
      (request parameter `stream_tokens: false`: the final response only -- one message instead of
      one per token, for clients that wait for the whole text, as `ServingClient.predict` does)

A stream's tokens are those `Runtime.generate` gives it alone (greedy). A cancelled request leaves
at the next step and frees its rows; `finalize` (server shutdown) lets running streams finish.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

import numpy as np

from ...errors import InputError
from ...runtime import GenerationConfig, Prediction, Runtime
from ...runtime.scheduler import Cancelled, GenerationScheduler
from ..model_config import GENERATED, field_tensor
from .requests import EntryContext
from .triton import (
    check_deadline,
    error_response,
    input_or_none,
    pb_utils,
    request_parameters,
    tensor,
)

# at shutdown, how long running streams may take to finish before they are cancelled: with the
# response queue's last sends (RESPONSES_CLOSE_SECONDS) under the server's exit timeout (`allspark
# serve`: 10 s), so SIGTERM ends in bounded time with stuck streams
DRAIN_SECONDS = 8.0
RESPONSES_CLOSE_SECONDS = 1.0
# how often a stream asks whether its client cancelled: each ask is an IPC round trip to the server
# (0.17-0.3 ms, on the scheduler's thread: asked per token it made 16 demo tokens ~1.6x slower than
# in-process; every 50 ms it still took 6% of that thread at 32 streams). A cancelled stream's row is
# freed within this long.
CANCEL_CHECK_S = 0.25
log = logging.getLogger(__name__)


class ResponseQueue:
    """Sends the streams' responses off the scheduler's thread. A decoupled response's `send` is an
    IPC round trip to the server (0.35-0.5 ms here; the stub lets go of the GIL while it waits): sent
    on the scheduler's thread, every running stream waited for every other stream's responses. One
    thread sends them in order, so a stream's responses keep theirs. A response is sent at once, on
    the caller's thread, when nothing is queued and `alone()` says no other stream would wait for it:
    a lone stream (concurrency 1) pays no hand-off. (On the 2-core CPU it made no measurable
    difference, both cores being busy with clients, Triton and the stub; it is for steps that run
    on a device.) After `close`, responses are sent on the caller's thread."""

    def __init__(self, alone: Callable[[], bool]):
        self.alone = alone
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._owed = 0  # queued or being sent
        self._stopped = False  # the thread has taken the stop signal: send on the caller's thread
        self._thread = threading.Thread(target=self._run, name="allspark-responses", daemon=True)
        self._thread.start()

    def send(self, job: Callable[[], None]) -> None:
        with self._lock:
            now = self._stopped or (self._owed == 0 and self.alone())
            if not now:
                self._owed += 1
                self._jobs.put(job)
        if now:
            job()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                with self._lock:  # what was queued behind the stop signal is still sent, here
                    self._stopped = True
                    left = []
                    while True:
                        try:
                            left.append(self._jobs.get_nowait())
                        except queue.Empty:
                            break
                for job in left:
                    self._one(job)
                return
            self._one(job)
            # Triton counts a request in flight until its python objects are gone: hold none while idle
            del job

    def _one(self, job) -> None:
        try:
            job()
        except Exception as e:  # the stream records it (`_TokenStream.gone`); the client has gone
            log.debug("could not send a stream's response: %s", e)
        finally:
            with self._lock:
                self._owed -= 1

    def close(self, timeout: float) -> None:
        """Send what is queued (for up to `timeout` seconds), then stop."""
        self._jobs.put(None)
        self._thread.join(timeout)


class _TokenStream:
    """Sends one response per token: the token id and the text it adds (held back while the bytes
    so far end mid-character)."""

    def __init__(self, runtime: Runtime, request, dtypes: dict, modality: str, out: ResponseQueue,
                 every_token: bool = True):
        self.rt, self.request, self.dtypes, self.every_token, self.out = runtime, request, dtypes, every_token, out
        self.names = [field_tensor(modality, n) for n in GENERATED]  # `code.text_output`, ...
        self.sender = request.get_response_sender()
        self.gone = False  # a response could not be built or sent (the client left): the stream ends
        self.tokens: list[int] = []
        self.sent = ""
        # the first ask waits CANCEL_CHECK_S too: a short generation (16 demo tokens, ~10 ms) never pays it
        self.next_cancel_check = time.monotonic() + CANCEL_CHECK_S

    def _send(self, text: str, tokens: list[int], final: bool) -> None:
        self.out.send(lambda: self._send_now(text, tokens, final))

    def _send_now(self, text: str, tokens: list[int], final: bool) -> None:
        pb = pb_utils()
        d = self.dtypes
        text_out, tokens_out, final_out = self.names
        try:
            resp = pb.InferenceResponse([tensor(text_out, np.array([text], dtype=object), d[text_out]),
                                         tensor(tokens_out, np.asarray(tokens), d[tokens_out]),
                                         tensor(final_out, np.array([final]), d[final_out])])
        except Exception as e:
            self.gone = True  # a flag, not the exception: its traceback would hold this stream (and request)
            if final:  # the client must not be left waiting for a final response
                self._fail_now(e)
            raise
        try:
            self.sender.send(resp, flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0)
        except Exception:
            self.gone = True
            raise

    def token(self, tok: int) -> None:
        if self.gone:  # a queued response could not be built or sent
            raise Cancelled()
        now = time.monotonic()
        if now >= self.next_cancel_check:  # is_cancelled() is a round trip to the server: not per token
            self.next_cancel_check = now + CANCEL_CHECK_S
            if getattr(self.request, "is_cancelled", lambda: False)():
                raise Cancelled()
        self.tokens.append(tok)
        if not self.every_token:  # the client wants the final response only: one message, not one per token
            return
        text = self.rt.detokenize(self.tokens)
        piece = ""
        if not text.endswith("\ufffd") and text.startswith(self.sent):
            piece, self.sent = text[len(self.sent):], text
        self._send(piece, [tok], False)

    def finish(self, p: Prediction) -> None:
        for tok in p.tokens[len(self.tokens):] if self.every_token else ():
            self.token(tok)
        self._send(p.text, p.tokens, True)

    def fail(self, err: BaseException) -> None:
        self.out.send(lambda: self._fail_now(err))

    def _fail_now(self, err: BaseException) -> None:
        pb = pb_utils()
        if isinstance(err, Cancelled):
            self.sender.send(flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        else:
            self.sender.send(error_response(err, self.request), flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.streams = Streams(EntryContext.load(args, generation=True))

    def execute(self, requests: list) -> None:
        for r in requests:
            self.streams.start(r)

    def finalize(self) -> None:
        self.streams.close()


class Streams:
    """Generation requests as streams of one `GenerationScheduler`: the components layout's
    `allspark_stream`, and the generation side of `allspark_runtime`."""

    def __init__(self, ctx: EntryContext):
        self.ctx = ctx
        self.default_new_tokens = ctx.runtime.check_max_new_tokens("allspark_stream", int(ctx.params["max_new_tokens"]))
        self.scheduler = GenerationScheduler(ctx.runtime, max_streams=int(ctx.params["max_generation_threads"]))
        self.responses = ResponseQueue(self.scheduler.alone)

    def start(self, request) -> None:
        stream = None
        try:
            modality = self.ctx.modality_of(request)
            params = request_parameters(request)
            stream = _TokenStream(self.ctx.runtime, request, self.ctx.out_dtypes, modality, self.responses,
                                  every_token=params.get("stream_tokens", True) is not False)
            left = check_deadline(request, modality)
            row = self.ctx.read(request)[0]
            gen = GenerationConfig(max_new_tokens=self._max_new(request, modality), ignore_eos=_flag(params, "ignore_eos"))
            s = self.scheduler.submit(row, gen, stream.token, timeout_s=left)
            s.future.add_done_callback(lambda f, st=stream: _complete(st, f))
        except Exception as e:  # one stream's failure is its own: error response, final flag
            if stream is not None:
                stream.fail(e)
            else:
                pb = pb_utils()
                request.get_response_sender().send(error_response(e, request),
                                                   flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _max_new(self, request, modality: str) -> int:
        x = input_or_none(request, "max_new_tokens")
        if x is None:
            return self.default_new_tokens
        return self.ctx.runtime.check_max_new_tokens(modality, int(np.asarray(x).reshape(-1)[0]))

    def close(self) -> None:
        self.scheduler.close(drain=True, timeout=DRAIN_SECONDS)
        self.responses.close(timeout=RESPONSES_CLOSE_SECONDS)  # the drained streams' last responses


def _complete(stream: _TokenStream, future) -> None:
    """The stream's last response: the whole text, or its error."""
    try:
        err = future.exception()
        if err is None:
            stream.finish(future.result())
        else:
            stream.fail(err)
    except Exception as e:  # the client is gone: nothing more to send
        log.debug("could not complete a stream: %s", e)


def _flag(params: dict, name: str) -> bool:
    v = params.get(name, False)
    if not isinstance(v, bool):
        raise InputError("language/code", name, "a boolean request parameter", repr(v))
    return v
