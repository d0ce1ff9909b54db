"""Export one component to ONNX: dynamo exporter, temp file, full checker, external data if big."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections import Counter
from pathlib import Path

import onnx
import torch

from ..errors import AllSparkError
from ..model.layers import unfused_attention
from .specs import ComponentSpec
from .twin import weight_bytes

# Weights past this go to external data (`<graph>.onnx.data`). Protobuf's hard limit is 2 GiB, but
# memory decides first: an inline graph is built, serialized, re-read by the checker and re-read for
# its op counts -- base's 1.2 GB ViT-L encoder took the exporting process from 6.6 to 11.6 GB.
EXTERNAL_DATA_BYTES = 128 << 20


class ExportError(AllSparkError, RuntimeError):
    pass


@contextlib.contextmanager
def attention_mode(spec: ComponentSpec, fuse: bool):
    """`fuse=False`: our layers emit MatMul/Softmax, and the LLM uses transformers' eager attention."""
    if fuse:
        yield
        return
    llm_cfg = getattr(getattr(spec.module, "llm", None), "config", None)
    old = llm_cfg._attn_implementation if llm_cfg is not None else None
    if llm_cfg is not None:
        llm_cfg._attn_implementation = "eager"
    try:
        with unfused_attention():
            yield
    finally:
        if llm_cfg is not None:
            llm_cfg._attn_implementation = old


def _quiet():
    """The dynamo exporter logs every step at INFO and warns on benign renames; keep the bar clean."""
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "onnx_ir"):
        lg = logging.getLogger(name)
        old = lg.level
        lg.setLevel(logging.ERROR)
        stack.callback(lg.setLevel, old)
    stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
    return stack


def export_component(spec: ComponentSpec, path: Path, opset: int = 23, fuse: bool = True,
                     dtype: torch.dtype = torch.float32) -> dict:
    """Write `spec` to `path`; returns facts for the manifest (op counts, external data)."""
    args = spec.forward_args(_cast(spec.example(2, 0), dtype))
    names_in = [t.name for t in spec.inputs]
    names_out = [t.name for t in spec.outputs]
    try:
        with torch.no_grad(), attention_mode(spec, fuse), _quiet():
            program = torch.onnx.export(spec.module, args, dynamic_shapes=spec.dynamic_shapes(), input_names=names_in,
                                        output_names=names_out, opset_version=opset, dynamo=True,
                                        verbose=False)
    except Exception as e:
        raise ExportError(f"{spec.name}: torch.onnx.export failed: {type(e).__name__}: {e}") from e
    external = weight_bytes(spec.module) > EXTERNAL_DATA_BYTES
    program.save(str(path), external_data=external)
    try:
        onnx.checker.check_model(str(path), full_check=True)  # path form: works past 2 GB too
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{spec.name}: the exported graph fails onnx.checker: {e}") from None
    graph = onnx.load(str(path), load_external_data=False).graph
    ops = Counter(n.op_type for n in graph.node)
    return {"external_data": external, "nodes": len(graph.node),
            "attention_ops": {k: ops[k] for k in ("Attention", "MultiHeadAttention", "GroupQueryAttention", "Softmax") if ops[k]},
            "adapter_ops": {k: ops[k] for k in ("MoE", "Einsum") if ops[k]}}


def _cast(values: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: t.to(dtype) if t.is_floating_point() else t for k, t in values.items()}
