"""The `onnxruntime` backend: a build's exported graphs on ONNX Runtime (CPU, CUDA or TensorRT
execution providers). Safe to call from many threads: ONNX Runtime sessions are."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..contract.manifest import artifact, decoder_cache
from ..contract.tensors import (
    DECODER_COMPONENT,
    EMBED_COMPONENT,
    INPUT_IDS,
    LAST_HIDDEN_STATE,
    LOGITS,
    ONNX,
    ONNX_TO_NUMPY,
)
from ..onnxrt import arena_shrinking_run_options, session
from .backend import DecoderOutput


class OrtBackend:
    name = "onnxruntime"

    def __init__(self, build: Path, manifest: dict, sessions: dict[str, Any], shrink_arena: bool = False):
        self.build, self.manifest, self.sessions = build, manifest, sessions
        # A large batch grows ONNX Runtime's CPU arena to its peak, and the arena keeps it; a server
        # asks for the unused part back after every call (`shrink_arena`; the intermediate tensors,
        # not the inputs, make the peak). Off for batch jobs, which would re-allocate every batch.
        self._shrink = arena_shrinking_run_options() if shrink_arena else None
        self.input_types = {n: {i.name: np.dtype(ONNX_TO_NUMPY[i.type]) for i in s.get_inputs()}
                            for n, s in sessions.items()}
        self.outputs = {n: [o.name for o in s.get_outputs()] for n, s in sessions.items()}
        self.use_io_binding = sessions[DECODER_COMPONENT].get_providers()[0] != "CPUExecutionProvider"
        self.cache = decoder_cache(manifest)

    @classmethod
    def load(cls, build: Path, manifest: dict, providers: Sequence[str] | None = None, threads: int = 0,
             spin: bool = True, shrink_arena: bool = False) -> "OrtBackend":
        """One session per component; `providers` e.g. ["cuda"] (CPU is always the fallback)."""
        sessions = {name: session(build / artifact(c, ONNX.name, name)["file"], threads=threads, spin=spin,
                                  providers=providers)
                    for name, c in manifest["components"].items()}
        return cls(build, manifest, sessions, shrink_arena)

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
