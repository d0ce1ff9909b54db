"""The decode state: rows x KV cache on a plane, the one thing every generation path steps.

    join(owners, cache, rows, mask, pos, ids)   a prefill's rows into free slots (more if none is free)
    step(tokens, reorder) -> logits             one token for every row: (rows, vocab) on the host
    drop(slots)                                 slots freed (their rows leave when it pays)
    close()

`Runtime.generate` (a batch of rows, beams reordered by `step`), the serving `GenerationScheduler`
(streams joining and leaving between steps) and the decode benchmarks drive it; `TokenPicker`
chooses the tokens. One implementation per plane:

  host plane    `GrowingState` over host arrays and `Backend.decode` (the growing-cache graph: any
                backend, the CPU path; also device tensors where a device build lacks the static graph)
  device plane  `SlotState` over a `StaticCache`: per-layer (B, kv_heads, max_len, head_dim)
                buffers allocated once per workspace and written in place, one column per step
                (`StaticDecoderModule`'s contract); only token ids go in and logits come out.

Device memory is torch's (CUDA tensors, or CPU tensors where tests run the same code without a
GPU): ONNX Runtime reads and writes it through IO binding on the tensors' data pointers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..contract import tensors as C
from ..errors import BackendError, InputError
from .backend import Backend, DecoderOutput

SLOT_ROUNDING = 64  # a generation's max length rounds up to this, so workspaces (and graphs) are reused


@runtime_checkable
class DecodeState(Protocol):
    occupants: list[Any]  # per row: its owner, or None (a free slot)

    def step(self, tokens: np.ndarray, reorder: np.ndarray | None) -> np.ndarray: ...  # -> (rows, vocab)

    def join(self, owners: Sequence[Any], cache: list[Any], rows: np.ndarray, mask: np.ndarray, pos: np.ndarray,
             adapter_ids: np.ndarray, budgets: Sequence[int] | None = None) -> None: ...

    def drop(self, slots: Sequence[int]) -> None: ...

    def claim(self, owners: Sequence[Any], budgets: Sequence[int] | None = None) -> None: ...  # every row's owner

    def close(self) -> None: ...


@runtime_checkable
class DeviceDecoding(Protocol):
    """Optional backend capability: the decode loop's cache stays on the backend's device."""

    device_resident: bool  # False: the backend can, but was loaded not to (runtime uses the host plane)

    def prefill_on_device(self, feed: Mapping[str, np.ndarray]) -> DecoderOutput:
        """The decoder over `feed` (empty past): logits and hidden of the LAST position only, as host
        arrays, and `present` as device tensors."""

    def start_generation(self, cache: list[Any], rows: np.ndarray, mask: np.ndarray, pos: np.ndarray,
                         adapter_ids: np.ndarray, max_len: int, limit: int | None = None) -> DecodeState:
        """The device plane's state for `rows` of a prefill's device `cache`, `max_len` columns
        (growing to `limit` if joins need more)."""


@runtime_checkable
class DeviceStages(Protocol):
    """Optional backend capability: encoder, bridge and token-embedding outputs as device tensors, so
    a device-resident prefill hands them on without host copies (request inputs go in from the host;
    `prefill_on_device` takes a feed whose `inputs_embeds` is such a tensor)."""

    def encode_on_device(self, component: str, tensors: Mapping[str, np.ndarray]) -> Any: ...

    def bridge_on_device(self, component: str, media: Any) -> Any: ...

    def embed_on_device(self, input_ids: np.ndarray) -> Any: ...


class GrowingState:
    """The decode state over the growing-cache decoder graph: rows x (mask, positions, adapter sets,
    KV cache) as host numpy arrays (any backend, through `Backend.decode`: the CPU path) or device
    tensors (`DevicePlane` without a static-cache graph); the graph returns each step's grown cache.

    Rows are slots: `occupants[i]` owns row i (None: free). `join` writes new rows into free slots in
    place (right-aligned to the cache's length, the left part masked), adding rows only when none is
    free and columns only when a prompt is longer than the cache; `drop` frees slots, and the rows are
    gathered (and all-padding leading columns trimmed) only once more than half of them are free."""

    def __init__(self, run: Callable[..., tuple[np.ndarray, list[Any]]], take: Callable[[list[Any], np.ndarray], list[Any]],
                 past: list[Any], mask: Any, pos: Any, adapter_ids: Any, owners: Sequence[Any] | None = None,
                 limit: int | None = None):
        self.run, self.take, self.limit = run, take, limit
        self.past, self.mask, self.pos, self.ids = past, mask, pos, adapter_ids
        self.occupants: list[Any] = list(owners) if owners is not None else [True] * len(mask)

    def step(self, tokens: np.ndarray, reorder: np.ndarray | None) -> np.ndarray:
        """One token for every row (free rows: any token) -> next-token logits (rows, vocab), host."""
        if reorder is not None:  # beam search: follow each beam's parent
            r = [int(i) for i in np.asarray(reorder)]
            self.past = [p[r] for p in self.past]
            self.mask, self.pos, self.ids = self.mask[r], self.pos[r], self.ids[r]
        if self.limit is not None and self.mask.shape[1] >= self.limit:
            raise BackendError(f"generation: more than {self.limit} cached positions")
        self.mask = _cat([self.mask, _ones_like(self.mask, (len(tokens), 1))], 1)
        self.pos = self.pos + 1
        logits, self.past = self.run(np.asarray(tokens), self.mask, self.pos, self.ids, self.past)
        return logits

    def join(self, owners: Sequence[Any], cache: list[Any], rows: np.ndarray, mask: np.ndarray, pos: np.ndarray,
             adapter_ids: np.ndarray, budgets: Sequence[int] | None = None) -> None:
        """Rows `rows` of a prefill's `cache` (its mask, last positions, adapter ids) as new slots."""
        new = self.take(cache, rows)
        n, P, L = len(owners), mask.shape[1], self.mask.shape[1]
        if P > L:  # a prompt longer than the cache: every row gains masked columns on the left
            self.past = [_left_pad(x, P, 2) for x in self.past]
            self.mask, L = _left_pad(self.mask, P, 1), P
        free = [i for i, o in enumerate(self.occupants) if o is None][:n]
        if len(free) < n:  # no free slot left for some: they become new rows (one concatenation)
            k = len(free)
            self.past = [_cat([x, _left_pad(y[k:], L, 2)]) for x, y in zip(self.past, new)]
            self.mask = _cat([self.mask, _like(self.mask, _left_pad(mask[k:], L, 1))])
            self.pos = _cat([self.pos, _like(self.pos, pos[k:])])
            self.ids = _cat([self.ids, _like(self.ids, adapter_ids[k:])])
            self.occupants += list(owners[k:])
        for j, s in enumerate(free):  # in place: the slot's earlier columns stay, masked
            for x, y in zip(self.past, new):
                x[s, :, L - P:] = y[j]
            self.mask[s] = 0
            self.mask[s, L - P:] = _like(self.mask, mask[j])
            self.pos[s], self.ids[s] = _like(self.pos, pos[j]), _like(self.ids, adapter_ids[j])
            self.occupants[s] = owners[j]

    def claim(self, owners: Sequence[Any], budgets: Sequence[int] | None = None) -> None:
        self.occupants = list(owners)

    def drop(self, slots: Sequence[int]) -> None:
        for s in slots:
            self.occupants[s] = None
        keep = [i for i, o in enumerate(self.occupants) if o is not None]
        # gather (one copy of the cache) once it pays: half the rows free, or half the columns padding
        # for every row left (streams keep joining at the right, so the oldest one's start moves on)
        if keep and (2 * len(keep) < len(self.occupants) or 2 * _first_used(self.mask[keep]) >= self.mask.shape[1]):
            self._gather(keep)

    def _gather(self, keep: list[int]) -> None:
        """Only rows `keep`, and no leading cache column that is padding for all of them."""
        self.mask, self.pos, self.ids = self.mask[keep], self.pos[keep], self.ids[keep]
        self.past = [p[keep] for p in self.past]
        self.occupants = [self.occupants[i] for i in keep]
        start = _first_used(self.mask)
        if start:  # (contiguous: a device plane binds the tensors' memory as it lies)
            self.mask = _contiguous(self.mask[:, start:])
            self.past = [_contiguous(p[:, :, start:]) for p in self.past]

    def close(self) -> None:
        self.past = []


def host_state(backend: Backend, past_names: Sequence[str], past: list[np.ndarray], mask: np.ndarray,
               pos: np.ndarray, adapter_ids: np.ndarray, owners: Sequence[Any] | None = None) -> GrowingState:
    """The host plane: host arrays through `backend.decode` (any backend)."""
    names = tuple(past_names)

    def run(tokens, mask, pos, ids, past):
        feed = {C.INPUTS_EMBEDS: backend.embed(tokens[:, None]), C.ATTENTION_MASK: mask, C.POSITION_IDS: pos,
                C.ADAPTER_IDS: ids, **dict(zip(names, past))}
        out = backend.decode(feed)
        return out.logits[:, -1], out.present

    return GrowingState(run, host_arrays, past, mask, pos, adapter_ids, owners)


def _is_host(x: Any) -> bool:
    return isinstance(x, np.ndarray)


def _cat(parts: list[Any], axis: int = 0) -> Any:
    if _is_host(parts[0]):
        return np.concatenate(parts, axis)
    import torch

    return torch.cat(parts, axis)


def _like(ref: Any, x: Any) -> Any:
    """Host array `x` where `ref` lies (and of its dtype)."""
    if _is_host(ref):
        return np.asarray(x, ref.dtype)
    import torch

    return torch.as_tensor(np.asarray(x), dtype=ref.dtype, device=ref.device)


def _ones_like(ref: Any, shape: tuple[int, ...]) -> Any:
    if _is_host(ref):
        return np.ones(shape, ref.dtype)
    import torch

    return torch.ones(shape, dtype=ref.dtype, device=ref.device)


def _contiguous(x: Any) -> Any:
    return np.ascontiguousarray(x) if _is_host(x) else x.contiguous()


def _first_used(mask: Any) -> int:
    used = np.flatnonzero(mask.any(0)) if _is_host(mask) else mask.bool().any(0).nonzero().flatten().cpu().numpy()
    return int(used[0]) if used.size else 0


def _left_pad(a: Any, length: int, axis: int) -> Any:
    extra = length - a.shape[axis]
    if extra <= 0:
        return a
    if _is_host(a):
        pad = [(0, 0)] * a.ndim
        pad[axis] = (extra, 0)
        return np.pad(a, pad)
    import torch

    shape = list(a.shape)
    shape[axis] = extra
    return torch.cat([torch.zeros(shape, dtype=a.dtype, device=a.device), a], axis)


def rounded_max_len(needed: int, limit: int) -> int | None:
    """The static cache's length for `needed` positions (rounded up, so workspaces are shared), or
    None past the model's limit: such a generation runs on the host plane, as on CPU."""
    if needed > limit:
        return None
    return min(limit, -(-needed // SLOT_ROUNDING) * SLOT_ROUNDING)


def host_arrays(cache: list[Any], rows: np.ndarray) -> list[np.ndarray]:
    """`rows` of a cache as host arrays, whether it is host arrays or device tensors."""
    out = []
    for c in cache:
        x = c[rows] if isinstance(c, np.ndarray) else c.index_select(0, _index(c, rows))
        out.append(x if isinstance(x, np.ndarray) else _host(x))
    return out


def _host(t: Any) -> np.ndarray:
    """A device tensor as a host array in its own dtype (the host plane keeps an fp16 cache fp16);
    bfloat16, which numpy lacks, as float32."""
    import torch

    return (t.float() if t.dtype == torch.bfloat16 else t).cpu().numpy()


def _index(t: Any, rows: np.ndarray) -> Any:
    import torch

    return torch.as_tensor(np.asarray(rows), dtype=torch.int64, device=t.device)


class StaticCache:
    """One static cache's device state: KV buffers at their maximum length, the (B, max_len) mask of
    valid slots, positions, adapter ids, and the next column every row writes (`length`).

    Rows are independent: a row's valid columns need not be contiguous (keys carry their rotary
    position, and attention reads the buffer under the mask), so new rows can be written into any
    row at columns that end at `length` (`place`) while the others keep decoding."""

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
        self.clear()
        self.place(np.arange(len(rows)), cache, rows, mask, pos, adapter_ids)

    def clear(self) -> None:
        self.mask.zero_()
        self.pos.zero_()
        self.ids.zero_()
        self.length = 0

    def place(self, slots: Sequence[int], cache: list[Any], rows: np.ndarray, mask: np.ndarray, pos: np.ndarray,
              adapter_ids: np.ndarray) -> None:
        """Rows `rows` of a prefill's cache into rows `slots`, their P columns ending at `length` (or
        at P, which becomes `length`, when the prompt is longer: the other rows' new columns masked)."""
        t = self.torch
        P = mask.shape[1]
        if P >= self.max_len:
            raise InputError("generation", "prompt length", f"< {self.max_len}", str(P))
        start = max(0, self.length - P)
        self.length = start + P
        s, idx = _index(self.mask, slots), _index(self.mask, rows)
        for buf, c in zip(self.kv, cache):
            buf[s, :, start:start + P] = c.index_select(0, idx).to(buf.dtype)
        self.mask[s] = 0
        self.mask[s, start:start + P] = t.as_tensor(mask, dtype=t.int64, device=self.mask.device)
        self.pos[s] = t.as_tensor(pos, dtype=t.int64, device=self.mask.device)
        self.ids[s] = t.as_tensor(adapter_ids, dtype=t.int64, device=self.mask.device)

    def copy_rows(self, other: "StaticCache", rows: Sequence[int]) -> None:
        """`other`'s rows `rows` into rows 0.. of this (cleared) cache, each row's valid columns
        packed to end at this cache's `length`, the longest row's count."""
        counts = other.mask.sum(1).cpu().numpy()
        self.clear()
        self.length = L = int(max((counts[r] for r in rows), default=0))
        if L >= self.max_len:
            raise BackendError(f"generation: {L} cached positions do not fit a static cache of {self.max_len}")
        for j, r in enumerate(rows):
            cols = other.mask[r].nonzero().flatten()
            n = int(counts[r])
            for dst, src in zip(self.kv, other.kv):
                dst[j, :, L - n:L] = src[r].index_select(1, cols)
            self.mask[j, L - n:L] = 1
            self.pos[j], self.ids[j] = other.pos[r], other.ids[r]

    def advance(self, tokens: np.ndarray, reorder: np.ndarray | None) -> None:
        """Before a step: follow beam parents, mark the next slot valid, move positions on."""
        t = self.torch
        if reorder is not None:
            r = _index(self.mask, reorder)
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
                 adapter_ids: np.ndarray, max_len: int, limit: int | None = None) -> "SlotState":
    """A pooled workspace loaded with the prefill's cache for `rows`, stepped by a `SlotState`."""
    work = pool.acquire(len(rows), max_len)
    try:
        work.cache.load(cache, rows, mask, pos, adapter_ids)
    except Exception:
        pool.release(work)
        raise
    return SlotState(pool, work, limit or max_len)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


class SlotState:
    """The decode state on the device plane: a pooled static-cache workspace whose rows are slots.
    `work.run()` runs one decode step on `work.cache` (written in place) and returns the next-token
    logits as a device tensor (rows, vocab); only token ids go in and logits come out per step.

    Continuous batching without a host round trip of the cache (slot-based in-flight batching):
    `join` writes new rows' prefill cache into free slots; `drop` frees slots. Moving to another
    workspace (`_rebase`: more rows, more columns, or far fewer rows) packs the occupied rows' valid
    columns into it on the device; it happens when no slot is free, when the columns run out
    (sized by the rows' remaining token budgets), or when three quarters of the slots are free."""

    def __init__(self, pool: CachePool, work: Any, limit: int, owners: Sequence[Any] | None = None):
        self.pool, self.work, self.limit = pool, work, limit
        self.occupants: list[Any] = list(owners) if owners is not None else [True] * work.cache.batch
        self.budget = [0] * work.cache.batch  # tokens a slot may still take (scheduler's joins; 0: unknown)

    def step(self, tokens: np.ndarray, reorder: np.ndarray | None) -> np.ndarray:
        cache = self.work.cache
        if cache.length >= cache.max_len:
            self._rebase(cache.batch)
            cache = self.work.cache
        cache.advance(tokens, reorder)
        logits = self.work.run()
        cache.written()
        self.budget = [max(0, b - 1) for b in self.budget]
        return np.array(logits.float().cpu().numpy(), copy=True)  # (on CPU a view of the pooled workspace)

    def join(self, owners: Sequence[Any], cache: list[Any], rows: np.ndarray, mask: np.ndarray, pos: np.ndarray,
             adapter_ids: np.ndarray, budgets: Sequence[int] | None = None) -> None:
        n, P = len(owners), mask.shape[1]
        budgets = list(budgets) if budgets is not None else [SLOT_ROUNDING] * n
        free = [i for i, o in enumerate(self.occupants) if o is None]
        c = self.work.cache
        needed = max(c.length, P) + max(budgets, default=0) + 1
        if len(free) < n or needed > c.max_len:
            self._rebase(max(c.batch, _pow2(len(self.occupants) - len(free) + n)), P, max(budgets, default=0))
            free = [i for i, o in enumerate(self.occupants) if o is None]
        slots = free[:n]
        self.work.cache.place(slots, cache, rows, mask, pos, adapter_ids)
        for s, o, b in zip(slots, owners, budgets):
            self.occupants[s], self.budget[s] = o, b

    def claim(self, owners: Sequence[Any], budgets: Sequence[int] | None = None) -> None:
        self.occupants = list(owners)
        self.budget = list(budgets) if budgets is not None else [0] * len(owners)

    def drop(self, slots: Sequence[int]) -> None:
        for s in slots:
            self.occupants[s], self.budget[s] = None, 0
        used = sum(o is not None for o in self.occupants)
        if used and 4 * used <= len(self.occupants):
            self._rebase(_pow2(used))

    def _rebase(self, batch: int, prompt: int = 0, budget: int = 0) -> None:
        """Move the occupied rows into a workspace of `batch` rows whose columns fit the longest row
        (or a joining `prompt`) plus the largest remaining `budget`, rounded; the old one is pooled."""
        old = self.work
        rows = [i for i, o in enumerate(self.occupants) if o is not None]
        counts = old.cache.mask.sum(1).cpu().numpy()
        longest = int(max((counts[r] for r in rows), default=0))
        need = max(longest, prompt) + max([self.budget[r] for r in rows] + [budget, SLOT_ROUNDING]) + 1
        max_len = rounded_max_len(need, self.limit)
        if max_len is None:
            if longest + 1 >= self.limit:
                raise BackendError(f"generation: more than {self.limit} cached positions")
            max_len = self.limit
        work = self.pool.acquire(batch, max_len)
        try:
            work.cache.copy_rows(old.cache, rows)
        except Exception:
            self.pool.release(work)
            raise
        self.work = work
        self.pool.release(old)
        self.occupants = [self.occupants[r] for r in rows] + [None] * (batch - len(rows))
        self.budget = [self.budget[r] for r in rows] + [0] * (batch - len(rows))

    def close(self) -> None:
        if self.work is not None:
            self.pool.release(self.work)
            self.work = None

