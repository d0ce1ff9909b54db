"""The `onnxruntime` backend: a build's exported graphs on ONNX Runtime (CPU, CUDA or TensorRT
execution providers). Safe to call from many threads: ONNX Runtime sessions are.

On a GPU provider the decode loop is device-resident (`device_resident`, default there): the
decoder's outputs are bound onto torch CUDA tensors (IO binding on their data pointers), the
prefill's cache and every step's cache stay in device memory and feed the next step directly, and
only token ids go in and the last position's logits come back. `device_resident=False` keeps the
host round trip (each step's cache copied out and back in), for comparison. The same code runs on
CPU with torch CPU tensors (`device_resident=True` there: the tests' way to check it without a GPU).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..contract.manifest import artifact, decoder_cache
from ..contract.tensors import (
    ADAPTER_IDS,
    ATTENTION_MASK,
    DECODER_COMPONENT,
    EMBED_COMPONENT,
    INPUT_IDS,
    INPUTS_EMBEDS,
    LAST_HIDDEN_STATE,
    LOGITS,
    ONNX,
    ONNX_TO_NUMPY,
    POSITION_IDS,
)
from ..errors import BackendError
from ..onnxrt import PROVIDER_ALIASES, arena_shrinking_run_options, session
from .backend import DecoderOutput


class OrtBackend:
    name = "onnxruntime"

    def __init__(self, build: Path, manifest: dict, sessions: dict[str, Any], shrink_arena: bool = False,
                 device_resident: bool | None = None):
        self.build, self.manifest, self.sessions = build, manifest, sessions
        # A large batch grows ONNX Runtime's CPU arena to its peak, and the arena keeps it; a server
        # asks for the unused part back after every call (`shrink_arena`; the intermediate tensors,
        # not the inputs, make the peak). Off for batch jobs, which would re-allocate every batch.
        self._shrink = arena_shrinking_run_options() if shrink_arena else None
        self.input_types = {n: {i.name: np.dtype(ONNX_TO_NUMPY[i.type]) for i in s.get_inputs()}
                            for n, s in sessions.items()}
        self.outputs = {n: [o.name for o in s.get_outputs()] for n, s in sessions.items()}
        on_gpu = sessions[DECODER_COMPONENT].get_providers()[0] != "CPUExecutionProvider"
        self.use_io_binding = on_gpu
        self.cache = decoder_cache(manifest)
        if device_resident is None:  # by default only where torch can hold the tensors on that device
            device_resident = on_gpu and _torch_sees_cuda()
        elif device_resident and on_gpu and not _torch_sees_cuda():
            raise BackendError("device_resident needs a torch with CUDA (its tensors hold the cache); this torch "
                               "sees no GPU: pass device_resident=False")
        self.device_resident = device_resident
        self._plane = DevicePlane(self, "cuda" if on_gpu else "cpu") if self.device_resident else None

    @classmethod
    def load(cls, build: Path, manifest: dict, providers: Sequence[str] | None = None, threads: int = 0,
             spin: bool = True, shrink_arena: bool = False, device_resident: bool | None = None,
             trt_cache: str | None = None, trt_fp16: bool = True, trt_profile: Sequence[str] = ()) -> "OrtBackend":
        """One session per component; `providers` e.g. ["cuda"] (CPU is always the fallback). With
        "tensorrt" first, each component's TensorRT provider gets its optimization profiles from the
        build's dims (`trt_profile` overrides, "DIM=MIN:OPT:MAX"), fp16, and engine and timing caches
        in `trt_cache` (default: `<build>/trt_cache`), so engines are built once per machine."""
        sessions = {name: session(build / artifact(c, ONNX.name, name)["file"], threads=threads, spin=spin,
                                  providers=_with_trt_options(providers, build, manifest, name, trt_cache, trt_fp16,
                                                              trt_profile))
                    for name, c in manifest["components"].items()}
        return cls(build, manifest, sessions, shrink_arena, device_resident)

    def _run(self, component: str, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        types = self.input_types[component]
        feed = {k: np.asarray(v).astype(types[k], copy=False) for k, v in feed.items()}
        sess = self.sessions[component]
        if self.use_io_binding:
            outs = _run_io_binding(sess, feed)
        elif self._shrink is not None:
            outs = sess.run(None, feed, self._shrink)
        else:
            outs = sess.run(None, feed)
        return [o.astype(np.float32, copy=False) if o.dtype == np.float16 else o for o in outs]

    def _one(self, component: str, feed: Mapping[str, np.ndarray]) -> np.ndarray:
        return self._run(component, feed)[0]

    def encode(self, component: str, tensors: Mapping[str, np.ndarray]) -> np.ndarray:
        return self._one(component, {k: tensors[k] for k in self.input_types[component]})

    def bridge(self, component: str, media: np.ndarray) -> np.ndarray:
        (name,) = self.input_types[component]
        return self._one(component, {name: media})

    def head(self, component: str, hidden: np.ndarray) -> np.ndarray:
        (name,) = self.input_types[component]
        return self._one(component, {name: hidden})

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        return self._one(EMBED_COMPONENT, {INPUT_IDS: input_ids})

    def decode(self, feed: Mapping[str, np.ndarray]) -> DecoderOutput:
        got = dict(zip(self.outputs[DECODER_COMPONENT], self._run(DECODER_COMPONENT, feed)))
        return DecoderOutput(got[LOGITS], got[LAST_HIDDEN_STATE], [got[n] for n in self.cache.present])

    # ---- device-resident decoding (allspark.runtime.decoding.DeviceDecoding) -------------------
    def prefill_on_device(self, feed: Mapping[str, np.ndarray]) -> DecoderOutput:
        return self._device_plane().prefill(feed)

    def start_generation(self, cache: list[Any], rows: np.ndarray, mask: np.ndarray, pos: np.ndarray,
                         adapter_ids: np.ndarray, max_len: int) -> "GrowingDeviceStepper":
        return self._device_plane().start(cache, rows, mask, pos, adapter_ids, max_len)

    def _device_plane(self) -> "DevicePlane":
        if self._plane is None:
            raise BackendError("onnxruntime backend: loaded with device_resident=False")
        return self._plane


def _with_trt_options(providers: Sequence[str] | None, build: Path, manifest: dict, component: str,
                      cache: str | None, fp16: bool, overrides: Sequence[str]) -> list | None:
    """`providers` with the TensorRT provider's options for `component` filled in."""
    def is_trt(p: Any) -> bool:
        return isinstance(p, str) and PROVIDER_ALIASES.get(p.lower(), p) == "TensorrtExecutionProvider"

    if not providers or not any(is_trt(p) for p in providers):
        return list(providers) if providers else None
    from ..export.trt_profiles import (
        ort_trt_provider_options,
        parse_overrides,
        profiles,
    )

    opts = ort_trt_provider_options(profiles(manifest, component, parse_overrides(overrides)),
                                    str(Path(cache) if cache else build / "trt_cache"), fp16)
    return [(p, opts) if is_trt(p) else p for p in providers]


