"""The `tensorrt` backend: a build's TensorRT engines (`allspark trt-engines`), one execution context
per optimization profile, run on torch CUDA tensors (`set_tensor_address` on their memory,
`execute_async_v3` on torch's current stream). The decoder picks its prefill profile for an empty
past and its decode profile otherwise. A lock per context: contexts are not thread-safe.

Needs TensorRT and a CUDA GPU; both are checked at load with a clear error. Untested here: no
machine this project runs on has TensorRT (see docs/benchmarks/gpu/).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..contract.integrity import artifact_paths
from ..contract.manifest import artifact, decoder_cache
from ..contract.tensors import (
    DECODER_COMPONENT,
    EMBED_COMPONENT,
    INPUT_IDS,
    LAST_HIDDEN_STATE,
    LOGITS,
    TENSORRT,
)
from ..errors import BackendError
from .backend import DecoderOutput


class TrtBackend:
    name = "tensorrt"

    def __init__(self, manifest: dict, engines: dict[str, Any], trt: Any, torch: Any, device: int = 0):
        self.manifest, self.engines, self.trt, self.torch = manifest, engines, trt, torch
        self.device = torch.device("cuda", device)
        self.cache = decoder_cache(manifest)
        self.contexts: dict[str, list[tuple[Any, threading.Lock]]] = {}
        stream = torch.cuda.current_stream().cuda_stream
        for name, engine in engines.items():
            ctxs = []
            for i in range(engine.num_optimization_profiles):
                ctx = engine.create_execution_context()
                ctx.set_optimization_profile_async(i, stream)
                ctxs.append((ctx, threading.Lock()))
            self.contexts[name] = ctxs
        torch.cuda.synchronize()
        self.inputs = {n: [t["name"] for t in manifest["components"][n]["inputs"]] for n in engines}
        self.outputs = {n: [t["name"] for t in manifest["components"][n]["outputs"]] for n in engines}

    @classmethod
    def load(cls, build: Path, manifest: dict, device: int = 0) -> "TrtBackend":
        from ..export.tensorrt_engines import import_tensorrt

        trt = import_tensorrt()
        import torch

        if not torch.cuda.is_available():
            raise BackendError("the tensorrt backend needs a CUDA GPU; this torch sees none")
        torch.cuda.set_device(device)  # the contexts are made on it; every call names it too
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engines = {}
        for name, comp in manifest["components"].items():
            try:
                art = artifact(comp, TENSORRT.name, name)
            except Exception:
                raise BackendError(f"component {name!r} has no TensorRT engine; run `allspark trt-engines "
                                   f"{build}` on this machine first") from None
            engine = runtime.deserialize_cuda_engine(artifact_paths(build, name, art, TENSORRT.name).main.read_bytes())
            if engine is None:
                raise BackendError(f"{name}: TensorRT cannot load {art['file']} (built by TensorRT "
                                   f"{art.get('tensorrt')} on {art.get('device')}; engines are specific to both)")
            engines[name] = engine
        return cls(manifest, engines, trt, torch, device)

    def _torch_dtype(self, engine: Any, name: str) -> Any:
        t, trt = self.torch, self.trt
        return {trt.float32: t.float32, trt.float16: t.float16, trt.bfloat16: t.bfloat16, trt.int64: t.int64,
                trt.int32: t.int32, trt.bool: t.bool}[engine.get_tensor_dtype(name)]

    def _run(self, component: str, feed: Mapping[str, np.ndarray], profile: int = 0,
             last: Sequence[str] = ()) -> dict[str, np.ndarray]:
        """`last`: outputs of which only the last position (axis 1) comes back."""
        torch = self.torch
        engine = self.engines[component]
        ctx, lock = self.contexts[component][profile]
        with lock:
            keep = []
            for name in self.inputs[component]:
                t = torch.from_numpy(np.ascontiguousarray(feed[name])).to(self.device, self._torch_dtype(engine, name))
                keep.append(t)
                if not ctx.set_input_shape(name, tuple(t.shape)):
                    raise BackendError(f"{component}: input {name} of shape {tuple(t.shape)} is outside the engine's "
                                       f"optimization profile {profile} (rebuild with --profile to widen it)")
                ctx.set_tensor_address(name, t.data_ptr())
            outs = {}
            for name in self.outputs[component]:
                shape = tuple(ctx.get_tensor_shape(name))
                outs[name] = torch.empty(shape, dtype=self._torch_dtype(engine, name), device=self.device)
                ctx.set_tensor_address(name, outs[name].data_ptr())
            if not ctx.execute_async_v3(torch.cuda.current_stream().cuda_stream):
                raise BackendError(f"{component}: TensorRT execution failed")
            torch.cuda.current_stream().synchronize()
        for k in last:  # sliced on the device, before the cast and the copy to the host
            outs[k] = outs[k][:, -1:].contiguous()
        return {k: v.float().cpu().numpy() if v.is_floating_point() else v.cpu().numpy() for k, v in outs.items()}

    def _one(self, component: str, feed: Mapping[str, np.ndarray]) -> np.ndarray:
        return next(iter(self._run(component, feed).values()))

    def encode(self, component: str, tensors: Mapping[str, np.ndarray]) -> np.ndarray:
        return self._one(component, tensors)

    def bridge(self, component: str, media: np.ndarray) -> np.ndarray:
        return self._one(component, {self.inputs[component][0]: media})

    def head(self, component: str, hidden: np.ndarray) -> np.ndarray:
        return self._one(component, {self.inputs[component][0]: hidden})

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        return self._one(EMBED_COMPONENT, {INPUT_IDS: input_ids})

    def decode(self, feed: Mapping[str, np.ndarray], last: bool = False) -> DecoderOutput:
        past_len = feed[self.cache.past[0]].shape[2]
        profiles = len(self.contexts[DECODER_COMPONENT])
        profile = 0 if past_len == 0 or profiles == 1 else 1  # trt_profiles: 0 prefill, 1 decode
        got = self._run(DECODER_COMPONENT, feed, profile, last=(LOGITS, LAST_HIDDEN_STATE) if last else ())
        return DecoderOutput(got[LOGITS], got[LAST_HIDDEN_STATE], [got[n] for n in self.cache.present])
