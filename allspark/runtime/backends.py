"""Backends: the five component calls the runtime graph needs, on numpy arrays.

    encode(modality, tensors) -> media           (B, n, d)
    bridge(modality, media)   -> bridge tokens   (B, N, H)
    head(modality, hidden)    -> output          (B, out_dim)
    embed(input_ids)          -> embeddings      (B, T, H)
    decode(feed)              -> logits, last_hidden_state, present list

`OrtBackend` runs the exported graphs named in the manifest (CPU, CUDA or TensorRT execution
providers); `TorchBackend` runs the PyTorch reference modules of the checkpoint the build came
from, through the same wrappers the export traced. Both are safe to call from many threads:
ONNX Runtime sessions are, and the torch modules are only read, under `no_grad`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import AllSparkError

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}


class BackendError(AllSparkError, RuntimeError):
    pass


class OrtBackend:
    name = "onnxruntime"

    def __init__(self, build: Path, manifest: dict, providers: Sequence[str] | None = None,
                 threads: int = 0, spin: bool = True):
        import onnxruntime as ort

        self.build, self.manifest = build, manifest
        self.providers = resolve_providers(providers)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        if not spin:  # idle intra-op threads sleep instead of spinning: fair when sharing cores
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.sessions: dict[str, Any] = {}
        self.input_types: dict[str, dict[str, np.dtype]] = {}
        for name, c in manifest["components"].items():
            s = ort.InferenceSession(str(build / c["file"]), opts, providers=self.providers)
            self.sessions[name] = s
            self.input_types[name] = {i.name: _np_dtype(i.type) for i in s.get_inputs()}
        self.use_io_binding = self.providers[0] != "CPUExecutionProvider"
        self.input_names = {n: [t["name"] for t in c["inputs"]] for n, c in manifest["components"].items()}

    def _run(self, component: str, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        types = self.input_types[component]
        feed = {k: v.astype(types[k], copy=False) for k, v in feed.items()}
        sess = self.sessions[component]
        if self.use_io_binding:
            return _run_io_binding(sess, feed)
        outs = sess.run(None, feed)
        return [o.astype(np.float32, copy=False) if o.dtype == np.float16 else o for o in outs]

    def encode(self, modality: str, tensors: dict[str, np.ndarray]) -> np.ndarray:
        name = f"{modality}_encoder"
        return self._run(name, {k: tensors[k] for k in self.input_names[name]})[0]

    def bridge(self, modality: str, media: np.ndarray) -> np.ndarray:
        return self._run(f"{modality}_bridge", {"media": media})[0]

    def head(self, modality: str, hidden: np.ndarray) -> np.ndarray:
        return self._run(f"{modality}_head", {"hidden": hidden})[0]

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        return self._run("embed_tokens", {"input_ids": input_ids})[0]

    def decode(self, feed: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        outs = self._run("decoder", feed)
        return outs[0], outs[1], outs[2:]


def _run_io_binding(sess, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """GPU providers: bind inputs once and let outputs be allocated on the device, so ONNX Runtime
    copies each tensor once instead of staging through its own buffers. (Not run here: no GPU.)"""
    io = sess.io_binding()
    for k, v in feed.items():
        io.bind_cpu_input(k, np.ascontiguousarray(v))
    for o in sess.get_outputs():
        io.bind_output(o.name, "cuda")
    sess.run_with_iobinding(io)
    return [o.astype(np.float32, copy=False) if o.dtype == np.float16 else o
            for o in io.copy_outputs_to_cpu()]


def _np_dtype(onnx_type: str) -> np.dtype:
    return {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
            "tensor(int32)": np.int32, "tensor(bool)": np.bool_}[onnx_type]


def resolve_providers(providers: Sequence[str] | None) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = [PROVIDER_ALIASES.get(p.lower(), p) for p in (providers or ["cpu"])]
    missing = [p for p in wanted if p not in available]
    if missing:
        raise BackendError(f"execution provider(s) {missing} not available in this onnxruntime "
                           f"build; available: {available}")
    if "CPUExecutionProvider" not in wanted:
        wanted.append("CPUExecutionProvider")  # fallback for ops a GPU provider lacks
    return wanted


class TorchBackend:
    name = "torch"

    def __init__(self, manifest: dict, checkpoint: str | Path | None = None, device: str = "cpu",
                 compile: bool = False):
        import torch

        from ..export.specs import DecoderModule
        from ..model.checkpoint import load_checkpoint

        ckpt = Path(checkpoint or manifest["provenance"]["checkpoint"])
        if not (ckpt / "manifest.json").is_file():
            raise BackendError(f"the torch backend needs the checkpoint the build came from; "
                               f"not found at {ckpt} (pass checkpoint=...)")
        self.torch = torch
        self.device = torch.device(device)
        self.model = load_checkpoint(ckpt, manifest["modalities"]).to(self.device).requires_grad_(False)
        self.decoder = DecoderModule(self.model)
        self.compile = compile
        self._compiled: dict[int, Any] = {}
        self.num_layers = self.model.config.llm.num_layers

    def _fn(self, module):
        """The module itself, or its torch.compile'd version (dynamic shapes), made once."""
        if not self.compile:
            return module
        key = id(module)
        if key not in self._compiled:
            self._compiled[key] = self.torch.compile(module, dynamic=True)
        return self._compiled[key]

    def _t(self, x: np.ndarray):
        return self.torch.from_numpy(np.ascontiguousarray(x)).to(self.device)

    def _np(self, t) -> np.ndarray:
        return t.detach().float().cpu().numpy()

    def encode(self, modality: str, tensors: dict[str, np.ndarray]) -> np.ndarray:
        with self.torch.no_grad():
            return self._np(self._fn(self.model.pack(modality).encoder)(**{k: self._t(v) for k, v in tensors.items()}))

    def bridge(self, modality: str, media: np.ndarray) -> np.ndarray:
        with self.torch.no_grad():
            return self._np(self._fn(self.model.pack(modality).bridge)(self._t(media)))

    def head(self, modality: str, hidden: np.ndarray) -> np.ndarray:
        with self.torch.no_grad():
            return self._np(self._fn(self.model.pack(modality).head)(self._t(hidden)))

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        with self.torch.no_grad():
            return self._np(self.model.embed(self._t(input_ids)))

    def decode(self, feed: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        names = ["inputs_embeds", "attention_mask", "position_ids", "adapter_ids"]
        past = [self._t(feed[k]) for k in feed if k.startswith("past_")]
        with self.torch.no_grad():
            outs = self._fn(self.decoder)(*(self._t(feed[n]) for n in names), past)
        return self._np(outs[0]), self._np(outs[1]), [self._np(o) for o in outs[2:]]
