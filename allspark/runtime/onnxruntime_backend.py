"""The `onnxruntime` backend: a build's exported graphs on ONNX Runtime (CPU, CUDA or TensorRT
execution providers). Safe to call from many threads: ONNX Runtime sessions are.

On a GPU provider a request is device-resident (`device_resident`, default there): every graph's
outputs are bound onto torch CUDA tensors (IO binding on their data pointers), so encoder, bridge
and token-embedding outputs reach the decoder where they lie, the prefill's cache and every step's
cache stay in device memory, and only request inputs and token ids go in and the last position's
logits (and head outputs) come back. Where the build has the decoder's static-cache graph (`allspark export
--static-cache`; `static_cache`, default then), generation runs on buffers allocated once at its
maximum length: each step's graph reads them where they lie and returns only the new keys/values,
which are written into the buffers in place, and every step binds the same addresses. Without it,
each step writes a fresh grown cache (`GrowingState` on device tensors). `device_resident=False` keeps the
host round trip (each step's cache copied out and back in), for comparison. The same code runs on
CPU with torch CPU tensors (`device_resident=True` there: the tests' way to check it without a GPU).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..contract.integrity import artifact_paths
from ..contract.manifest import artifact, decoder_cache
from ..contract.tensors import (
    ADAPTER_IDS,
    ATTENTION_MASK,
    CACHE_POSITION,
    DECODER_COMPONENT,
    DECODER_INPUTS,
    EMBED_COMPONENT,
    INPUT_IDS,
    INPUTS_EMBEDS,
    LAST_HIDDEN_STATE,
    LOGITS,
    ONNX,
    ONNX_TO_NUMPY,
    POSITION_IDS,
    STATIC_CACHE,
    STATIC_DECODER,
)
from ..errors import BackendError
from ..memory import check
from ..onnxrt import PROVIDER_ALIASES, arena_shrinking_run_options, input_dtypes, session
from .backend import DecoderOutput
from .decoding import CachePool, GrowingState, SlotState, StaticCache, start_static
from .memory_plan import components_for, runtime_need


class OrtBackend:
    name = "onnxruntime"

    def __init__(self, build: Path, manifest: dict, sessions: dict[str, Any], shrink_arena: bool = False,
                 device_resident: bool | None = None, deferred: Mapping[str, Callable[[], Any]] | None = None):
        """`sessions` by component (`STATIC_DECODER`: the static-cache graph); `deferred`: components
        whose session opens on first use (the growing decoder, where the static graph serves the
        device loop and the host path may never run)."""
        self.build, self.manifest, self.sessions = build, manifest, sessions
        self._deferred = dict(deferred or {})
        self._opening = threading.Lock()
        # A large batch grows ONNX Runtime's CPU arena to its peak, and the arena keeps it; a server
        # asks for the unused part back after every call (`shrink_arena`; the intermediate tensors,
        # not the inputs, make the peak). Off for batch jobs, which would re-allocate every batch.
        self._shrink = arena_shrinking_run_options() if shrink_arena else None
        self.input_types: dict[str, dict[str, np.dtype]] = {}
        self.outputs: dict[str, list[str]] = {}
        for n, s in sessions.items():
            self._describe(n, s)
        probe = sessions.get(DECODER_COMPONENT) or sessions[EMBED_COMPONENT]
        on_gpu = probe.get_providers()[0] != "CPUExecutionProvider"
        self.use_io_binding = on_gpu
        self.cache = decoder_cache(manifest)
        self.device_resident = _device_resident(on_gpu, device_resident)
        self.static_cache = STATIC_DECODER in sessions
        if self.static_cache and not self.device_resident:
            raise BackendError("onnxruntime backend: the static-cache decoder runs only device-resident")
        self._plane = DevicePlane(self, "cuda" if on_gpu else "cpu") if self.device_resident else None

    def _describe(self, name: str, s: Any) -> None:
        self.input_types[name] = input_dtypes(s)
        self.outputs[name] = [o.name for o in s.get_outputs()]

    def defer(self, name: str, opener: Callable[[], Any]) -> None:
        """Open `name` with `opener` when first used (a component not yet opened; e.g. a session
        opened another way, or one that must fail, in a test)."""
        with self._opening:
            if name in self.sessions:
                raise BackendError(f"onnxruntime backend: {name!r} is open already; defer it before first use")
            self._deferred[name] = opener

    @property
    def kv_dtype(self) -> Any:
        """The torch dtype of the device-resident KV cache; None on host arrays."""
        return None if self._plane is None else self._plane.kv_dtype

    def session(self, name: str) -> Any:
        """The component's session, opened now if it was deferred."""
        if name not in self.sessions:
            with self._opening:
                if name not in self.sessions:
                    if name not in self._deferred:
                        raise BackendError(f"onnxruntime backend: no session for {name!r}")
                    s = self._deferred[name]()  # a failed open (memory?) raises its cause, now and next time
                    self._describe(name, s)
                    self.sessions[name] = s
                    del self._deferred[name]
        return self.sessions[name]

    def types(self, name: str) -> dict[str, np.dtype]:
        self.session(name)
        return self.input_types[name]

    @classmethod
    def load(cls, build: Path, manifest: dict, providers: Sequence[str] | None = None, threads: int = 0,
             spin: bool = True, shrink_arena: bool = False, device_resident: bool | None = None,
             static_cache: bool | None = None, trt_cache: str | None = None, trt_fp16: bool = True,
             trt_profile: Sequence[str] = (), modalities: Sequence[str] | None = None,
             shared_arena: bool = False) -> "OrtBackend":
        """One session per component; `providers` e.g. ["cuda"] (CPU is always the fallback). With
        "tensorrt" first, each component's TensorRT provider gets its optimization profiles from the
        build's dims (`trt_profile` overrides, "DIM=MIN:OPT:MAX"), fp16, and engine and timing caches
        in `trt_cache` (default: `<build>/trt_cache`), so engines are built once per machine.
        `static_cache` (device-resident only): generate on the decoder's static-cache graph (None: where
        the build has one); the growing decoder then opens only if the host path needs it. `modalities`:
        open only their components (and the shared ones) now, the others when first used.
        `shared_arena`: every session allocates from one process-wide CPU arena (see `onnxrt.session`)."""
        def open_(path: Path, provs: Sequence[str] | None) -> Any:
            return session(path, threads=threads, spin=spin, providers=provs, shared_arena=shared_arena)

        def graph(name: str, art: dict) -> Path:  # only a file the integrity check hashed is opened
            return artifact_paths(build, name, art, ONNX.name).main

        if not any(str(p).lower() not in ("cpu", "cpuexecutionprovider") for p in providers or ()):
            # host memory: on a GPU provider the weights go to the device (not estimated here)
            check(runtime_need(manifest, f"loading {build} on onnxruntime", modalities=modalities))

        def providers_for(name: str) -> list | None:
            return _with_trt_options(providers, build, manifest, name, trt_cache, trt_fp16, trt_profile)

        comps = manifest["components"]
        now = components_for(manifest, modalities)  # None: every component
        sessions, deferred = {}, {}
        for name, c in comps.items():
            if name == DECODER_COMPONENT:
                continue
            opener = (lambda f=graph(name, artifact(c, ONNX.name, name)), n=name: open_(f, providers_for(n)))
            if now is None or name in now:
                sessions[name] = opener()
            else:
                deferred[name] = opener
        on_gpu = sessions[EMBED_COMPONENT].get_providers()[0] != "CPUExecutionProvider"
        static = comps[DECODER_COMPONENT]["artifacts"].get(STATIC_CACHE.name)
        if static_cache is None:
            static_cache = static is not None and _device_resident(on_gpu, device_resident)
        elif static_cache and static is None:
            raise BackendError(f"{build}: static_cache asked for, but the build has no static-cache decoder; "
                               f"re-export with `allspark export --static-cache`")
        elif static_cache and not _device_resident(on_gpu, device_resident):
            raise BackendError("static_cache runs the decode loop on device tensors: it needs device_resident "
                               "(the default on a GPU provider)")
        dec_file = graph(DECODER_COMPONENT, artifact(comps[DECODER_COMPONENT], ONNX.name, DECODER_COMPONENT))

        def decoder() -> Any:
            return open_(dec_file, providers_for(DECODER_COMPONENT))

        if static_cache:
            # TensorRT's profiles are the growing decoder's: the static graph runs on CUDA instead
            sessions[STATIC_DECODER] = open_(graph(DECODER_COMPONENT, static), _without_trt(providers))
            deferred[DECODER_COMPONENT] = decoder
        else:
            sessions[DECODER_COMPONENT] = decoder()
        return cls(build, manifest, sessions, shrink_arena, device_resident, deferred)

    def _run(self, component: str, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        sess = self.session(component)
        types = self.input_types[component]
        feed = {k: np.asarray(v).astype(types[k], copy=False) for k, v in feed.items()}
        if self.use_io_binding:
            outs = _run_io_binding(sess, feed)
        elif self._shrink is not None:
            outs = sess.run(None, feed, self._shrink)
        else:
            outs = sess.run(None, feed)
        return outs

    def _one(self, component: str, feed: Mapping[str, np.ndarray]) -> np.ndarray:
        return self._run(component, feed)[0]

    # encoder, bridge and embedding outputs stay in the graph's dtype: they only feed the next graph,
    # and an fp16 build's float32 round trip between graphs is lossless but costs ~5 ns an element
    def encode(self, component: str, tensors: Mapping[str, np.ndarray]) -> np.ndarray:
        return self._one(component, {k: tensors[k] for k in self.types(component)})

    def bridge(self, component: str, media: np.ndarray) -> np.ndarray:
        (name,) = self.types(component)
        return self._one(component, {name: media})

    def head(self, component: str, hidden: np.ndarray) -> np.ndarray:
        (name,) = self.types(component)
        return _float32(self._one(component, {name: hidden}))

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        return self._one(EMBED_COMPONENT, {INPUT_IDS: input_ids})

    def decode(self, feed: Mapping[str, np.ndarray], last: bool = False) -> DecoderOutput:
        outs = self._run(DECODER_COMPONENT, feed)  # (opens the decoder, if deferred, before its names are read)
        got = dict(zip(self.outputs[DECODER_COMPONENT], outs))
        logits, hidden = got[LOGITS], got[LAST_HIDDEN_STATE]
        if last:  # sliced before the cast (numpy's fp16 casts are scalar, ~5 ns an element), and copied: a
            # view would keep the whole (B, T, vocab) answer alive through the generation that follows
            logits, hidden = np.ascontiguousarray(logits[:, -1:]), np.ascontiguousarray(hidden[:, -1:])
        # the cache stays in the graph's dtype: it only goes back into the graph, and an fp16 build's
        # cache cast to float32 and back every step cost more than the step itself at 32 rows (numpy's
        # fp16 casts are scalar: 10.5 ms against 1.9 ms at 32 rows x 75 positions, demo build)
        return DecoderOutput(_float32(logits), _float32(hidden), [got[n] for n in self.cache.present])

    # ---- device-resident decoding (allspark.runtime.decoding.DeviceDecoding) -------------------
    def prefill_on_device(self, feed: Mapping[str, np.ndarray]) -> DecoderOutput:
        return self._device_plane().prefill(feed)

    def start_generation(self, cache: list[Any], rows: np.ndarray, mask: np.ndarray, pos: np.ndarray,
                         adapter_ids: np.ndarray, max_len: int, limit: int | None = None) -> "GrowingState | SlotState":
        return self._device_plane().start(cache, rows, mask, pos, adapter_ids, max_len, limit)

    # ---- stage outputs kept on the device (allspark.runtime.decoding.DeviceStages) -------------
    def encode_on_device(self, component: str, tensors: Mapping[str, np.ndarray]) -> Any:
        p = self._device_plane()
        return p.call(component, {k: p.tensor(tensors[k], component, k) for k in self.types(component)})

    def bridge_on_device(self, component: str, media: Any) -> Any:
        p = self._device_plane()
        (name,) = self.types(component)
        return p.call(component, {name: p.tensor(media, component, name)})

    def embed_on_device(self, input_ids: np.ndarray) -> Any:
        p = self._device_plane()
        return p.call(EMBED_COMPONENT, {INPUT_IDS: p.tensor(input_ids, EMBED_COMPONENT, INPUT_IDS)})

    def _device_plane(self) -> "DevicePlane":
        if self._plane is None:
            raise BackendError("onnxruntime backend: loaded with device_resident=False")
        return self._plane


def _device_resident(on_gpu: bool, asked: bool | None) -> bool:
    if asked is None:  # by default only where torch can hold the tensors on that device
        return on_gpu and _torch_sees_cuda()
    if asked and on_gpu and not _torch_sees_cuda():
        raise BackendError("device_resident needs a torch with CUDA (its tensors hold the cache); this torch "
                           "sees no GPU: pass device_resident=False")
    return asked


def _is_trt(p: Any) -> bool:
    return isinstance(p, str) and PROVIDER_ALIASES.get(p.lower(), p) == "TensorrtExecutionProvider"


def _without_trt(providers: Sequence[str] | None) -> list | None:
    """`providers` with TensorRT's replaced by CUDA's (the static graph has no TensorRT profiles)."""
    out: list = []
    for p in providers or ():
        p = "cuda" if _is_trt(p) else p
        if p not in out:
            out.append(p)
    return out or None


def _with_trt_options(providers: Sequence[str] | None, build: Path, manifest: dict, component: str,
                      cache: str | None, fp16: bool, overrides: Sequence[str]) -> list | None:
    """`providers` with the TensorRT provider's options for `component` filled in."""
    if not providers or not any(_is_trt(p) for p in providers):
        return list(providers) if providers else None
    from ..export.trt_profiles import (
        ort_trt_provider_options,
        parse_overrides,
        profiles,
    )

    opts = ort_trt_provider_options(profiles(manifest, component, parse_overrides(overrides)),
                                    str(Path(cache) if cache else build / "trt_cache"), fp16)
    return [(p, opts) if _is_trt(p) else p for p in providers]


def _float32(x: np.ndarray) -> np.ndarray:
    """fp16 graphs' results as float32 for the host's arithmetic (heads, token choice)."""
    return x.astype(np.float32, copy=False) if x.dtype == np.float16 else x


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
        self.static = backend.static_cache
        self.decoder = STATIC_DECODER if self.static else DECODER_COMPONENT  # the graph the decode loop steps
        # the static graph's outputs: this call's keys/values only, in `cache.past` order
        self.new = tuple(backend.manifest["components"][DECODER_COMPONENT]["artifacts"][STATIC_CACHE.name]["cache"]
                         ["new"]) if self.static else ()
        self.kv_dtype = self.numpy_to_torch[backend.types(self.decoder)[backend.cache.past[0]]]
        shapes = {o.name: o.shape for o in backend.session(self.decoder).get_outputs()}
        self.vocab = int(shapes[LOGITS][-1])
        self.hidden = int(shapes[LAST_HIDDEN_STATE][-1])
        kv = shapes[(self.new or backend.cache.present)[0]]
        self.kv_heads, self.head_dim = int(kv[1]), int(kv[3])
        self._out_types: dict[str, dict[str, Any]] = {}
        self.pool = CachePool(self._workspace) if self.static else None

    def out_type(self, component: str, name: str) -> Any:
        if component not in self._out_types:
            self._out_types[component] = {o.name: self.numpy_to_torch[np.dtype(ONNX_TO_NUMPY[o.type])]
                                          for o in self.b.session(component).get_outputs()}
        return self._out_types[component][name]

    def tensor(self, x: Any, component: str, name: str):
        """A host array, or a device tensor (another graph's output), as input `name` wants it."""
        want = self.numpy_to_torch[self.b.types(component)[name]]
        t = x if isinstance(x, self.torch.Tensor) else self.torch.from_numpy(np.ascontiguousarray(x))
        return t.to(self.device, want).contiguous()

    def call(self, component: str, inputs: Mapping[str, Any]) -> Any:
        """`component`'s single output as a new device tensor, its shape from the manifest's dims
        (symbolic ones sized by the inputs')."""
        comp = self.b.manifest["components"][component]
        sizes: dict[str, int] = {}
        for t in comp["inputs"]:
            sizes.update({d: int(n) for d, n in zip(t["dims"], inputs[t["name"]].shape) if isinstance(d, str)})
        (out,) = comp["outputs"]
        try:
            shape = tuple(sizes[d] if isinstance(d, str) else int(d) for d in out["dims"])
        except KeyError as e:
            raise BackendError(f"{component}: output {out['name']} has dim {e} that no input sizes") from None
        y = self.empty(shape, self.out_type(component, out["name"]))
        self.run(component, inputs, {out["name"]: y})
        return y

    def bind(self, component: str, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> Any:
        """An IO binding of `component` reading `inputs` and writing `outputs` (contiguous torch
        tensors of the graph's dtypes and the outputs' exact shapes) in place; valid while they live."""
        io = self.b.session(component).io_binding()
        for k, t in inputs.items():
            io.bind_input(k, self.device_type, 0, self.torch_to_numpy[t.dtype], list(t.shape), t.data_ptr())
        for k, t in outputs.items():
            io.bind_output(k, self.device_type, 0, self.torch_to_numpy[t.dtype], list(t.shape), t.data_ptr())
        return io

    def execute(self, component: str, io: Any) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.current_stream().synchronize()  # torch's writes land before ONNX Runtime reads
        self.b.session(component).run_with_iobinding(io)  # returns once its outputs are written

    def run(self, component: str, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> None:
        self.execute(component, self.bind(component, inputs, outputs))

    def empty(self, shape: tuple[int, ...], dtype: Any):
        return self.torch.empty(shape, dtype=dtype, device=self.device)

    def decoder_outputs(self, B: int, T: int, total: int) -> dict[str, Any]:
        """Output tensors of the stepped graph: the growing decoder's cache is `total` long, the
        static graph's new keys/values `T`."""
        d = self.decoder
        outs = {LOGITS: self.empty((B, T, self.vocab), self.out_type(d, LOGITS)),
                LAST_HIDDEN_STATE: self.empty((B, T, self.hidden), self.out_type(d, LAST_HIDDEN_STATE))}
        kv = self.new or self.b.cache.present
        outs.update({n: self.empty((B, self.kv_heads, T if self.static else total, self.head_dim), self.out_type(d, n))
                     for n in kv})
        return outs

    def prefill(self, feed: Mapping[str, np.ndarray]) -> DecoderOutput:
        B, T = feed[INPUTS_EMBEDS].shape[:2]
        if self.static:  # a buffer as long as the prompt, nothing written yet: read-only zeros, shared
            ins = {k: self.tensor(feed[k], STATIC_DECODER, k) for k in DECODER_INPUTS}
            ins[CACHE_POSITION] = self.torch.arange(T, dtype=self.torch.int64, device=self.device)
            zeros = self.torch.zeros((B, self.kv_heads, T, self.head_dim), dtype=self.kv_dtype, device=self.device)
            ins.update({n: zeros for n in self.b.cache.past})
        else:
            ins = {k: self.tensor(v, DECODER_COMPONENT, k) for k, v in feed.items()}
        outs = self.decoder_outputs(B, T, feed[ATTENTION_MASK].shape[1])
        self.run(self.decoder, ins, outs)
        return DecoderOutput(_host(outs[LOGITS][:, -1:]), _host(outs[LAST_HIDDEN_STATE][:, -1:]),
                             [outs[n] for n in (self.new or self.b.cache.present)])

    def start(self, cache: list[Any], rows: np.ndarray, mask: np.ndarray, pos: np.ndarray,
              adapter_ids: np.ndarray, max_len: int, limit: int | None = None) -> "GrowingState | SlotState":
        if self.static:
            return start_static(self.pool, cache, rows, mask, pos, adapter_ids, max_len, limit)
        return GrowingState(self.growing_step, self.take, self.take(cache, rows),
                            self.tensor(mask, DECODER_COMPONENT, ATTENTION_MASK), self.tensor(pos, DECODER_COMPONENT, POSITION_IDS),
                            self.tensor(adapter_ids, DECODER_COMPONENT, ADAPTER_IDS), limit=limit or max_len)

    def take(self, cache: list[Any], rows: np.ndarray) -> list[Any]:
        """`rows` of a cache (device tensors) on this device."""
        idx = self.torch.as_tensor(np.asarray(rows), dtype=self.torch.int64, device=self.device)
        return [self.tensor(c, DECODER_COMPONENT, n).index_select(0, idx) for c, n in zip(cache, self.b.cache.past)]

    def growing_step(self, tokens: np.ndarray, mask: Any, pos: Any, ids: Any, past: list[Any]) -> tuple[np.ndarray, list[Any]]:
        """One step of the growing decoder on device tensors (`GrowingState`'s run): the host logits
        of the last position, and the grown cache where it lies."""
        B = len(tokens)
        emb = self.empty((B, 1, self.hidden), self.out_type(EMBED_COMPONENT, INPUTS_EMBEDS))
        self.run(EMBED_COMPONENT, {INPUT_IDS: self.tensor(np.asarray(tokens).reshape(B, 1), EMBED_COMPONENT, INPUT_IDS)},
                 {INPUTS_EMBEDS: emb})
        outs = self.decoder_outputs(B, 1, mask.shape[1])
        ins = {INPUTS_EMBEDS: emb, ATTENTION_MASK: mask, POSITION_IDS: pos, ADAPTER_IDS: ids,
               **dict(zip(self.b.cache.past, past))}
        self.run(DECODER_COMPONENT, ins, outs)
        return _host(outs[LOGITS][:, -1]), [outs[n] for n in self.b.cache.present]

    def _workspace(self, batch: int, max_len: int) -> "_StaticWorkspace":
        cache = StaticCache(self.torch, batch, max_len, (self.kv_heads, self.head_dim), len(self.b.cache.past),
                            self.kv_dtype, self.device)
        return _StaticWorkspace(self, cache)


class _StaticWorkspace:
    """A static cache with its step bound once: the embedding and decoder graphs read and write the
    same tensors every step (the buffers, mask, positions, token ids and outputs never move), and the
    new keys/values are written into the buffers at `cache_position` after each run."""

    def __init__(self, plane: DevicePlane, cache: StaticCache):
        p, c, B = plane, cache, cache.batch
        self.p, self.cache = plane, cache
        self.emb = p.empty((B, 1, p.hidden), p.out_type(EMBED_COMPONENT, INPUTS_EMBEDS))
        want = p.numpy_to_torch[p.b.types(STATIC_DECODER)[INPUTS_EMBEDS]]
        self.emb_in = self.emb if want == self.emb.dtype else p.empty((B, 1, p.hidden), want)
        self.outs = p.decoder_outputs(B, 1, 1)
        self.embed_io = p.bind(EMBED_COMPONENT, {INPUT_IDS: c.tokens}, {INPUTS_EMBEDS: self.emb})
        self.step_io = p.bind(STATIC_DECODER, {INPUTS_EMBEDS: self.emb_in, ATTENTION_MASK: c.mask, POSITION_IDS: c.pos,
                                               ADAPTER_IDS: c.ids, CACHE_POSITION: c.cache_position,
                                               **dict(zip(p.b.cache.past, c.kv))}, self.outs)
        self.new = [self.outs[n] for n in p.new]

    def run(self):
        p, c = self.p, self.cache
        p.execute(EMBED_COMPONENT, self.embed_io)
        if self.emb_in is not self.emb:
            self.emb_in.copy_(self.emb)
        p.execute(STATIC_DECODER, self.step_io)
        for buf, new in zip(c.kv, self.new):
            buf.index_copy_(2, c.cache_position, new)  # in place: the buffers never move
        return self.outs[LOGITS][:, -1]


def _torch_sees_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _host(t: Any) -> np.ndarray:
    return t.float().cpu().numpy()
