"""One component of a streamed (int4 / int8) build: traced, written from the checkpoint, checked.

    trace + write_graph (streamed.py)      the graph, its weights quantized a tensor at a time
    parity: materialize what is checked    the component's own weights in fp32 (a pack's encoder,
                                           bridge or head; the decoder whole, or its reduced-depth
                                           twin where the whole would not fit), its fp32 PyTorch
                                           outputs on the validation cases, weights released, then
                                           the graph (or the twin's, written the same way) run on them

Peak memory is the larger of one tensor in the writer and the checked module in fp32 (or the
onnxruntime session of the quantized graph), never the model.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..contract.tensors import ONNX, Kind
from ..fsutil import sha256_file
from ..model.model import AllSpark
from ..model.skeleton import CheckpointTensors, materialized, parameter_names
from .isolate import return_free_memory
from .quantize import QuantConfig
from .specs import ComponentSpec
from .streamed import trace, write_graph
from .twin import available_bytes, describe, reduced_depth
from .validate import compare, reference, save_cases


class StreamedExporter:
    def __init__(self, model: AllSpark, tensors: CheckpointTensors, precision: str, quant: QuantConfig | None,
                 opset: int, fuse: bool, progress: bool = True):
        """`quant` None: the weights as they are, in `precision` (fp32 or fp16)."""
        self.model, self.tensors, self.precision, self.quant = model, tensors, precision, quant
        self.opset, self.fuse, self.progress = opset, fuse, progress
        self.names = parameter_names(model)
        self.dtype = torch.float16 if precision == "fp16" else torch.float32  # the graph's activations
        self.shapes = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}

    def trace(self, spec: ComponentSpec):
        return trace(spec, self.names, self.opset, self.fuse, self.dtype)

    def write(self, spec: ComponentSpec, path: Path, traced=None) -> dict:
        proto, params = traced or self.trace(spec)
        bar = tqdm(total=len(params), desc=spec.name, unit="tensor", leave=False,
                   disable=not self.progress or len(params) < 64)
        try:
            return write_graph(proto, params, self.tensors.read, {g: self.shapes[n] for g, n in params.items()},
                               path, spec.kind, self.quant and self.quant.for_component(spec.name), bar.update,
                               np.float16 if self.dtype == torch.float16 else np.float32)
        finally:
            bar.close()

    def needs_twin(self, spec: ComponentSpec, graph_bytes: int) -> bool:
        """Would the whole decoder's check not fit? Its fp32 PyTorch reference (then freed) or the
        onnxruntime session of the written graph (~1.5x its size, prepacked; fp16: fp32 copies), with a
        10% margin."""
        fp32 = sum(p.numel() * 4 for p in spec.module.parameters())
        avail = available_bytes()
        session = graph_bytes * (2.2 if self.precision == "fp16" else 1.5)
        return bool(avail) and max(fp32, int(session)) * 1.1 > avail

    def export(self, spec: ComponentSpec, tmp: Path, parity: str, twin_layers: int,
               adapter_parity: Callable[[ComponentSpec], dict] | None = None) -> tuple[dict, bool]:
        path = tmp / f"{spec.name}{ONNX.suffix}"
        t0 = time.perf_counter()
        traced = self.trace(spec)
        used = set(traced[1].values())  # what the graph reads: all a parity check needs real
        facts = self.write(spec, path, traced)
        del traced
        export_s = time.perf_counter() - t0
        files = [path.name] + ([path.name + ".data"] if (tmp / (path.name + ".data")).exists() else [])
        size = sum((tmp / f).stat().st_size for f in files)
        twin = spec.kind == Kind.DECODER and (parity == "twin" or (parity == "auto" and self.needs_twin(spec, size)))
        checked, scope, twin_path, extra = spec, None, None, {}
        total = self.model.config.llm.num_layers
        with reduced_depth(self.model, twin_layers) if twin else contextlib.nullcontext() as keep:
            if twin:
                checked = spec.rebuild(self.model)
                scope = describe(keep, total)
                traced = self.trace(checked)
                used = set(traced[1].values())
            with materialized(checked.module, self.model, self.tensors, torch.float32, only=used):
                cases, how = reference(checked)
                if adapter_parity is not None:
                    extra = adapter_parity(checked)
            gc.collect()
            return_free_memory()
            if twin:
                twin_path = tmp / "validation" / f"{spec.name}.twin{ONNX.suffix}"
                self.write(checked, twin_path, traced)
        precision = self.quant.precision_of(spec.name) if self.quant else self.precision
        result = {**compare(checked, twin_path or path, cases, precision), "reference": how}
        if scope is not None:
            result.update(scope=scope, twin_graph=twin_path.relative_to(tmp).as_posix(),
                          tensors={"inputs": [t.to_json() for t in checked.inputs],
                                   "outputs": [t.to_json() for t in checked.outputs]})
        save_cases(tmp / "validation" / f"{spec.name}.npz", cases)
        entry = {
            "kind": spec.kind.value, "modality": spec.modality,
            "artifacts": {ONNX.name: {"file": path.name, "sha256": {f: sha256_file(tmp / f) for f in files},
                                      "bytes": size, **facts}},
            "inputs": [t.to_json() for t in spec.inputs], "outputs": [t.to_json() for t in spec.outputs],
            "opset": self.opset, "precision": precision, "export_seconds": round(export_s, 2),
            "export_process": "in process, streamed from the checkpoint",
            "validation": f"validation/{spec.name}.npz", "parity": result,
        }
        if extra:
            entry["adapters"] = extra
        if spec.cache is not None:
            entry["cache"] = {"past": list(spec.cache.past), "present": list(spec.cache.present)}
        return entry, result["passed"]
