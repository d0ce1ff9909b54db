"""What the benchmark ran on, and the machine's measured matmul peak in the same run.

Efficiency numbers compare each component's achieved GFLOP/s with a dense fp32 matmul timed in
the same process, so "how far from the limit" refers to this machine as it was at that moment
(other load included), not to a datasheet.
"""

from __future__ import annotations

import os
import platform
import statistics
import time

import numpy as np


def machine_info() -> dict:
    import onnxruntime
    import torch

    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
        "ort_providers": onnxruntime.get_available_providers(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available",
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def best_seconds(fn, repeat: int) -> float:
    """The fastest of `repeat` timed calls, after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_peak_gflops(n: int = 1024, repeat: int = 7) -> dict:
    """Best-of dense fp32 matmul throughput via torch (MKL/oneDNN) and ONNX Runtime."""
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper

    a = torch.randn(n, n)
    b = torch.randn(n, n)
    flops = 2.0 * n ** 3

    def best(fn) -> float:
        return flops / best_seconds(fn, repeat) / 1e9

    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "mm",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n]),
                               helper.make_tensor_value_info("b", TensorProto.FLOAT, [n, n])],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    an, bn = a.numpy(), b.numpy()
    torch_g = best(lambda: torch.mm(a, b))
    ort_g = best(lambda: sess.run(None, {"a": an, "b": bn}))
    return {"n": n, "torch_gflops": round(torch_g, 1), "onnxruntime_gflops": round(ort_g, 1),
            "peak_gflops": round(max(torch_g, ort_g), 1)}


def summarize(samples_ms: list[float]) -> dict:
    s = sorted(samples_ms)
    return {"median_ms": statistics.median(s), "p90_ms": float(np.percentile(s, 90)), "n": len(s)}


def rss_mb() -> tuple[float, float]:
    """(current RSS, high-water mark) of this process in MB, from /proc."""
    cur = hwm = 0.0
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
    except OSError:
        pass
    return cur, hwm


def memory_bandwidth_gbs(mb: int = 512, repeat: int = 5) -> dict:
    """Best-of host memory bandwidth with torch's threads: a streaming read (sum) and a copy (read +
    write counted), over buffers far larger than the caches; the ceiling a weight-streaming decode
    step is compared with."""
    import torch

    n = (mb << 20) // 4
    a, b = torch.ones(n), torch.empty(n)

    read = a.numel() * 4 / best_seconds(lambda: a.sum(), repeat) / 1e9
    copy = 2 * a.numel() * 4 / best_seconds(lambda: b.copy_(a), repeat) / 1e9
    return {"buffer_mb": mb, "read_gbs": round(read, 1), "copy_gbs": round(copy, 1)}