def _run_io_binding(sess, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """GPU providers: bind inputs once and let outputs be allocated on the device, so ONNX Runtime
    copies each tensor once instead of staging through its own buffers. (Not run here: no GPU.)"""
    io = sess.io_binding()
    for k, v in feed.items():
        io.bind_cpu_input(k, np.ascontiguousarray(v))
    for o in sess.get_outputs():
        io.bind_output(o.name, "cuda")
    sess.run_with_iobinding(io)
    return io.copy_outputs_to_cpu()


class DevicePlane:
    """Sessions run over torch tensors on one device through IO binding: inputs and outputs are the
    tensors' own memory, so nothing is staged through host arrays between calls."""

    def __init__(self, backend: OrtBackend, device: str):
        import torch

        self.torch, self.b, self.device_type = torch, backend, device
        self.device = torch.device(device)
        self.numpy_to_torch = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16,
                               np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32}
        self.torch_to_numpy = {v: k.type for k, v in self.numpy_to_torch.items()}
        dec = backend.input_types[DECODER_COMPONENT]
        self.kv_dtype = self.numpy_to_torch[dec[backend.cache.past[0]]]
        shapes = {o.name: o.shape for o in backend.sessions[DECODER_COMPONENT].get_outputs()}
        self.vocab = int(shapes[LOGITS][-1])
        self.hidden = int(shapes[LAST_HIDDEN_STATE][-1])
        kv = shapes[backend.cache.present[0]]
        self.kv_heads, self.head_dim = int(kv[1]), int(kv[3])
        self.out_types = {n: {o.name: self.numpy_to_torch[np.dtype(ONNX_TO_NUMPY[o.type])] for o in s.get_outputs()}
                          for n, s in backend.sessions.items()}

    def tensor(self, x: np.ndarray, component: str, name: str):
        want = self.numpy_to_torch[self.b.input_types[component][name]]
        return self.torch.from_numpy(np.ascontiguousarray(x)).to(self.device, want)

    def run(self, component: str, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> None:
        """`component` reading `inputs` and writing `outputs` (contiguous torch tensors of the
        graph's dtypes and the outputs' exact shapes) in place."""
        sess = self.b.sessions[component]
        io = sess.io_binding()
        for k, t in inputs.items():
            io.bind_input(k, self.device_type, 0, self.torch_to_numpy[t.dtype], list(t.shape), t.data_ptr())
        for k, t in outputs.items():
            io.bind_output(k, self.device_type, 0, self.torch_to_numpy[t.dtype], list(t.shape), t.data_ptr())
        if self.device.type == "cuda":
            self.torch.cuda.current_stream().synchronize()  # torch's writes land before ONNX Runtime reads
        sess.run_with_iobinding(io)  # returns once its outputs are written (ONNX Runtime synchronizes)

    def empty(self, shape: tuple[int, ...], dtype: Any):
        return self.torch.empty(shape, dtype=dtype, device=self.device)

    def decoder_outputs(self, B: int, T: int, total: int) -> dict[str, Any]:
        types = self.out_types[DECODER_COMPONENT]
        outs = {LOGITS: self.empty((B, T, self.vocab), types[LOGITS]),
                LAST_HIDDEN_STATE: self.empty((B, T, self.hidden), types[LAST_HIDDEN_STATE])}
        outs.update({n: self.empty((B, self.kv_heads, total, self.head_dim), types[n]) for n in self.b.cache.present})
        return outs

    def prefill(self, feed: Mapping[str, np.ndarray]) -> DecoderOutput:
        ins = {k: self.tensor(v, DECODER_COMPONENT, k) for k, v in feed.items()}
        B, T = feed[INPUTS_EMBEDS].shape[:2]
        outs = self.decoder_outputs(B, T, feed[ATTENTION_MASK].shape[1])
        self.run(DECODER_COMPONENT, ins, outs)
        return DecoderOutput(_host(outs[LOGITS][:, -1:]), _host(outs[LAST_HIDDEN_STATE][:, -1:]),
                             [outs[n] for n in self.b.cache.present])

    def start(self, cache: list[Any], rows: np.ndarray, mask: np.ndarray, pos: np.ndarray,
              adapter_ids: np.ndarray, max_len: int) -> "GrowingDeviceStepper":
        return GrowingDeviceStepper(self, cache, rows, mask, pos, adapter_ids, max_len)


class GrowingDeviceStepper:
    """The exported (growing-cache) decoder stepped on device tensors: each step's present cache
    is written into fresh device buffers (torch's caching allocator reuses their memory) and read by
    the next step where it lies."""

    def __init__(self, plane: DevicePlane, cache: list[Any], rows: np.ndarray, mask: np.ndarray, pos: np.ndarray,
                 adapter_ids: np.ndarray, max_len: int):
        t = plane.torch
        self.p, self.max_len = plane, max_len
        idx = t.as_tensor(np.asarray(rows), dtype=t.int64, device=plane.device)
        self.past = [c.index_select(0, idx) for c in cache]
        self.mask = plane.tensor(mask, DECODER_COMPONENT, ATTENTION_MASK)
        self.pos = plane.tensor(pos, DECODER_COMPONENT, POSITION_IDS)
        self.ids = plane.tensor(adapter_ids, DECODER_COMPONENT, ADAPTER_IDS)
        self.names = plane.b.cache

    def step(self, tokens: np.ndarray, reorder: np.ndarray | None) -> np.ndarray:
        p, t = self.p, self.p.torch
        if reorder is not None:
            r = t.as_tensor(np.asarray(reorder), dtype=t.int64, device=p.device)
            self.past = [x.index_select(0, r) for x in self.past]
            self.mask, self.pos, self.ids = (x.index_select(0, r) for x in (self.mask, self.pos, self.ids))
        B = len(tokens)
        if self.mask.shape[1] >= self.max_len:
            raise BackendError(f"generation: more than {self.max_len} cached positions")
        emb = p.empty((B, 1, p.hidden), p.out_types[EMBED_COMPONENT][INPUTS_EMBEDS])
        p.run(EMBED_COMPONENT, {INPUT_IDS: p.tensor(np.asarray(tokens).reshape(B, 1), EMBED_COMPONENT, INPUT_IDS)},
              {INPUTS_EMBEDS: emb})
        self.mask = t.cat([self.mask, t.ones((B, 1), dtype=self.mask.dtype, device=p.device)], 1)
        self.pos = self.pos + 1
        outs = p.decoder_outputs(B, 1, self.mask.shape[1])
        ins = {INPUTS_EMBEDS: emb, ATTENTION_MASK: self.mask, POSITION_IDS: self.pos, ADAPTER_IDS: self.ids,
               **dict(zip(self.names.past, self.past))}
        p.run(DECODER_COMPONENT, ins, outs)
        self.past = [outs[n] for n in self.names.present]
        return _host(outs[LOGITS][:, -1])

    def close(self) -> None:
        self.past = []


def _torch_sees_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _host(t: Any) -> np.ndarray:
    return t.float().cpu().numpy()
