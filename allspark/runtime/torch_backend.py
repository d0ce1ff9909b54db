"""The `torch` backend: the PyTorch reference modules of the checkpoint a build came from, run
through the same wrappers the export traced. Safe to call from many threads: the modules are only
read, under `no_grad`.

On a GPU (`device="cuda"`) the request is device-resident (`allspark.runtime.decoding`): encoder,
bridge and token-embedding outputs reach the decoder as CUDA tensors, the prefill's cache stays in
CUDA memory, generation runs on a static cache written in place, and each
decode step is one CUDA graph replay (`cuda_graphs=True`, captured once per batch size and max
length and reused). With CUDA graphs the request's stages are graphs too (encoder, bridge, and a
prefill through the static decoder; one per input signature, `stage_graphs` kept:
`allspark.runtime.stage_graphs`).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..contract.manifest import decoder_cache
from ..contract.tensors import DECODER_INPUTS
from ..errors import BackendError
from ..memory import check
from .backend import DecoderOutput
from .decoding import CachePool, SlotState, StaticCache, start_static
from .memory_plan import checkpoint_need
from .stage_graphs import StageGraphs, bucketed

DTYPES = ("float32", "float16", "bfloat16")


class TorchBackend:
    name = "torch"

    def __init__(self, manifest: dict, model: Any, device: str = "cpu", compile: bool = False,
                 dtype: str = "float32", cuda_graphs: bool | None = None, device_resident: bool | None = None,
                 stage_graphs: int = 16):
        import torch

        from ..model.adapters import for_cuda_graphs
        from ..model.decoder import DecoderModule, StaticDecoderModule

        if dtype not in DTYPES:
            raise BackendError(f"torch backend: dtype expected one of {list(DTYPES)}, got {dtype!r}")
        self.torch = torch
        try:
            self.device = torch.device(device)
        except RuntimeError as e:
            raise BackendError(f"torch backend: device {device!r}: {e}") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise BackendError("torch backend: device 'cuda' asked for, but this torch sees no CUDA GPU")
        self.dtype = getattr(torch, dtype)
        self.model = model.to(self.device, self.dtype).requires_grad_(False)
        self.decoder = DecoderModule(self.model)
        self.static_decoder = StaticDecoderModule(self.model, inplace=True)
        self.compile = compile
        self._compiled: dict[int, Any] = {}
        self.cache = decoder_cache(manifest)
        self.modality_of = {n: c.get("modality") for n, c in manifest["components"].items()}
        on_gpu = self.device.type == "cuda"
        # device-resident decoding: default on a GPU; on CPU it only saves copies between host arrays
        self.device_resident = on_gpu if device_resident is None else device_resident
        self.cuda_graphs = on_gpu if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and not on_gpu:
            raise BackendError("torch backend: cuda_graphs needs device='cuda'")
        llm = self.model.config.llm
        self._kv = (llm.num_kv_heads, llm.head_dim)
        self._pool = CachePool(self._workspace)
        self._capture_lock = threading.Lock()  # one capture at a time
        if not (isinstance(stage_graphs, int) and stage_graphs >= 0):
            raise BackendError(f"torch backend: stage_graphs expected an integer >= 0, got {stage_graphs!r}")
        # with CUDA graphs, the request's stages (encoder, bridge, prefill) are graphs too: at most
        # `stage_graphs` input signatures kept (allspark.runtime.stage_graphs); 0: those stay eager
        self.stages = (StageGraphs(torch, stage_graphs, self._capture_lock, warmup=for_cuda_graphs)
                       if self.cuda_graphs and stage_graphs and not compile else None)

    @classmethod
    def load(cls, build: Path, manifest: dict, checkpoint: str | Path | None = None, device: str = "cpu",
             compile: bool = False, dtype: str = "float32", cuda_graphs: bool | None = None,
             device_resident: bool | None = None, stage_graphs: int = 16) -> "TorchBackend":
        from ..model.checkpoint import load_checkpoint

        ckpt = Path(checkpoint or manifest["provenance"]["checkpoint"])
        if not (ckpt / "manifest.json").is_file():
            raise BackendError(f"the torch backend needs the checkpoint the build came from; "
                               f"not found at {ckpt} (pass checkpoint=...)")
        if device == "cpu":
            check(checkpoint_need(ckpt, manifest["modalities"], f"loading {ckpt} on the torch backend"))
        return cls(manifest, load_checkpoint(ckpt, manifest["modalities"]), device, compile, dtype, cuda_graphs,
                   device_resident, stage_graphs)

    def _fn(self, module):
        """The module itself, or its torch.compile'd version (dynamic shapes), made once."""
        if not self.compile:
            return module
        key = id(module)
        if key not in self._compiled:
            self._compiled[key] = self.torch.compile(module, dynamic=True)
        return self._compiled[key]

    def _pack(self, component: str):
        return self.model.pack(self.modality_of[component])

    def _t(self, x: Any):
        """A host array, or a tensor already on the device (`DeviceStages` outputs), as this backend's."""
        t = x if isinstance(x, self.torch.Tensor) else self.torch.from_numpy(np.ascontiguousarray(x))
        t = t.to(self.device)
        return t.to(self.dtype) if t.is_floating_point() else t

    def _np(self, t) -> np.ndarray:
        return t.detach().float().cpu().numpy()

    def encode(self, component: str, tensors: Mapping[str, np.ndarray]) -> np.ndarray:
        return self._np(self.encode_on_device(component, tensors))

    def bridge(self, component: str, media: np.ndarray) -> np.ndarray:
        return self._np(self.bridge_on_device(component, media))

    def head(self, component: str, hidden: np.ndarray) -> np.ndarray:
        with self.torch.no_grad():
            return self._np(self._fn(self._pack(component).head)(self._t(hidden)))

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        return self._np(self.embed_on_device(input_ids))

    # ---- stage outputs kept on the device (allspark.runtime.decoding.DeviceStages) -------------
    def encode_on_device(self, component: str, tensors: Mapping[str, np.ndarray]):
        encoder, names = self._pack(component).encoder, sorted(tensors)
        inputs = [self._t(tensors[k]) for k in names]
        if self.stages is not None:
            return self.stages.run(component, lambda *x: (encoder(**dict(zip(names, x))),), inputs)[0]
        with self.torch.no_grad():
            return self._fn(encoder)(**dict(zip(names, inputs)))

    def bridge_on_device(self, component: str, media: Any):
        bridge = self._pack(component).bridge
        if self.stages is not None:
            return self.stages.run(component, lambda x: (bridge(x),), [self._t(media)])[0]
        with self.torch.no_grad():
            return self._fn(bridge)(self._t(media))

    def embed_on_device(self, input_ids: np.ndarray):
        with self.torch.no_grad():
            return self.model.embed(self._t(input_ids))

    def _decode(self, feed: Mapping[str, np.ndarray]) -> tuple:
        past = [self._t(feed[k]) for k in self.cache.past]
        with self.torch.no_grad():
            return self._fn(self.decoder)(*(self._t(feed[n]) for n in DECODER_INPUTS), past)

    def decode(self, feed: Mapping[str, np.ndarray], last: bool = False) -> DecoderOutput:
        outs = self._decode(feed)
        # (contiguous: a copy, so the full answer is not kept alive by a view)
        logits, hidden = (outs[0][:, -1:].contiguous(), outs[1][:, -1:].contiguous()) if last else outs[:2]
        return DecoderOutput(self._np(logits), self._np(hidden), [self._np(o) for o in outs[2:]])

    # ---- device-resident decoding (allspark.runtime.decoding.DeviceDecoding) -------------------
    def prefill_on_device(self, feed: Mapping[str, np.ndarray]) -> DecoderOutput:
        if self.stages is not None and all(feed[k].shape[2] == 0 for k in self.cache.past):
            inputs = [self._t(feed[n]) for n in DECODER_INPUTS]
            T = inputs[1].shape[1]
            pad = bucketed(T) - T  # more left padding: prompts of nearby lengths share one graph
            outs = self.stages.run("prefill", self._static_prefill, _left_padded(self.torch, inputs, pad))
            return DecoderOutput(self._np(outs[0]), self._np(outs[1]), [o[:, :, pad:] for o in outs[2:]])
        outs = self._decode(feed)
        return DecoderOutput(self._np(outs[0][:, -1:]), self._np(outs[1][:, -1:]), list(outs[2:]))

    def _static_prefill(self, inputs_embeds, attention_mask, position_ids, adapter_ids) -> tuple:
        """The prefill as the static decoder runs it (its mask needs no host, so a graph captures
        it): empty buffers of the prompt's length, written at every position; the last position's
        logits and hidden state, and the cache."""
        torch = self.torch
        B, T = attention_mask.shape
        kv = [torch.zeros(B, *self._kv[:1], T, self._kv[1], dtype=self.dtype, device=self.device)
              for _ in self.cache.past]
        pos = torch.arange(T, device=self.device)
        h, present = self.static_decoder.hidden(inputs_embeds, attention_mask, position_ids, adapter_ids, pos, kv)
        h = h[:, -1:]  # the head at the last position only: (B, T, vocab) logits would live in the graph's pool
        return (self.model.llm.lm_head(h), h, *present)

    def start_generation(self, cache: list[Any], rows: np.ndarray, mask: np.ndarray, pos: np.ndarray,
                         adapter_ids: np.ndarray, max_len: int, limit: int | None = None) -> SlotState:
        return start_static(self._pool, cache, rows, mask, pos, adapter_ids, max_len, limit)

    def _workspace(self, batch: int, max_len: int) -> "_TorchWorkspace":
        cache = StaticCache(self.torch, batch, max_len, self._kv, len(self.cache.past), self.dtype, self.device)
        return _TorchWorkspace(self, cache)


