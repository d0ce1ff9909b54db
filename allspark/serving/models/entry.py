"""`allspark_entry`: the python model behind every single-pass modality's ensemble (`rgb`, `table`, ...).

    execute(requests)                       every request the dynamic batcher queued, B rows each,
                                            of any single-pass modality
      -> EntryContext.read                  one Runtime Request per row; unreadable requests fail alone
      -> Runtime.predict_batch (BLS)        validate, preprocess, encoder, bridge, prompt, decoder, head
      -> <m>.label + <m>.scores | <m>.values  per row, in the config's output dtypes

The pipeline is the in-process runtime's own code; only its graph calls are BLS requests, so answers
match `Runtime.predict`. A row with bad input gets its typed `InputError` as its request's error; an
unexpected failure of the whole batch is retried request by request so it, too, fails only its own.
"""

from __future__ import annotations

import numpy as np

from ...errors import AllSparkError
from ...runtime import Prediction, Request
from .requests import EntryContext
from .triton import check_deadline, error_response, pb_utils, tensor


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.answer = SinglePass(EntryContext.load(args, generation=False))

    def execute(self, requests: list) -> list:
        return self.answer(requests)


class SinglePass:
    """Answers a list of single-pass requests (any modalities) with one `predict_batch`: the
    components layout's `allspark_entry`, and the single-pass workers of `allspark_runtime`."""

    def __init__(self, ctx: EntryContext, tagged_errors: bool = False):
        self.ctx = ctx
        self.tagged = tagged_errors  # answers that go back through BLS (allspark_runtime -> forwarder)
        self.labels = {m: list(ctx.runtime.config.modality(m).labels) for m in ctx.fields}

    def __call__(self, requests: list) -> list:
        """One response per request, in order; a request's failure is its own."""
        responses: list = [None] * len(requests)
        rows: list[Request] = []
        owner: list[int] = []
        for i, r in enumerate(requests):
            try:
                check_deadline(r, self.ctx.modality_of(r))  # queued past it: not worth running
                got = self.ctx.read(r)
                rows += got
                owner += [i] * len(got)
            except Exception as e:
                responses[i] = error_response(e, r, self.tagged)
        results = self._predict(rows, owner)
        for i in sorted(set(owner)):
            mine = [res for res, o in zip(results, owner) if o == i]
            err = next((x for x in mine if isinstance(x, BaseException)), None)
            try:
                responses[i] = error_response(err, requests[i], self.tagged) if err is not None else self._response(mine)
            except Exception as e:
                responses[i] = error_response(e, requests[i], self.tagged)
        return responses

    def _predict(self, rows: list[Request], owner: list[int]) -> list[Prediction | BaseException]:
        if not rows:
            return []
        try:
            return self.ctx.runtime.predict_batch(rows)
        except Exception as e:
            if len(set(owner)) == 1:
                return [e] * len(rows)
        out: list[Prediction | BaseException] = []
        for i in dict.fromkeys(owner):  # isolate the request that broke the batch
            mine = [r for r, o in zip(rows, owner) if o == i]
            try:
                out += self.ctx.runtime.predict_batch(mine)
            except Exception as e:
                out += [e] * len(mine)
        return out

    def _response(self, preds: list[Prediction]):
        """The modality's outputs (`rgb.label`, `rgb.scores` | `table.values`), rows stacked."""
        m = preds[0].modality
        answers = {"label": lambda: np.array([[p.label] for p in preds], dtype=object),
                   "scores": lambda: np.array([[p.scores[k] for k in self.labels[m]] for p in preds]),
                   "values": lambda: np.stack([np.asarray(p.values) for p in preds])}
        out = [tensor(f"{m}.{k}", make(), self.ctx.out_dtypes[f"{m}.{k}"])
               for k, make in answers.items() if f"{m}.{k}" in self.ctx.out_dtypes]
        if not out:
            raise AllSparkError(f"{m}: the config declares none of {m}.label, {m}.scores, {m}.values")
        return pb_utils().InferenceResponse(out)
