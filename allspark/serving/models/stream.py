"""`allspark_stream`: the python model behind the generation modalities' ensembles (`language`,
`code`): decoupled, one response per token.

    execute(requests) -> returns at once; each request runs on a worker thread:
      Runtime.predict(modality, {"text": ...}, prompt, GenerationConfig(max_new_tokens))   (greedy)
        prefill: embed_tokens, decoder                  BLS, like every entry
        loop:    embed_tokens(token) -> decoder(step)   each step's token is streamed as it is fed back
      -> {text_output: piece, tokens: [id], final: false} per token, then
      -> {text_output: full text, tokens: all ids, final: true}, flagged COMPLETE_FINAL

Generation is the one decode loop (`allspark.model.generation.generate`), so the final text and
tokens equal `Runtime.generate`'s. Tokens are tapped where the loop feeds each chosen token back to
`embed_tokens`; the last token (never fed back) is sent from the finished prediction. Concurrent
streams' decoder steps meet in the shared decoder's dynamic batcher.
"""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ...errors import InputError
from ...runtime import GenerationConfig, Prediction, Runtime
from ..model_config import GENERATED, field_tensor
from .requests import EntryContext
from .triton import error_response, input_or_none, pb_utils, tensor

MAX_NEW_TOKENS_LIMIT = 4096


class Cancelled(Exception):
    """The client went away; stop generating."""


class _Tap:
    """Wraps a backend: after the prefill's decode, every (1, 1) `embed` call is a generated token."""

    def __init__(self, backend, on_token):
        self._backend, self._on_token, self._prefilled = backend, on_token, False

    def embed(self, ids: np.ndarray) -> np.ndarray:
        if self._prefilled and ids.shape == (1, 1):
            self._on_token(int(ids[0, 0]))
        return self._backend.embed(ids)

    def decode(self, feed: dict):
        out = self._backend.decode(feed)
        self._prefilled = True
        return out

    def __getattr__(self, name: str):
        return getattr(self._backend, name)


class _TokenStream:
    """Sends one response per token: the token id and the text it adds (held back while the bytes
    so far end mid-character)."""

    def __init__(self, runtime: Runtime, request, dtypes: dict, modality: str):
        self.rt, self.request, self.dtypes = runtime, request, dtypes
        self.names = [field_tensor(modality, n) for n in GENERATED]  # `code.text_output`, ...
        self.sender = request.get_response_sender()
        self.tokens: list[int] = []
        self.sent = ""

    def _send(self, text: str, tokens: list[int], final: bool) -> None:
        pb = pb_utils()
        d = self.dtypes
        text_out, tokens_out, final_out = self.names
        resp = pb.InferenceResponse([tensor(text_out, np.array([text], dtype=object), d[text_out]),
                                     tensor(tokens_out, np.asarray(tokens), d[tokens_out]),
                                     tensor(final_out, np.array([final]), d[final_out])])
        self.sender.send(resp, flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0)

    def token(self, tok: int) -> None:
        if getattr(self.request, "is_cancelled", lambda: False)():
            raise Cancelled()
        self.tokens.append(tok)
        with self.rt._tok_lock:
            text = self.rt.tokenizer.decode(self.tokens, skip_special_tokens=True)
        piece = ""
        if not text.endswith("\ufffd") and text.startswith(self.sent):
            piece, self.sent = text[len(self.sent):], text
        self._send(piece, [tok], False)

    def finish(self, p: Prediction) -> None:
        for tok in p.tokens[len(self.tokens):]:
            self.token(tok)
        self._send(p.text, p.tokens, True)

    def fail(self, err: BaseException) -> None:
        pb = pb_utils()
        if isinstance(err, Cancelled):
            self.sender.send(flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        else:
            self.sender.send(error_response(err), flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.ctx = EntryContext.load(args, generation=True)
        self.default_new_tokens = int(self.ctx.params["max_new_tokens"])
        self.pool = ThreadPoolExecutor(max_workers=int(self.ctx.params["max_generation_threads"]),
                                       thread_name_prefix="allspark-stream")

    def execute(self, requests: list) -> None:
        for r in requests:
            self.pool.submit(self._serve, r)

    def _serve(self, request) -> None:
        stream = None
        try:
            modality = self.ctx.modality_of(request)
            stream = _TokenStream(self.ctx.runtime, request, self.ctx.out_dtypes, modality)
            row = self.ctx.read(request)[0]
            rt = copy.copy(self.ctx.runtime)  # shares sessions, tokenizer and its lock
            rt.backend = _Tap(self.ctx.runtime.backend, stream.token)
            p = rt.predict(row.modality, row.inputs, row.prompt, GenerationConfig(max_new_tokens=self._max_new(request)))
            stream.finish(p)
        except Exception as e:  # one stream's failure is its own: error response, final flag
            if stream is not None:
                stream.fail(e)
            else:
                pb = pb_utils()
                request.get_response_sender().send(error_response(e), flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _max_new(self, request) -> int:
        x = input_or_none(request, "max_new_tokens")
        if x is None:
            return self.default_new_tokens
        n = int(np.asarray(x).reshape(-1)[0])
        if not 1 <= n <= MAX_NEW_TOKENS_LIMIT:
            raise InputError("/".join(self.ctx.fields), "max_new_tokens", f"1..{MAX_NEW_TOKENS_LIMIT}", str(n))
        return n

    def finalize(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
