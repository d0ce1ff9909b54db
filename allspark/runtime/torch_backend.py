"""The `torch` backend: the PyTorch reference modules of the checkpoint a build came from, run
through the same wrappers the export traced. Safe to call from many threads: the modules are only
read, under `no_grad`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..contract.manifest import decoder_cache
from ..contract.tensors import DECODER_INPUTS
from ..errors import BackendError
from .backend import DecoderOutput


class TorchBackend:
    name = "torch"

    def __init__(self, manifest: dict, model: Any, device: str = "cpu", compile: bool = False):
        import torch

        from ..export.specs import DecoderModule

        self.torch = torch
        self.device = torch.device(device)
        self.model = model.to(self.device).requires_grad_(False)
        self.decoder = DecoderModule(self.model)
        self.compile = compile
        self._compiled: dict[int, Any] = {}
        self.cache = decoder_cache(manifest)
        self.modality_of = {n: c.get("modality") for n, c in manifest["components"].items()}

    @classmethod
    def load(cls, build: Path, manifest: dict, checkpoint: str | Path | None = None, device: str = "cpu",
             compile: bool = False) -> "TorchBackend":
        from ..model.checkpoint import load_checkpoint

        ckpt = Path(checkpoint or manifest["provenance"]["checkpoint"])
        if not (ckpt / "manifest.json").is_file():
            raise BackendError(f"the torch backend needs the checkpoint the build came from; "
                               f"not found at {ckpt} (pass checkpoint=...)")
        return cls(manifest, load_checkpoint(ckpt, manifest["modalities"]), device, compile)

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

    def _t(self, x: np.ndarray):
        return self.torch.from_numpy(np.ascontiguousarray(x)).to(self.device)

    def _np(self, t) -> np.ndarray:
        return t.detach().float().cpu().numpy()

    def encode(self, component: str, tensors: Mapping[str, np.ndarray]) -> np.ndarray:
        with self.torch.no_grad():
            return self._np(self._fn(self._pack(component).encoder)(**{k: self._t(v) for k, v in tensors.items()}))

    def bridge(self, component: str, media: np.ndarray) -> np.ndarray:
        with self.torch.no_grad():
            return self._np(self._fn(self._pack(component).bridge)(self._t(media)))

    def head(self, component: str, hidden: np.ndarray) -> np.ndarray:
        with self.torch.no_grad():
            return self._np(self._fn(self._pack(component).head)(self._t(hidden)))

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        with self.torch.no_grad():
            return self._np(self.model.embed(self._t(input_ids)))

    def decode(self, feed: Mapping[str, np.ndarray]) -> DecoderOutput:
        past = [self._t(feed[k]) for k in self.cache.past]
        with self.torch.no_grad():
            outs = self._fn(self.decoder)(*(self._t(feed[n]) for n in DECODER_INPUTS), past)
        return DecoderOutput(self._np(outs[0]), self._np(outs[1]), [self._np(o) for o in outs[2:]])
