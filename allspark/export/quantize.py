"""int8 graphs: ONNX Runtime's dynamic quantization of the MatMul weights.

Chosen over optimum's `ORTQuantizer`: optimum wraps this same `onnxruntime.quantization` call for
graphs it exported itself (it wants a transformers model type and its own ONNX config), while our
graphs are our own exports with com.microsoft ops (Attention, MoE), which the plain API leaves as
they are. Weights become int8 (per tensor, symmetric), activations are quantized per call, so no
calibration data is needed; inputs and outputs stay fp32. Gathers (token embeddings), the MoE
op's adapter weights and norms keep their fp32 weights.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError


def quantize_int8(src: Path, dst: Path) -> dict:
    """`src` (fp32 ONNX, with any external data beside it) -> `dst` quantized; `src` is removed."""
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as e:  # pragma: no cover - onnxruntime always ships it
        raise ConfigError(f"int8 export needs onnxruntime.quantization ({e})") from None
    import onnx

    size = sum(p.stat().st_size for p in (src, Path(f"{src}.data")) if p.exists())
    # the quantizer re-runs ONNX's strict shape inference, which rejects some of the exporter's own
    # intermediate shape annotations (e.g. a broadcast dim recorded as 1): drop them, it infers anew
    model = onnx.load(str(src), load_external_data=False)
    del model.graph.value_info[:]
    onnx.save(model, str(src))
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
                     use_external_data_format=size > 1_900_000_000)  # protobuf's 2 GB limit
    for p in (src, Path(f"{src}.data")):
        if p.exists():
            os.remove(p)

    ops: dict[str, int] = {}
    for n in onnx.load(str(dst), load_external_data=False).graph.node:
        if n.op_type in ("MatMulInteger", "DynamicQuantizeLinear", "MatMul", "Gemm"):
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return {"method": "onnxruntime.quantization.quantize_dynamic", "weight_type": "QInt8", "ops": ops}
