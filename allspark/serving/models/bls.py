"""The in-process `Runtime`'s backend, with each of its five calls a BLS request to a component model.

    encode/bridge/head(component, x) -> that component's model (the manifest's routes name them)
    embed(ids)  -> "embed_tokens"        decode(feed) -> "decoder" (shared by every modality)

An entry model builds `Runtime(manifest, BlsBackend(...), tokenizer, ...)`, so validation,
preprocessing, prompt building, left padding, generation and postprocessing are the runtime's own
code, and only the graph calls travel through Triton (where the dynamic batcher merges them with
other entries' calls). Inputs are sent in the manifest's dtypes (on the GPU target the repository's
copy names the graphs' own: `repository.with_graph_dtypes`); a per-row scalar (manifest dims
[batch]) goes as [batch, 1], the config's reshape to [].
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from ...contract.manifest import decoder_cache
from ...contract.tensors import (
    DECODER_COMPONENT,
    EMBED_COMPONENT,
    INPUT_IDS,
    LAST_HIDDEN_STATE,
    LOGITS,
)
from ...errors import BackendError
from ...runtime.backend import DecoderOutput
from .triton import pb_utils


class BlsBackend:
    name = "triton-bls"

    def __init__(self, manifest: dict, decoder_outputs: Sequence[str], embed_cache: int = 256, timeout_us: int = 0,
                 token_cache: int = 2048):
        """`decoder_outputs`: what the caller needs from the decoder (a head entry needs only the
        last hidden state, not (B, T, vocab) logits nor the cache). `timeout_us` (0: none): a call
        still queued at a component after that long fails (its queue policy rejects it), so a stuck
        component fails its requests instead of blocking every modality behind it."""
        self.pb = pb_utils()
        self.timeout = {"timeout": timeout_us} if timeout_us else {}
        comps = manifest["components"]
        self.inputs = {n: [(t["name"], np.dtype(t["dtype"]), t["dims"] == ["batch"]) for t in c["inputs"]]
                       for n, c in comps.items()}
        self.outputs = {n: [t["name"] for t in c["outputs"]] for n, c in comps.items()}
        unknown = set(decoder_outputs) - set(self.outputs[DECODER_COMPONENT])
        if unknown:
            raise BackendError(f"decoder: no outputs {sorted(unknown)}; it has {self.outputs[DECODER_COMPONENT]}")
        self.decoder_outputs = [o for o in self.outputs[DECODER_COMPONENT] if o in decoder_outputs]
        self.cache = decoder_cache(manifest)
        # Prompt rows repeat (a modality's default prompt): their embeddings are kept, keyed by the
        # row's ids, which saves the embed_tokens hop. A Gather's rows depend on their ids only.
        self._embed_cache: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._embed_cache_size = embed_cache
        # The generation loop embeds one token per row per step: a hop to embed_tokens each step
        # (a third of a 16-token demo stream's time in this layout). Generated tokens' rows are kept
        # apart, so they never evict prompts (paper size: 2048 rows of 4096 float32, 32 MB).
        self._tokens: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._tokens_size = token_cache
        self._lock = threading.Lock()
        # GPU target: onnxruntime models answer in device memory unless asked for host memory,
        # where the runtime's numpy code wants them
        self._cpu_outputs = ({"preferred_memory": self.pb.PreferredMemory(self.pb.TRITONSERVER_MEMORY_CPU, 0)}
                             if hasattr(self.pb, "PreferredMemory") else {})

    def call(self, model: str, feed: dict[str, np.ndarray], outputs: Sequence[str],
             native: Sequence[str] = ()) -> list[np.ndarray]:
        """`outputs` of `model` for `feed`, as host arrays; fp16 ones as fp32 but those named in
        `native` (the KV cache, which only goes back into the decoder: on the GPU target, an fp16
        graph's, cast to fp32 and back every step, as the host plane once did)."""
        pb = self.pb
        tensors = []
        for name, dtype, scalar in self.inputs[model]:
            x = np.ascontiguousarray(feed[name], dtype=dtype)
            tensors.append(pb.Tensor(name, x.reshape(-1, 1) if scalar else x))
        resp = pb.InferenceRequest(model_name=model, inputs=tensors, requested_output_names=list(outputs),
                                   **self.timeout, **self._cpu_outputs).exec()
        if resp.has_error():
            raise BackendError(f"{model}: {resp.error().message()}")
        # copy out of the response's shared memory, which is released with the response; fp16
        # graphs' outputs become fp32 here unless `native` (the cache; a prefill's logits, cast after slicing)
        out = []
        for o in outputs:
            y = pb.get_output_tensor_by_name(resp, o).as_numpy()
            out.append(y.astype(np.float32) if y.dtype == np.float16 and o not in native else np.array(y))
        return out

    def _one(self, model: str, feed: dict[str, np.ndarray]) -> np.ndarray:
        return self.call(model, feed, self.outputs[model][:1])[0]

    def encode(self, component: str, tensors: dict[str, np.ndarray]) -> np.ndarray:
        return self._one(component, tensors)

    def bridge(self, component: str, media: np.ndarray) -> np.ndarray:
        return self._one(component, {self.inputs[component][0][0]: media})

    def head(self, component: str, hidden: np.ndarray) -> np.ndarray:
        return self._one(component, {self.inputs[component][0][0]: hidden})

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        cache, size = ((self._tokens, self._tokens_size) if input_ids.shape[1] == 1
                       else (self._embed_cache, self._embed_cache_size))
        keys = [row.tobytes() for row in input_ids]
        with self._lock:
            rows = [cache.get(k) for k in keys]
        missing = [i for i, r in enumerate(rows) if r is None]
        if missing:
            got = self._one(EMBED_COMPONENT, {INPUT_IDS: input_ids[missing]})
            with self._lock:
                for i, e in zip(missing, got):
                    rows[i] = cache[keys[i]] = e.copy()  # (a view would keep the whole answer alive)
                    cache.move_to_end(keys[i])
                while len(cache) > size:
                    cache.popitem(last=False)
        return np.stack(rows)

    def decode(self, feed: dict[str, np.ndarray], last: bool = False) -> DecoderOutput:
        """Like `OrtBackend.decode`; what was not asked for is None (logits) or [] (the cache)."""
        native = [*self.cache.present, *((LOGITS, LAST_HIDDEN_STATE) if last else ())]  # last: sliced, then cast
        got = dict(zip(self.decoder_outputs, self.call(DECODER_COMPONENT, feed, self.decoder_outputs, native=native)))
        logits, hidden = got.get(LOGITS), got.get(LAST_HIDDEN_STATE)
        if last:
            logits, hidden = (None if x is None else x[:, -1:].astype(np.float32) for x in (logits, hidden))
        return DecoderOutput(logits, hidden, [got[n] for n in self.cache.present if n in got])
