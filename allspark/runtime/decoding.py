"""The decode loop's state, where the backend keeps it.

`HostStepper` keeps the KV cache in host numpy arrays and sends it through `Backend.decode` every
step (any backend; the CPU path, whose memory is the host's anyway). A backend that keeps tensors on
its device instead implements `prefill_on_device` and `start_generation` (see `DeviceDecoding`):
the prefill's cache never leaves the device, and the generation runs on a `StaticCache` —
per-layer (B, kv_heads, max_len, head_dim) buffers allocated once at the generation's maximum
length and written in place, one slot per token (`StaticDecoderModule`'s contract). Only token ids
go in and next-token logits come out per step.

Device memory is torch's (CUDA tensors, or CPU tensors where tests run the same code without a
GPU): ONNX Runtime reads and writes it through IO binding on the tensors' data pointers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..contract import tensors as C
from ..errors import InputError
from .backend import Backend, DecoderOutput

SLOT_ROUNDING = 64  # a generation's max length rounds up to this, so workspaces (and graphs) are reused


@runtime_checkable
class Stepper(Protocol):
    def step(self, tokens: np.ndarray, reorder: np.ndarray | None) -> np.ndarray: ...  # -> (B, vocab)

    def close(self) -> None: ...


@runtime_checkable
class DeviceDecoding(Protocol):
    """Optional backend capability: the decode loop's cache stays on the backend's device."""

    device_resident: bool  # False: the backend can, but was loaded not to (runtime uses HostStepper)

    def prefill_on_device(self, feed: Mapping[str, np.ndarray]) -> DecoderOutput:
        """The decoder over `feed` (empty past): logits and hidden of the LAST position only, as host
        arrays, and `present` as device tensors."""

    def start_generation(self, cache: list[Any], rows: np.ndarray, mask: np.ndarray, pos: np.ndarray,
                         adapter_ids: np.ndarray, max_len: int) -> Stepper: ...


@runtime_checkable
class DeviceStages(Protocol):
    """Optional backend capability: encoder, bridge and token-embedding outputs as device tensors, so
    a device-resident prefill hands them on without host copies (request inputs go in from the host;
    `prefill_on_device` takes a feed whose `inputs_embeds` is such a tensor)."""

    def encode_on_device(self, component: str, tensors: Mapping[str, np.ndarray]) -> Any: ...

    def bridge_on_device(self, component: str, media: Any) -> Any: ...

    def embed_on_device(self, input_ids: np.ndarray) -> Any: ...


class HostStepper:
    """The decode state on the host plane: rows x (mask, positions, adapter sets, KV cache as host
    arrays) through `backend.decode` (the growing-cache graph). `step` is the host plane's one
    "advance one token"; `Runtime._generate` and the scheduler drive it, the scheduler also
    `join`s new rows and `keep`s the rows still running."""

    def __init__(self, backend: Backend, past_names: Sequence[str], past: list[np.ndarray], mask: np.ndarray,
                 pos: np.ndarray, adapter_ids: np.ndarray):
        self.backend, self.names = backend, tuple(past_names)
        self.past, self.mask, self.pos, self.ids = past, mask, pos, adapter_ids

    def step(self, tokens: np.ndarray, reorder: np.ndarray | None) -> np.ndarray:
        if reorder is not None:  # beam search: follow each beam's parent
            self.past = [p[reorder] for p in self.past]
        self.mask = np.concatenate([self.mask, np.ones((len(tokens), 1), np.int64)], 1)
        self.pos = self.pos + 1
        feed = {C.INPUTS_EMBEDS: self.backend.embed(tokens[:, None]), C.ATTENTION_MASK: self.mask,
                C.POSITION_IDS: self.pos, C.ADAPTER_IDS: self.ids, **dict(zip(self.names, self.past))}
        out = self.backend.decode(feed)
        self.past = out.present
        return out.logits[:, -1]

    def join(self, past: list[np.ndarray], mask: np.ndarray, pos: np.ndarray, adapter_ids: np.ndarray) -> None:
        """New rows after the current ones; the shorter side is left-padded (masked) to one length."""
        P = max(self.mask.shape[1], mask.shape[1])
        self.past = [np.concatenate([_left_pad(x, P, 2), _left_pad(y, P, 2)]) for x, y in zip(self.past, past)]
        self.mask = np.concatenate([_left_pad(self.mask, P, 1), _left_pad(mask, P, 1)])
        self.pos, self.ids = np.concatenate([self.pos, pos]), np.concatenate([self.ids, adapter_ids])

    def keep(self, rows: Sequence[int]) -> None:
        """Only `rows` (non-empty), and no leading cache column that is padding for all of them."""
        k = np.asarray(rows)
        self.mask, self.pos, self.ids = self.mask[k], self.pos[k], self.ids[k]
        self.past = [p[k] for p in self.past]
        used = np.flatnonzero(self.mask.any(0))
        start = int(used[0]) if used.size else 0
        if start:
            self.mask = self.mask[:, start:]
            self.past = [p[:, :, start:] for p in self.past]

    def close(self) -> None:
        self.past = []


def _left_pad(a: np.ndarray, length: int, axis: int) -> np.ndarray:
    extra = length - a.shape[axis]
    if extra <= 0:
        return a
    pad = [(0, 0)] * a.ndim
    pad[axis] = (extra, 0)
    return np.pad(a, pad)


def rounded_max_len(needed: int, limit: int) -> int | None:
    """The static cache's length for `needed` positions (rounded up, so workspaces are shared), or
    None past the model's limit: such a generation runs on host arrays (`HostStepper`), as on CPU."""
    if needed > limit:
        return None
    return min(limit, -(-needed // SLOT_ROUNDING) * SLOT_ROUNDING)


def host_arrays(cache: list[Any], rows: np.ndarray) -> list[np.ndarray]:
    """`rows` of a cache as host arrays, whether it is host arrays or device tensors."""
    out = []
    for c in cache:
        x = c[rows] if isinstance(c, np.ndarray) else c.index_select(0, _index(c, rows))
        out.append(x if isinstance(x, np.ndarray) else x.float().cpu().numpy())
    return out


def _index(t: Any, rows: np.ndarray) -> Any:
    import torch

    return torch.as_tensor(np.asarray(rows), dtype=torch.int64, device=t.device)


class StaticCache:
    """One generation's device state: KV buffers at their maximum length, the (B, max_len) mask of
    valid slots, positions, adapter ids, and the number of slots written (`length`)."""

    def __init__(self, torch_mod: Any, batch: int, max_len: int, kv_shape: tuple[int, int], num_tensors: int,
                 dtype: Any, device: Any):
        t = self.torch = torch_mod
        kv_heads, head_dim = kv_shape
        self.batch, self.max_len = batch, max_len
        self.kv = [t.zeros(batch, kv_heads, max_len, head_dim, dtype=dtype, device=device) for _ in range(num_tensors)]
        self.mask = t.zeros(batch, max_len, dtype=t.int64, device=device)
        self.pos = t.zeros(batch, 1, dtype=t.int64, device=device)
        self.ids = t.zeros(batch, dtype=t.int64, device=device)
        self.cache_position = t.zeros(1, dtype=t.int64, device=device)
        self.tokens = t.zeros(batch, 1, dtype=t.int64, device=device)
        self.length = 0

    def load(self, cache: list[Any], rows: np.ndarray, mask: np.ndarray, pos: np.ndarray, adapter_ids: np.ndarray) -> None:
        """The prefill's cache (device tensors, all prefill rows) for `rows`, written into slots [0, P)."""
        t = self.torch
        P = mask.shape[1]
        if P >= self.max_len:
            raise InputError("generation", "prompt length", f"< {self.max_len}", str(P))
        idx = t.as_tensor(np.asarray(rows), dtype=t.int64, device=self.kv[0].device)
        for buf, c in zip(self.kv, cache):
            buf[:, :, :P].copy_(c.index_select(0, idx))
            buf[:, :, P:].zero_()
        self.mask.zero_()
        self.mask[:, :P].copy_(t.as_tensor(mask, dtype=t.int64))
        self.pos.copy_(t.as_tensor(pos, dtype=t.int64))
        self.ids.copy_(t.as_tensor(adapter_ids, dtype=t.int64))
        self.length = P

    def advance(self, tokens: np.ndarray, reorder: np.ndarray | None) -> None:
        """Before a step: follow beam parents, mark the next slot valid, move positions on."""
        t = self.torch
        if reorder is not None:
            r = t.as_tensor(np.asarray(reorder), dtype=t.int64, device=self.mask.device)
            for buf in self.kv:
                buf.copy_(buf.index_select(0, r))
            for x in (self.mask, self.pos, self.ids):
                x.copy_(x.index_select(0, r))
        if self.length >= self.max_len:
            raise InputError("generation", "decode steps", f"at most {self.max_len} cached positions", "more")
        self.tokens.copy_(t.as_tensor(np.asarray(tokens, np.int64).reshape(-1, 1)))
        self.mask[:, self.length] = 1
        self.pos += 1
        self.cache_position.fill_(self.length)

    def written(self) -> None:
        self.length += 1


class CachePool:
    """Workspaces (a `StaticCache` and whatever the backend keeps with it, e.g. a CUDA graph) by
    (batch, max_len), reused across generations; one generation holds one at a time. At most `keep`
    idle workspaces in all (each holds a whole KV cache: a base-size one at batch 8 and 2048
    positions is 0.7 GB); the least recently returned go first."""

    def __init__(self, make: Callable[[int, int], Any], keep: int = 8):
        self.make, self.keep = make, keep
        self.free: dict[tuple[int, int], list[Any]] = {}
        self.order: list[Any] = []  # idle workspaces, least recently returned first
        self.lock = threading.Lock()

    def acquire(self, batch: int, max_len: int) -> Any:
        with self.lock:
            stack = self.free.get((batch, max_len))
            if stack:
                work = stack.pop()
                self.order.remove(work)
                return work
        return self.make(batch, max_len)

    def release(self, work: Any) -> None:
        key = (work.cache.batch, work.cache.max_len)
        with self.lock:
            self.free.setdefault(key, []).append(work)
            self.order.append(work)
            while len(self.order) > self.keep:
                old = self.order.pop(0)
                self.free[(old.cache.batch, old.cache.max_len)].remove(old)


def start_static(pool: CachePool, cache: list[Any], rows: np.ndarray, mask: np.ndarray, pos: np.ndarray,
                 adapter_ids: np.ndarray, max_len: int) -> "StaticStepper":
    """A pooled workspace loaded with the prefill's cache for `rows`, stepped by a `StaticStepper`."""
    work = pool.acquire(len(rows), max_len)
    try:
        work.cache.load(cache, rows, mask, pos, adapter_ids)
    except Exception:
        pool.release(work)
        raise
    return StaticStepper(pool, work)


class StaticStepper:
    """Steps a pooled workspace: `work.run()` runs one decode step on `work.cache` and returns the
    next-token logits as a device tensor (B, vocab)."""

    def __init__(self, pool: CachePool, work: Any):
        self.pool, self.work = pool, work

    def step(self, tokens: np.ndarray, reorder: np.ndarray | None) -> np.ndarray:
        cache = self.work.cache
        cache.advance(tokens, reorder)
        logits = self.work.run()
        cache.written()
        return np.array(logits.float().cpu().numpy(), copy=True)  # (on CPU a view of the pooled workspace)

    def close(self) -> None:
        if self.work is not None:
            self.pool.release(self.work)
            self.work = None
