"""One exported graph as a python-backend model running onnxruntime (the repository's CPU target).

`initialize` checks the graph's sha256 against the build's manifest (a repository file edited or
swapped after it was written is refused). `execute` gets every request the dynamic batcher queued.
Requests are read one by one and checked against the manifest's contract (finite floats; token ids,
positions, adapter ids and masks within their ranges) — a request that fails is answered alone with
an INVALID_ARG error naming the tensor — then combined per `allspark.serving.batching` (shape groups,
or one padded call for the decoder), run once per group with the union of the outputs they asked
for, and split back. Output dtypes come from the model config.
"""

from __future__ import annotations

import json
from pathlib import Path

from ...contract.integrity import BuildIntegrityError, cached_sha256
from ...contract.tensors import TensorSpec, check_values
from ...errors import InputError
from ...onnxrt import arena_shrinking_run_options, input_dtypes, session
from .. import batching
from .triton import error_response, output_dtypes, parameters, pb_utils, tensor


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        cfg = json.loads(args["model_config"])
        p = parameters(cfg)
        version = Path(args["model_repository"]) / args["model_version"]
        manifest_dims = json.loads(p["dims"])
        self.name, self.dims = p["component"], manifest_dims
        self.ragged = batching.is_ragged(manifest_dims)
        self.inputs = [t["name"] for t in cfg["input"]]
        self.out_dtypes = output_dtypes(cfg)
        self.contract = [TensorSpec.from_json(t) for t in json.loads(p["inputs"])]
        graph = version / p["onnx_file"]
        if "sha256" in p and cached_sha256(graph) != p["sha256"]:
            raise BuildIntegrityError(self.name, p["onnx_file"], "sha256 does not match the build it was written from")
        # many stubs share the cores: idle intra-op threads must not spin
        self.session = session(graph, threads=int(p.get("threads", "0")), spin=False,
                               providers=json.loads(p.get("providers", "[]")) or None)
        self.run_options = arena_shrinking_run_options()  # a large batch must not leave the stub at its peak
        # the wire carries the manifest's dtypes (float32); an fp16 graph takes its floats as fp16
        self.graph_types = input_dtypes(self.session)

    def execute(self, requests: list) -> list:
        pb = pb_utils()
        responses: list = [None] * len(requests)
        feeds, wanted, index = [], [], []
        for i, r in enumerate(requests):
            try:
                feed = {n: pb.get_input_tensor_by_name(r, n).as_numpy() for n in self.inputs}
                for t in self.contract:
                    if (problem := check_values(t, feed[t.name])) is not None:
                        raise InputError(self.name, t.name, *problem)
                if self.ragged:
                    batching.ragged_sizes(feed, self.dims)  # a malformed request fails here, alone
                feeds.append(feed)
                wanted.append(sorted(r.requested_output_names()) or list(self.out_dtypes))
                index.append(i)
            except Exception as e:  # never let one request take the batch down
                responses[i] = error_response(e)
        groups = [list(range(len(feeds)))] if self.ragged and feeds else batching.group_by_shape(feeds)
        for g in groups:
            try:
                outs = self._run([feeds[j] for j in g], sorted({o for j in g for o in wanted[j]}))
                for j, out in zip(g, outs):
                    responses[index[j]] = pb.InferenceResponse(
                        [tensor(o, out[o], self.out_dtypes[o]) for o in wanted[j]])
            except Exception as e:
                for j in g:
                    responses[index[j]] = error_response(e)
        return responses

    def _call(self, outputs: list[str], feed: dict) -> list:
        feed = {k: v.astype(self.graph_types[k], copy=False) for k, v in feed.items()}
        return self.session.run(outputs, feed, self.run_options)

    def _run(self, feeds: list[dict], outputs: list[str]) -> list[dict]:
        if len(feeds) == 1:  # nothing to merge (most requests at low load)
            return [dict(zip(outputs, self._call(outputs, feeds[0])))]
        if self.ragged:
            merged, layout = batching.merge_ragged(feeds, self.dims)
        else:
            merged, sizes = batching.concat(feeds)
        result = dict(zip(outputs, self._call(outputs, merged)))
        if self.ragged:
            return batching.split_ragged(result, layout, self.dims)
        return batching.split(result, sizes)
