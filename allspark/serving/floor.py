"""The serving path's floor: the p50 round trip of a request to a model that does nothing.

`allspark bench serve` compares served requests with in-process ones; part of the difference is
Triton's (gRPC, the core, the python backend's IPC to its stub and back) and the gRPC client's,
and no serving code can go below it. This writes a one-model repository (`allspark_floor`,
decoupled, answering from a thread with a generation's outputs), starts a server on it, and times
generation-shaped requests over one kept gRPC stream, as `ServingClient` sends them."""

from __future__ import annotations

import queue
import time
from pathlib import Path

import numpy as np

from .model_config import GENERATED

MODEL = "allspark_floor"

CONFIG = f'''name: "{MODEL}"
backend: "python"
max_batch_size: 0
model_transaction_policy {{ decoupled: true }}
input {{ name: "text" data_type: TYPE_STRING dims: [1] }}
input {{ name: "max_new_tokens" data_type: TYPE_INT64 dims: [1] optional: true }}
output {{ name: "{GENERATED[0]}" data_type: TYPE_STRING dims: [1] }}
output {{ name: "{GENERATED[1]}" data_type: TYPE_INT64 dims: [-1] }}
output {{ name: "{GENERATED[2]}" data_type: TYPE_BOOL dims: [1] }}
instance_group {{ count: 1 kind: KIND_CPU }}
'''


def write_floor_repository(root: Path) -> Path:
    from .repository import SHIM

    model = root / MODEL
    (model / "1").mkdir(parents=True, exist_ok=True)
    (model / "config.pbtxt").write_text(CONFIG)
    (model / "1" / "model.py").write_text(SHIM.format(what="A model that does nothing (the serving floor).",
                                                      module="allspark.serving.models.floor"))
    return root


def round_trips(url: str, repeats: int, text: str = "describe the scene", max_new_tokens: int = 16) -> list[float]:
    """`repeats` timed round trips (ms) of one request at a time over a kept gRPC stream, each
    built from scratch as `ServingClient` builds a generation request (after 5 untimed ones)."""
    import tritonclient.grpc as g

    client = g.InferenceServerClient(url)
    events: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: events.put((result, error)))
    outputs = [g.InferRequestedOutput(n) for n in GENERATED]
    ms: list[float] = []
    try:
        for i in range(repeats + 5):
            t = time.perf_counter()
            a = g.InferInput("text", [1], "BYTES")
            a.set_data_from_numpy(np.array([text.encode()], dtype=np.object_))
            b = g.InferInput("max_new_tokens", [1], "INT64")
            b.set_data_from_numpy(np.array([max_new_tokens], np.int64))
            client.async_stream_infer(MODEL, [a, b], parameters={"ignore_eos": True, "stream_tokens": False},
                                      outputs=outputs)
            result, error = events.get(timeout=60)
            if error is not None:
                raise RuntimeError(f"{MODEL}: {error}")
            [result.as_numpy(n) for n in GENERATED]
            if i >= 5:
                ms.append(1e3 * (time.perf_counter() - t))
    finally:
        client.stop_stream()
        client.close()
    return ms


def measure(workdir: Path, repeats: int = 200) -> dict[str, float]:
    """Start a server on the floor repository and time `repeats` round trips: p50 and p99 (ms)."""
    from .server import TritonServer

    repo = write_floor_repository(workdir / "floor")
    with TritonServer(repo) as server:
        ms = round_trips(server.grpc_url, repeats)
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "requests": len(ms)}
