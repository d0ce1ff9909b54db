"""The streamed export: a component's graph traced on fake parameters, its weights then written from
the checkpoint one tensor at a time -- quantized as they go for int4/int8 builds.

    spec (module with meta parameters)
      -> trace: parameters as fake tensors, torch.onnx.export(optimize=False); parameter
         initializers have no values, every other constant is folded and the graph fused
         (onnxscript's optimizer + ONNX fusions, as the exporter does)
      -> write_graph: per parameter, in graph order --
           Transpose(W) -> MatMul(A, .)      MatMulNBits(A, Wq, scales)       (W: N x K, a Linear)
           Gemm(A, W, C, transB=1)           MatMulNBits(A, Wq, scales) + C
           MatMul(A, W)                      MatMulNBits(A, (W^T)q, scales)
           MoE(x, route, W1, b1, W2, b2)     QMoE(x, route, W1q, s1, b1, W2q, s2, b2)
           Gather(E, ids) in embed_tokens    Cast(Gather(E16, ids), float)   (the embedding table:
                                             half the bytes, rounding far under int4/int8 noise)
           anything else                     the tensor as fp32
         appended to `<graph>.onnx.data` as it is read (inline under 128 MB)

What it bounds: the export's memory is the graph's structure plus one tensor (the largest, the
embedding table or an adapter layer's stacked sets), never a component's weights -- a 7B decoder is
written in < 1 GB. Parity needs real weights: the caller materializes only what it checks
(`allspark.model.skeleton.materialized`; the decoder of a big model through its reduced-depth twin).
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from ..contract.tensors import Kind
from ..model.skeleton import fake_parameters
from .onnx_export import EXTERNAL_DATA_BYTES, ExportError, _quiet, attention_mode
from .quantize import HEAD_MIN_ELEMENTS, QuantConfig, quantize_experts, quantize_rows
from .specs import ComponentSpec

log = logging.getLogger("allspark")
MS = "com.microsoft"
_ALIGN = 64  # external data offsets: aligned for memory-mapped loading


def trace(spec: ComponentSpec, names: dict[int, str], opset: int, fuse: bool,
          dtype: torch.dtype = torch.float32) -> tuple[onnx.ModelProto, dict[str, str]]:
    """`spec`'s graph with its parameters as named holes: (graph without their values, graph
    initializer name -> the parameter's name in the model, `names` being id(meta parameter) -> name)."""
    import onnx_ir as ir
    import onnxscript.optimizer
    import onnxscript.rewriter.onnx_fusions
    from torch._subclasses.fake_tensor import FakeTensor

    by_local = {n: names[id(p)] for n, p in spec.module.named_parameters(remove_duplicate=False) if id(p) in names}
    args = spec.forward_args({k: t.to(dtype) if t.is_floating_point() else t for k, t in spec.example(2, 0).items()})
    try:
        with torch.no_grad(), attention_mode(spec, fuse), fake_parameters(spec.module, dtype), _quiet():
            program = torch.onnx.export(spec.module, args, dynamic_shapes=spec.dynamic_shapes(),
                                        input_names=[t.name for t in spec.inputs],
                                        output_names=[t.name for t in spec.outputs],
                                        opset_version=opset, dynamo=True, verbose=False, optimize=False)
    except Exception as e:
        raise ExportError(f"{spec.name}: torch.onnx.export failed: {type(e).__name__}: {e}") from e
    model = program.model
    params: dict[str, str] = {}
    for name, value in list(model.graph.initializers.items()):
        if isinstance(getattr(value.const_value, "raw", None), FakeTensor):
            if name not in by_local:
                raise ExportError(f"{spec.name}: graph initializer {name!r} is no parameter of the component")
            params[name] = by_local[name]
            value.const_value = None  # a hole: never folded, filled by write_graph
    with _quiet():
        onnxscript.optimizer.optimize_ir(model)
        onnxscript.rewriter.onnx_fusions.fuse(model)
        for name in params:
            if name in model.graph.initializers:
                model.graph.initializers.pop(name)
        proto = ir.serde.serialize_model(model)
    used = {i for n in proto.graph.node for i in n.input}
    return proto, {k: v for k, v in params.items() if k in used}


