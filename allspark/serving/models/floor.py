"""`allspark_floor`: a python model that does nothing, for `allspark bench serve` to measure the cost
of the serving path itself. Decoupled like `allspark_runtime`, it takes a generation request's
tensors and parameters and answers each with a final response of a generation's outputs (text,
token ids, final flag), sent from another thread as the scheduler's responses are: so a round trip
to it is what Triton, the python backend's IPC and the gRPC client cost a request before any of our
code runs, on this machine."""

from __future__ import annotations

import logging
import queue
import threading

import numpy as np

from ..model_config import GENERATED
from .triton import pb_utils

TOKENS = 16  # a 16-token generation's worth of ids in the final response
log = logging.getLogger(__name__)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._answer, name="allspark-floor", daemon=True)
        self.thread.start()

    def execute(self, requests: list) -> None:
        for r in requests:
            self.jobs.put(r)

    def _answer(self) -> None:
        pb = pb_utils()
        text, tokens, final = GENERATED
        while True:
            r = self.jobs.get()
            if r is None:
                return
            try:
                resp = pb.InferenceResponse([pb.Tensor(text, np.array([b"floor"], dtype=np.object_)),
                                             pb.Tensor(tokens, np.zeros(TOKENS, np.int64)),
                                             pb.Tensor(final, np.array([True]))])
                r.get_response_sender().send(resp, flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            except Exception as e:  # the client is gone: the next request is still answered
                log.debug("allspark_floor: could not answer: %s", e)
            finally:
                r = resp = None  # Triton counts a request in flight while its python object lives

    def finalize(self) -> None:
        self.jobs.put(None)
        self.thread.join(5)
