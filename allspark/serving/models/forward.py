"""`allspark_entry` in the runtime layout: the single-pass modalities' ensembles step here, and each
request goes on, as it came, to `allspark_runtime` (BLS), whose one answer comes back as this
model's response. It holds no weights and imports no runtime, so its instances cost a python stub
each (no copy of the build); it exists because `allspark_runtime` is decoupled (generation streams)
and Triton's HTTP and unary gRPC infer refuse decoupled models.

All requests of a batch are forwarded at once (async BLS), so `allspark_runtime` sees them queued
together and answers them in one `predict_batch`.
"""

from __future__ import annotations

import asyncio
import json

from ...errors import AllSparkError
from .triton import error_response, parameters, pb_utils, request_id, untag


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.target = parameters(json.loads(args["model_config"]))["forward_to"]

    async def execute(self, requests: list) -> list:
        return list(await asyncio.gather(*(self._forward(r) for r in requests)))

    async def _forward(self, request):
        pb = pb_utils()
        try:
            tensors = [pb.Tensor("prompt", t.as_numpy().reshape(-1)) if t.name() == "prompt" else t
                       for t in request.inputs()]  # the prompt: [rows, 1] here, [rows] there
            raw = request.parameters()
            bls = pb.InferenceRequest(model_name=self.target, inputs=tensors, request_id=request_id(request),
                                      requested_output_names=list(request.requested_output_names()),
                                      parameters=json.loads(raw) if raw else {})
            for resp in await bls.async_exec(decoupled=True):
                if resp.has_error():  # the caller's mistake stays the caller's (INVALID_ARG: HTTP 400)
                    return pb.InferenceResponse(error=untag(resp.error()))
                out = resp.output_tensors()
                if out:
                    return pb.InferenceResponse(output_tensors=out)
            raise AllSparkError(f"{self.target} ended the request without an answer")
        except Exception as e:
            return error_response(e, request)
