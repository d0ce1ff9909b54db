"""CUDA graphs of a request's stages on the torch backend: encoder, bridge and prefill.

Eager, one paper-size RGB request is host-bound (2026-12-04, H200: EVA-g 12.3 ms and the 7B prefill
~50 ms of launches, against ~3 and ~6 ms of device work). A stage is captured once per input
signature (each input's shape and dtype) and replayed after: inputs are copied into the graph's
own buffers, outputs copied out (a later replay, another thread's, overwrites the graph's).

A signature is captured the `warm`-th time it is seen (default 2): capturing the 7B prefill costs
~2 s, which a shape seen once should not pay. At most `limit` graphs are kept, and at most
`max_bytes` of their inputs and outputs (least recently used goes first: each also holds its
activation memory; an evicted signature counts its sightings from zero again). A stage whose
capture fails (an op that needs the host, e.g. a data-dependent shape; or memory) runs eagerly for
that signature from then on; `failures` says why. `warmup` is a context the warm-up and capture
run in (the torch backend's: adapters take their capturable path). Captures hold the replay lock:
they are rare, and the GPU is busy with them anyway.
The torch backend pads prefill lengths to a multiple of `PREFILL_BUCKET` so prompts of nearby
lengths share one graph.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from typing import Any, Callable, Hashable, Sequence


PREFILL_BUCKET = 32  # prefill lengths are left-padded to a multiple of this under stage graphs
MAX_BYTES = 8 << 30  # the kept graphs' inputs and outputs (a 7B prefill at 8 x 1024 keeps 4 GB of cache)
_SEEN_LIMIT = 4096  # signatures counted before the count starts over (bounded memory)


def bucketed(n: int, bucket: int = PREFILL_BUCKET) -> int:
    return -(-n // bucket) * bucket


class StageGraphs:
    def __init__(self, torch: Any, limit: int, capture_lock: threading.Lock, warm: int = 2,
                 max_bytes: int = MAX_BYTES, warmup: Callable[[], Any] = contextlib.nullcontext):
        self.torch, self.limit, self.warm, self._capture_lock = torch, limit, warm, capture_lock
        self.max_bytes, self._warmup = max_bytes, warmup
        self._graphs: OrderedDict[Hashable, tuple[Any, list, tuple]] = OrderedDict()
        self._bytes: dict[Hashable, int] = {}
        self._seen: dict[Hashable, int] = {}
        self.failures: dict[Hashable, str] = {}
        self._lock = threading.Lock()  # one replay at a time: the graph's buffers are shared
        self.captures = 0

    def __len__(self) -> int:
        return len(self._graphs)

    def run(self, name: str, fn: Callable[..., tuple], inputs: Sequence[Any]) -> tuple:
        """`fn(*inputs)` (a tuple of tensors) by graph replay; eager where capture failed."""
        key = (name, *((tuple(t.shape), t.dtype) for t in inputs))
        with self._lock:
            entry = self._graphs.get(key)
            if entry is None and key not in self.failures and self._sighting(key) >= self.warm:
                entry = self._capture(key, fn, inputs)
            if entry is not None:
                self._graphs.move_to_end(key)
                graph, static, outputs = entry
                for s, t in zip(static, inputs):
                    s.copy_(t)
                graph.replay()
                return tuple(o.clone() for o in outputs)
        with self.torch.no_grad():
            return fn(*inputs)

    def _sighting(self, key: Hashable) -> int:
        if len(self._seen) >= _SEEN_LIMIT:
            self._seen.clear()
        self._seen[key] = n = self._seen.get(key, 0) + 1
        return n

    def _capture(self, key: Hashable, fn: Callable[..., tuple], inputs: Sequence[Any]):
        torch = self.torch
        static = [t.clone() for t in inputs]
        try:
            with self._capture_lock, self._warmup():
                # warm-up on a side stream, as torch.cuda.graphs asks (compiles kernels, sizes workspaces)
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side), torch.no_grad():
                    for _ in range(2):
                        fn(*static)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.no_grad(), torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    outputs = tuple(fn(*static))
        except Exception as e:  # eager for this signature from now on, and why
            self.failures[key] = f"{type(e).__name__}: {e}"[:300]
            torch.cuda.synchronize()
            return None
        self.captures += 1
        self._graphs[key] = (graph, static, outputs)
        self._bytes[key] = sum(t.numel() * t.element_size() for t in (*static, *outputs))
        while len(self._graphs) > 1 and (len(self._graphs) > self.limit or sum(self._bytes.values()) > self.max_bytes):
            old, _ = self._graphs.popitem(last=False)
            del self._bytes[old]
            self._seen.pop(old, None)  # seen `warm` times again before it is captured again
        return self._graphs[key]