def _left_padded(torch: Any, inputs: list, pad: int) -> list:
    """The decoder's (inputs_embeds, attention_mask, position_ids, adapter_ids) with `pad` more
    masked positions on the left (the static decoder's mask keeps real tokens from seeing them)."""
    if not pad:
        return inputs
    emb, mask, pos, ids = inputs
    B = mask.shape[0]
    return [torch.cat([emb.new_zeros(B, pad, emb.shape[2]), emb], 1), torch.cat([mask.new_zeros(B, pad), mask], 1),
            torch.cat([pos.new_zeros(B, pad), pos], 1), ids]


class _TorchWorkspace:
    """A static cache and, with CUDA graphs, the decode step captured on its buffers."""

    def __init__(self, backend: TorchBackend, cache: StaticCache):
        self.b, self.cache = backend, cache
        self.graph = None
        self.logits = None

    def _forward(self):
        c, b = self.cache, self.b
        emb = b.model.embed(c.tokens)
        return b._fn(b.static_decoder)(emb, c.mask, c.pos, c.ids, c.cache_position, c.kv)[0][:, -1]

    def run(self):
        torch = self.b.torch
        if not self.b.cuda_graphs:
            with torch.no_grad():
                return self._forward()
        if self.graph is None:
            # warm-up on a side stream, as torch.cuda.graphs asks; every run writes the same slot with
            # the same values, so the warm-up runs are this step's result too. "thread_local": other
            # threads' CUDA calls during the capture (their own decode steps, copies) stay legal
            from ..model.adapters import for_cuda_graphs

            with self.b._capture_lock, for_cuda_graphs():
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side), torch.no_grad():
                    for _ in range(2):
                        self._forward()
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.no_grad(), torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    self.logits = self._forward()
                self.graph = graph
        self.graph.replay()
        return self.logits
