"""Merge the requests one python-model `execute` receives into one onnxruntime call, and split it back.

Triton's dynamic batcher hands a model every request that queued; with `allow_ragged_batch` their
shapes may differ. The manifest's symbolic dims say how to combine them:

* components without an attention mask (encoders, bridges, heads, embed_tokens): requests whose
  inputs have the same non-batch shapes are concatenated, one call per shape group;
* the decoder (it has a `total_len` mask): every request joins one call. Rows are left-padded to the
  longest new sequence S and the longest cache P, and the padding is masked, as `Runtime.predict_batch`
  does for a mixed-modality batch:

      request r   past (b, kv, p_r, hd)   inputs_embeds (b, s_r, H)   attention_mask (b, p_r + s_r)
      merged      past (B, kv, P,   hd)   inputs_embeds (B, S,   H)   attention_mask (B, P + S)
      mask row    [0]*(P - p_r) + mask[:, :p_r] + [0]*(S - s_r) + mask[:, p_r:]

  Outputs go back by the same dims: a `seq_len` axis keeps its last s_r positions, a `total_len` axis
  the request's own cache slots [P - p_r, P) and new slots [P + S - s_r, P + S).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..contract.tensors import PAST_LEN as PAST
from ..contract.tensors import SEQ_LEN as SEQ
from ..contract.tensors import TOTAL_LEN as TOTAL
from ..errors import AllSparkError

Dims = Mapping[str, Sequence[str | int]]  # tensor name -> manifest dims, e.g. ["batch", "seq_len", 64]
Feed = dict[str, np.ndarray]


class BatchError(AllSparkError, ValueError):
    """A request's tensors disagree with each other (caught per request, before merging)."""


def is_ragged(dims: Dims) -> bool:
    """Components with an attention mask over a KV cache can mix any shapes (padding is masked)."""
    return any(TOTAL in d for d in dims.values())


def group_by_shape(feeds: Sequence[Feed]) -> list[list[int]]:
    """Indices of requests whose inputs share every non-batch shape, in arrival order."""
    groups: dict[tuple, list[int]] = {}
    for i, f in enumerate(feeds):
        groups.setdefault(tuple((k, v.shape[1:]) for k, v in sorted(f.items())), []).append(i)
    return list(groups.values())


def concat(feeds: Sequence[Feed]) -> tuple[Feed, list[int]]:
    sizes = [len(next(iter(f.values()))) for f in feeds]
    return {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}, sizes


def split(outputs: Feed, sizes: Sequence[int]) -> list[Feed]:
    ends = np.cumsum(sizes)
    return [{k: v[e - n:e] for k, v in outputs.items()} for n, e in zip(sizes, ends)]


def _axis(dims: Sequence[str | int], name: str) -> int | None:
    return list(dims).index(name) if name in dims else None


def ragged_sizes(feed: Feed, dims: Dims) -> tuple[int, int]:
    """(seq_len, past_len) of one request; raises BatchError if its tensors disagree."""
    seen: dict[str, set[int]] = {SEQ: set(), PAST: set(), TOTAL: set()}
    for name, x in feed.items():
        for sym in seen:
            ax = _axis(dims[name], sym)
            if ax is not None:
                seen[sym].add(x.shape[ax])
    for sym, sizes in seen.items():
        if len(sizes) > 1:
            raise BatchError(f"inputs disagree on {sym}: sizes {sorted(sizes)}")
    s, p = next(iter(seen[SEQ]), 0), next(iter(seen[PAST]), 0)
    total = next(iter(seen[TOTAL]), s + p)
    if total != s + p:
        raise BatchError(f"attention_mask covers {total} positions; expected past_len + seq_len = {p} + {s}")
    return s, p


@dataclass(frozen=True)
class Layout:
    """Where each request's rows and positions sit in a merged batch."""

    sizes: tuple[int, ...]  # rows per request
    seq: tuple[int, ...]  # s_r
    past: tuple[int, ...]  # p_r
    S: int
    P: int


def _pad_left(x: np.ndarray, axis: int, to: int) -> np.ndarray:
    if x.shape[axis] == to:
        return x
    width = [(0, 0)] * x.ndim
    width[axis] = (to - x.shape[axis], 0)
    return np.pad(x, width)


def merge_ragged(feeds: Sequence[Feed], dims: Dims) -> tuple[Feed, Layout]:
    sp = [ragged_sizes(f, dims) for f in feeds]
    S, P = max(s for s, _ in sp), max(p for _, p in sp)
    merged: Feed = {}
    for name in feeds[0]:
        d = dims[name]
        parts = []
        for f, (s, p) in zip(feeds, sp):
            x = f[name]
            if (ax := _axis(d, SEQ)) is not None:
                x = _pad_left(x, ax, S)
            elif (ax := _axis(d, PAST)) is not None:
                x = _pad_left(x, ax, P)
            elif (ax := _axis(d, TOTAL)) is not None:
                past, new = np.split(x, [p], axis=ax)
                x = np.concatenate([_pad_left(past, ax, P), _pad_left(new, ax, S)], axis=ax)
            parts.append(x)
        merged[name] = np.concatenate(parts)
    sizes = tuple(len(next(iter(f.values()))) for f in feeds)
    return merged, Layout(sizes, tuple(s for s, _ in sp), tuple(p for _, p in sp), S, P)


def split_ragged(outputs: Feed, layout: Layout, dims: Dims) -> list[Feed]:
    out: list[Feed] = []
    ends = np.cumsum(layout.sizes)
    for n, e, s, p in zip(layout.sizes, ends, layout.seq, layout.past):
        r: Feed = {}
        for name, y in outputs.items():
            y, d = y[e - n:e], dims[name]
            if (ax := _axis(d, SEQ)) is not None:
                y = np.take(y, np.arange(layout.S - s, layout.S), axis=ax)
            elif (ax := _axis(d, TOTAL)) is not None:
                keep = np.r_[layout.P - p:layout.P, layout.P + layout.S - s:layout.P + layout.S]
                y = np.take(y, keep, axis=ax)
            r[name] = y
        out.append(r)
    return out
