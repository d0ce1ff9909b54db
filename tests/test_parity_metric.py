"""The int8/int4 parity metric: relative RMS error per output (worst over cases) passes weight-only
quantization noise and fails a wrong graph; old records are re-judged by the metric they recorded."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from allspark.export.quantize import QuantConfig, dequantize_rows, quantize_rows
from allspark.export.specs import INT4_TOLERANCE, INT8_TOLERANCE
from allspark.export.validate import compare, failed_outputs, relative_rms, tolerance_of
from allspark.export.verify import StoredSpec
from allspark.contract.tensors import TensorSpec

K, N = 256, 64


def _graph(path, w):
    """y = x @ w (w: (K, N)) as an ONNX file."""
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", N])],
                          [numpy_helper.from_array(w.astype(np.float32), "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    path.write_bytes(m.SerializeToString())
    return path


def _setup(precision):
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.05, (K, N)).astype(np.float32)
    cases = []
    for _ in range(3):
        x = rng.normal(0, 1, (4, K)).astype(np.float32)
        cases.append({"in:x": x, "out:y": x @ w})
    spec = StoredSpec("mm", (TensorSpec("x", "float32", ("b", K)),), (TensorSpec("y", "float32", ("b", N)),),
                      {"int4": INT4_TOLERANCE, "int8": INT8_TOLERANCE})
    return w, cases, spec


@pytest.mark.parametrize("bits", [4, 8])
def test_quantization_noise_passes_a_wrong_graph_fails(tmp_path, bits):
    precision = f"int{bits}"
    w, cases, spec = _setup(precision)
    q = QuantConfig(bits=bits, block_size=32, accuracy_level=0)
    wq = dequantize_rows(*quantize_rows(w.T.copy(), q), K, q).T  # what MatMulNBits computes with
    r = compare(spec, _graph(tmp_path / "q.onnx", wq), cases, precision)
    e = r["outputs"]["y"]
    assert r["passed"] and tolerance_of(r) == ("rel_rms", spec.tolerance[precision]), r
    assert 0 < e["rel_rms"] < spec.tolerance[precision] and e["max_abs"] > 0 and e["max_rel"] > 0
    # wrong graphs: another weight of the same scale, a transposed-by-blocks one, the right one with a
    # column zeroed -- each fails, and the report names the metric and tolerance it missed
    rng = np.random.default_rng(1)
    wrong = {"other": rng.normal(0, 0.05, w.shape), "shuffled": w[rng.permutation(K)],
             "sign": -w}
    for name, bad in wrong.items():
        r = compare(spec, _graph(tmp_path / f"{name}.onnx", bad), cases, precision)
        assert not r["passed"] and r["failed"] == ["y"] and r["outputs"]["y"]["rel_rms"] > 0.9, name
        assert f"y: rel_rms" in failed_outputs(r) and f"> {spec.tolerance[precision]:g}" in failed_outputs(r)
    # quantization-sized noise on every element beyond the tolerance fails too
    scale = np.sqrt(np.mean(np.concatenate([c["out:y"] for c in cases]) ** 2))
    noisy = [{"in:x": c["in:x"], "out:y": c["out:y"] + rng.normal(0, 2 * spec.tolerance[precision] * scale,
                                                                    c["out:y"].shape).astype(np.float32)}
             for c in cases]
    assert not compare(spec, _graph(tmp_path / "w.onnx", w), noisy, precision)["passed"]


def test_old_records_keep_their_metric(tmp_path):
    """A manifest written before rel_rms recorded `tolerance_rel` (max abs / max |ref|): `verify` passes that
    metric back to `compare`, which judges and records by it."""
    w, cases, spec = _setup("int4")
    assert tolerance_of({"tolerance_rel": 0.35}) == ("max_rel", 0.35)
    assert tolerance_of({"tolerance_rms": 0.2}) == ("rel_rms", 0.2)
    assert tolerance_of({"tolerance_scaled": 0.02}) == ("max_scaled", 0.02)
    wrong = -w
    r = compare(spec, _graph(tmp_path / "g.onnx", wrong), cases, "int4", metric="max_rel")
    assert "tolerance_rel" in r and "tolerance_rms" not in r and not r["passed"]
    assert "y: max_rel" in failed_outputs(r)
    r = compare(spec, _graph(tmp_path / "g2.onnx", w), cases, "int4", metric="max_rel")
    assert r["passed"] and tolerance_of(r) == ("max_rel", INT4_TOLERANCE)


def test_relative_rms():
    ref = np.array([3.0, 4.0])
    assert relative_rms(np.array([0.3, 0.4]), ref) == pytest.approx(0.1)
    assert relative_rms(np.zeros(2), np.zeros(2)) == 0.0
    assert relative_rms(np.array([1e-3, 0]), np.zeros(2)) == float("inf")
    assert relative_rms(np.zeros(0), np.zeros(0)) == 0.0