class _Plan:
    """Which nodes change and how, decided from the graph's structure alone (before any weight is read)."""

    def __init__(self, nodes: list[onnx.NodeProto], params: dict[str, str], shapes: dict[str, tuple[int, ...]],
                 quant: QuantConfig | None, kind: Kind):
        self.quant, self.kind = quant, kind
        self.linear: dict[str, str] = {}  # param -> "rows" (N, K as stored) or "cols" (K, N: MatMul B)
        self.folded: dict[str, str] = {}  # param -> the Transpose output it is written as, transposed
        self.moe: dict[str, onnx.NodeProto] = {}  # MoE node name -> node, both weights quantized
        self.half: set[str] = set()  # tables only gathered from: stored fp16, the gathered rows cast back
        # position of a node in `nodes` -> its replacement (empty: removed). (Positions, not ids:
        # protobuf's python wrappers of repeated fields are not stable objects.)
        self.replaced: dict[int, list[onnx.NodeProto]] = {}
        users: dict[str, list[tuple[int, int]]] = defaultdict(list)  # value -> (node position, input index)
        self.nodes = nodes
        for k, n in enumerate(nodes):
            for i, x in enumerate(n.input):
                users[x].append((k, i))
        if quant is None:  # fp32/fp16: fold Transpose(W) into W^T, as the exporter's optimizer does
            for p in params:
                uses = users[p]
                if len(uses) == 1 and nodes[uses[0][0]].op_type == "Transpose" and _perm(nodes[uses[0][0]]) == [1, 0]:
                    self.replaced[uses[0][0]] = []
                    self.folded[p] = nodes[uses[0][0]].output[0]
            return
        for p in params:
            if len(shapes[p]) == 2 and self._pays(shapes[p], p):
                self._linear(p, users)
        for k, n in enumerate(nodes):
            if n.op_type == "MoE" and n.domain == MS and quant.adapters:
                self._experts(k, params, shapes)
        if kind == Kind.EMBED_TOKENS:
            for p in params:
                if p not in self.linear and len(shapes[p]) == 2:
                    self._gathered(p, users[p])

    def _pays(self, shape: tuple[int, ...], p: str) -> bool:
        return self.kind != Kind.HEAD or shape[0] * shape[1] >= HEAD_MIN_ELEMENTS

    def _linear(self, p: str, users) -> None:
        N = self.nodes
        uses = users[p]
        # Transpose(W) feeding only MatMuls as their B: a Linear layer, W stored (N, K)
        if uses and all(N[t].op_type == "Transpose" and _perm(N[t]) == [1, 0] for t, _ in uses):
            matmuls = [(m, i) for t, _ in uses for m, i in users[N[t].output[0]]]
            if matmuls and all(N[m].op_type == "MatMul" and i == 1 for m, i in matmuls):
                for t, _ in uses:
                    self.replaced[t] = []
                for m, _ in matmuls:
                    self.replaced[m] = [self._nbits(N[m].input[0], p, N[m].output[0], N[m].name)]
                self.linear[p] = "rows"
                return
        if uses and all(N[k].op_type == "Gemm" and i == 1 and _attr(N[k], "transB", 0) == 1
                        and _attr(N[k], "transA", 0) == 0 and _attr(N[k], "alpha", 1.0) == 1.0
                        and _attr(N[k], "beta", 1.0) == 1.0 for k, i in uses):
            for k, _ in uses:
                n = N[k]
                out = n.output[0] if len(n.input) < 3 else f"{n.output[0]}_nobias"
                new = [self._nbits(n.input[0], p, out, n.name)]
                if len(n.input) >= 3 and n.input[2]:
                    new.append(helper.make_node("Add", [out, n.input[2]], [n.output[0]], name=f"{n.name}_bias"))
                self.replaced[k] = new
            self.linear[p] = "rows"
            return
        if uses and all(N[k].op_type == "MatMul" and i == 1 for k, i in uses):
            for k, _ in uses:
                self.replaced[k] = [self._nbits(N[k].input[0], p, N[k].output[0], N[k].name)]
            self.linear[p] = "cols"

    def _gathered(self, p: str, uses) -> None:
        """A table read only by Gather as its data (the token embedding): kept fp16, each Gather's rows
        cast back to fp32, so the graph's outputs keep their type (a 262 MB smaller build and device copy at
        paper size; on CPU the mapped table was never resident beyond the rows read)."""
        N = self.nodes
        if not uses or not all(N[k].op_type == "Gather" and i == 0 and k not in self.replaced for k, i in uses):
            return
        for k, _ in uses:
            n = N[k]
            half = f"{n.output[0]}_fp16"
            gather = helper.make_node("Gather", [n.input[0], n.input[1]], [half], name=n.name,
                                      axis=_attr(n, "axis", 0))
            self.replaced[k] = [gather, helper.make_node("Cast", [half], [n.output[0]], name=f"{n.name}_fp32",
                                                         to=TensorProto.FLOAT)]
        self.half.add(p)

    def _nbits(self, a: str, p: str, out: str, name: str) -> onnx.NodeProto:
        return helper.make_node("MatMulNBits", [a, f"{p}.q{self.quant.bits}", f"{p}.scales"], [out],
                                name=f"{name}_nbits", domain=MS)  # K, N, bits... set once the weight is read

    def _experts(self, k: int, params: dict[str, str], shapes) -> None:
        n = self.nodes[k]
        w1, w2 = n.input[2], n.input[4]
        if w1 not in params or w2 not in params:
            return
        (_, r, h), bs = shapes[w1], self.quant.block_size
        if h % bs or r % bs:  # QMoE's block-wise form needs both widths in whole blocks
            log.info("%s: adapter widths %d/%d are not multiples of the block size %d: kept as MoE", n.name, h, r, bs)
            return
        self.moe[n.name] = n
        ins = [n.input[0], n.input[1], f"{w1}.q{self.quant.bits}", f"{w1}.scales", n.input[3],
               f"{w2}.q{self.quant.bits}", f"{w2}.scales", n.input[5]]
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}
        self.replaced[k] = [helper.make_node("QMoE", ins, list(n.output), name=f"{n.name}_q", domain=MS, **attrs,
                                                 expert_weight_bits=self.quant.bits, block_size=bs,
                                                 accuracy_level=self.quant.accuracy_level)]
        self.linear[w1] = self.linear[w2] = "experts"


def _perm(n: onnx.NodeProto) -> list[int] | None:
    return next((list(a.ints) for a in n.attribute if a.name == "perm"), None)


def _attr(n: onnx.NodeProto, name: str, default):
    a = next((a for a in n.attribute if a.name == name), None)
    return default if a is None else helper.get_attribute_value(a)


class _DataWriter:
    """Initializers written as they come: appended to one external-data file, or kept inline."""

    def __init__(self, path: Path, external: bool):
        self.path, self.external = path, external
        self.file = open(f"{path}.data", "wb") if external else None
        self.bytes = 0

    def tensor(self, name: str, array: np.ndarray) -> TensorProto:
        array = np.ascontiguousarray(array)
        self.bytes += array.nbytes
        if not self.external:
            return numpy_helper.from_array(array, name)
        t = TensorProto(name=name, dims=list(array.shape), data_type=helper.np_dtype_to_tensor_dtype(array.dtype))
        pad = -self.file.tell() % _ALIGN
        self.file.write(b"\0" * pad)
        offset = self.file.tell()
        self.file.write(memoryview(array).cast("B"))
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", Path(f"{self.path}.data").name), ("offset", str(offset)),
                     ("length", str(array.nbytes))):
            t.external_data.add(key=k, value=v)
        return t

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def write_graph(proto: onnx.ModelProto, params: dict[str, str], read: Callable[[str], torch.Tensor],
                shapes: dict[str, tuple[int, ...]], path: Path, kind: Kind, quant: QuantConfig | None = None,
                progress: Callable[[], None] | None = None, dtype: type = np.float32) -> dict:
    """Fill `proto`'s parameter holes from `read` (model name -> tensor, one at a time), quantizing
    where `quant` says (else as `dtype`), and save it to `path` (+ `.data`). Returns facts for the
    manifest."""
    g = proto.graph
    plan = _Plan(list(g.node), params, shapes, quant, kind)
    external = sum(int(np.prod(s)) * np.dtype(dtype).itemsize for s in shapes.values()) > EXTERNAL_DATA_BYTES
    out = _DataWriter(path, external)
    nbits_of: dict[str, list[onnx.NodeProto]] = defaultdict(list)  # param -> its MatMulNBits nodes
    nodes = []
    for k, n in enumerate(plan.nodes):
        new = plan.replaced.get(k, [n])
        for m in new:
            if m.op_type == "MatMulNBits":
                nbits_of[m.input[1].rsplit(".q", 1)[0]].append(m)
        nodes += new
    inits = []
    try:
        for p, name in params.items():  # graph order: the data file reads front to back
            t = read(name)
            if tuple(t.shape) != tuple(shapes[p]):
                raise ExportError(f"{path.stem}: {name}: expected shape {tuple(shapes[p])}, got {tuple(t.shape)}")
            w = t.float().numpy() if t.is_floating_point() else t.numpy()
            del t
            how = plan.linear.get(p)
            if p in plan.folded:
                inits.append(out.tensor(plan.folded[p], np.ascontiguousarray(w.T).astype(dtype)))
            elif how in ("rows", "cols"):
                w = w if how == "rows" else w.T
                packed, scales = quantize_rows(w, quant)
                for m in nbits_of[p]:
                    m.attribute.extend([helper.make_attribute(k, v) for k, v in (
                        ("K", w.shape[1]), ("N", w.shape[0]), ("bits", quant.bits),
                        ("block_size", quant.block_size), ("accuracy_level", quant.accuracy_level))])
                inits += [out.tensor(f"{p}.q{quant.bits}", packed), out.tensor(f"{p}.scales", scales)]
            elif p in plan.half:
                inits.append(out.tensor(p, w.astype(np.float16)))
            elif how == "experts":
                packed, scales = quantize_experts(w, quant)
                inits += [out.tensor(f"{p}.q{quant.bits}", packed), out.tensor(f"{p}.scales", scales)]
            else:
                inits.append(out.tensor(p, w.astype(dtype) if w.dtype.kind == "f" else w))
            del w
            if progress is not None:
                progress()
    finally:
        out.close()
    g.ClearField("node")
    g.node.extend(nodes)
    g.initializer.extend(inits)
    _drop_unused(g)
    if any(n.domain == MS for n in g.node) and not any(o.domain == MS for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(MS, 1))
    onnx.save(proto, str(path))
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{path.stem}: the written graph fails onnx.checker: {e}") from None
    ops = Counter(n.op_type for n in g.node)
    facts = {"external_data": external, "nodes": len(g.node), "streamed": True,
             "attention_ops": {k: ops[k] for k in ("Attention", "MultiHeadAttention", "GroupQueryAttention", "Softmax")
                               if ops[k]},
             "adapter_ops": {k: ops[k] for k in ("MoE", "QMoE", "Einsum") if ops[k]}}
    if quant is not None:
        facts["quantization"] = {**quant.to_json(), "matmul_nbits": ops["MatMulNBits"], "qmoe": ops["QMoE"],
                                 "matmul_kept": ops["MatMul"] + ops["Gemm"], "weights_quantized": len(plan.linear),
                                 "tables_fp16": len(plan.half)}
    return facts


def _drop_unused(g: onnx.GraphProto) -> None:
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    keep = [t for t in g.initializer if t.name in used]
    g.ClearField("initializer")
    g.initializer.extend(keep)
