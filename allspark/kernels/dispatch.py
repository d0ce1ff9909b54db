"""Which attention runs on CUDA for backend="auto": the Triton kernel or torch SDPA, by measurement.

The rule keeps the promise "never slower than SDPA": the kernel runs only at shapes where a GPU
run measured it faster. The measurements live next to the kernel in ``attention_dispatch.json``
(regenerated on a GPU by ``allspark bench kernels --write-dispatch``), one entry per measured shape:

    {"head_dim": 88, "n_q": 901, "n_k": 901, "causal": false, "masked": false, "dtype": "float16",
     "kernel_ms": 0.3343, "sdpa_ms": 0.1321, "ratio": 2.53, "name": "eva_self_attn"}

``ratio`` is kernel time / SDPA time (CUDA graph replay); the kernel is chosen where ratio < the
table's ``threshold`` (1.0). A shape is matched to the table by its class:

- exact: same dtype, head dim and causality, and Nq and Nk in the same power-of-two bucket
  (next_pow2(n)) as a measured entry; several entries in one class -> the worst ratio counts;
- near: otherwise, entries of the same dtype, head dim and causality whose Nq and Nk buckets are
  each at most one power of two away; the kernel only if every such entry says the kernel wins;
- default, for shapes nothing measured covers: SDPA (an unmeasured shape may be a weak one; EVA's
  head dim 88 lost 2.5x while every power-of-two shape near it won). Also SDPA for fp32, which no
  GPU run timed.

A key padding mask does not enter the class: the benchmark times unmasked shapes, and with a
boolean mask SDPA loses its flash backend while the kernel's cost barely changes, so the unmasked
ratio is the masked one's upper bound. The table records the device it was measured on. A GPU
with a table of its own beside the kernel (``attention_dispatch.<device>.json``, the device's name
lower-cased with dashes: ``nvidia-h200``) uses that one: the same kernel can win on one GPU and
lose on another (the bridge's 32x901 head dim 64: 0.66x SDPA's time on the H100, 1.59x on the H200).
Any other GPU uses ``attention_dispatch.json`` (H100), and `allspark bench kernels` says so.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Literal, Optional

import torch

from ..errors import AllSparkError

Impl = Literal["triton", "sdpa"]
FORMAT = "allspark-attention-dispatch/1"
TABLE_PATH = Path(__file__).with_name("attention_dispatch.json")
ENV_TABLE = "ALLSPARK_ATTENTION_DISPATCH"  # a table to use instead of the committed one
_DTYPES = ("float16", "bfloat16", "float32")
_ENTRY_FIELDS = {"head_dim": int, "n_q": int, "n_k": int, "causal": bool, "dtype": str, "ratio": float}


class DispatchTableError(AllSparkError, ValueError):
    """The attention dispatch table is missing or malformed; the message names the file."""

    def __init__(self, path: Path | str, what: str):
        self.path, self.what = str(path), what
        super().__init__(f"attention dispatch table {path}: {what}")


@dataclass(frozen=True)
class Entry:
    head_dim: int
    n_q: int
    n_k: int
    causal: bool
    dtype: str
    ratio: float  # kernel ms / SDPA ms
    name: str = ""

    @property
    def klass(self) -> tuple[str, int, bool, int, int]:
        return (self.dtype, self.head_dim, self.causal, _bucket(self.n_q), _bucket(self.n_k))


@dataclass(frozen=True)
class Decision:
    impl: Impl
    reason: str  # "exact", "near" or "default: ..."
    entries: tuple[Entry, ...] = ()


@dataclass
class DispatchTable:
    device: str
    threshold: float
    entries: list[Entry]
    path: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def decide(self, dtype: str, head_dim: int, n_q: int, n_k: int, causal: bool) -> Decision:
        return _decide(self, dtype, head_dim, n_q, n_k, causal)


def _bucket(n: int) -> int:
    """log2 of next_pow2(n): the class index of a token count (1 -> 0, 17 -> 5, 901 -> 10)."""
    return max(0, math.ceil(math.log2(max(1, n))))


def _decide(table: DispatchTable, dtype: str, head_dim: int, n_q: int, n_k: int,
            causal: bool) -> Decision:
    if dtype == "float32":
        return Decision("sdpa", "default: fp32 (not timed on a GPU)")
    same = [e for e in table.entries if (e.dtype, e.head_dim, e.causal) == (dtype, head_dim, causal)]
    bq, bk = _bucket(n_q), _bucket(n_k)
    exact = tuple(e for e in same if e.klass[3:] == (bq, bk))
    if exact:
        worst = max(e.ratio for e in exact)
        return Decision("triton" if worst < table.threshold else "sdpa", "exact", exact)
    near = tuple(e for e in same if abs(e.klass[3] - bq) <= 1 and abs(e.klass[4] - bk) <= 1)
    if near:
        wins = all(e.ratio < table.threshold for e in near)
        return Decision("triton" if wins else "sdpa", "near", near)
    return Decision("sdpa", "default: shape not measured")


# ---- the table file ----------------------------------------------------------------------------


def parse_table(data: Any, path: Path | str = "<table>") -> DispatchTable:
    """Validate a table's JSON (as loaded) and build the `DispatchTable`; `DispatchTableError` names
    the file and the first thing wrong."""
    if not isinstance(data, dict):
        raise DispatchTableError(path, f"expected a JSON object, got {type(data).__name__}")
    if data.get("format") != FORMAT:
        raise DispatchTableError(path, f"format: expected {FORMAT!r}, got {data.get('format')!r}")
    device = data.get("device")
    if not isinstance(device, str) or not device:
        raise DispatchTableError(path, f"device: expected the GPU's name, got {device!r}")
    threshold = data.get("threshold", 1.0)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
        raise DispatchTableError(path, f"threshold: expected a number > 0, got {threshold!r}")
    raw = data.get("entries")
    if not isinstance(raw, list):
        raise DispatchTableError(path, f"entries: expected a list, got {type(raw).__name__}")
    entries = []
    for i, e in enumerate(raw):
        if not isinstance(e, dict):
            raise DispatchTableError(path, f"entries[{i}]: expected an object, got {type(e).__name__}")
        for key, typ in _ENTRY_FIELDS.items():
            val = e.get(key)
            ok = (isinstance(val, bool) if typ is bool else
                  isinstance(val, (int, float)) and not isinstance(val, bool) if typ is float else
                  isinstance(val, typ) and not isinstance(val, bool))
            if not ok:
                raise DispatchTableError(path, f"entries[{i}].{key}: expected {typ.__name__}, got {val!r}")
        if e["dtype"] not in _DTYPES:
            raise DispatchTableError(path, f"entries[{i}].dtype: expected one of {_DTYPES}, got {e['dtype']!r}")
        if min(e["head_dim"], e["n_q"], e["n_k"]) < 1:
            raise DispatchTableError(path, f"entries[{i}]: head_dim, n_q and n_k must be >= 1")
        if not (math.isfinite(e["ratio"]) and e["ratio"] > 0):
            raise DispatchTableError(path, f"entries[{i}].ratio: expected a finite number > 0, got {e['ratio']!r}")
        entries.append(Entry(e["head_dim"], e["n_q"], e["n_k"], e["causal"], e["dtype"],
                             float(e["ratio"]), str(e.get("name", ""))))
    meta = {k: v for k, v in data.items() if k not in ("entries",)}
    return DispatchTable(device, float(threshold), entries, str(path), meta)


def device_slug(name: str) -> str:
    """"NVIDIA H200" -> "nvidia-h200": how a device's own table is named."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown-device"


def device_table_path(device: str | None) -> Path:
    """The committed table for `device` (a GPU's name): its own if there is one, else the default."""
    own = TABLE_PATH.with_name(f"{TABLE_PATH.stem}.{device_slug(device)}.json") if device else None
    return own if own is not None and own.is_file() else TABLE_PATH


def load_table(path: Path | str | None = None) -> DispatchTable:
    """Read and validate a table: `path`, else $ALLSPARK_ATTENTION_DISPATCH, else the committed one
    for this process's GPU (`device_table_path`)."""
    if not path:
        path = os.environ.get(ENV_TABLE) or device_table_path(
            torch.cuda.get_device_name() if torch.cuda.is_available() else None)  # the current device's
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise DispatchTableError(path, f"cannot read it ({e.strerror or e})") from e
    except json.JSONDecodeError as e:
        raise DispatchTableError(path, f"not valid JSON ({e})") from e
    return parse_table(data, path)


@lru_cache(maxsize=1)
def default_table() -> DispatchTable:
    """The table `choose` uses (read once per process)."""
    return load_table()


@lru_cache(maxsize=4096)
def _choose_cached(dtype: str, head_dim: int, n_q: int, n_k: int, causal: bool) -> Impl:
    return default_table().decide(dtype, head_dim, n_q, n_k, causal).impl


def choose(q: torch.Tensor, k: torch.Tensor, mask: Optional[torch.Tensor] = None,
           causal: bool = False) -> Impl:
    """"triton" or "sdpa" for this problem (q [B, H, Nq, D], k [B, H, Nk, D]) under the table.
    The mask does not change the choice (see the module docstring); it is taken so callers pass
    the whole problem and a later table may use it."""
    del mask
    return _choose_cached(str(q.dtype).removeprefix("torch."), int(q.shape[-1]), int(q.shape[2]),
                          int(k.shape[2]), bool(causal))


def reset_cache() -> None:
    """Forget the loaded table and the cached choices (after changing $ALLSPARK_ATTENTION_DISPATCH)."""
    default_table.cache_clear()
    _choose_cached.cache_clear()


# ---- writing a table from a GPU benchmark ----------------------------------------------------


def table_from_bench(result: dict[str, Any], source: str = "", threshold: float = 1.0) -> dict[str, Any]:
    """The dispatch table (as JSON data) from `allspark bench kernels`' result on a GPU: one entry
    per case that timed both the kernel and SDPA. Raises `DispatchTableError` when there is none."""
    cases = [c for c in result.get("gpu_cases", []) if {"triton", "sdpa"} <= set(c.get("results", {}))]
    if not cases:
        raise DispatchTableError(source or "<bench result>", "no GPU case timed both the Triton kernel "
                                 "and SDPA (run `allspark bench kernels` on a CUDA machine with triton)")
    entries = []
    for c in cases:
        t_ms, s_ms = c["results"]["triton"]["ms"], c["results"]["sdpa"]["ms"]
        entries.append(dict(name=c.get("name", ""), head_dim=c["D"], n_q=c["Nq"], n_k=c["Nk"],
                            causal=bool(c["causal"]), masked=bool(c.get("masked", False)),
                            dtype=c["dtype"], batch=c["B"], heads=c["H"],
                            kernel_ms=round(t_ms, 5), sdpa_ms=round(s_ms, 5), ratio=round(t_ms / s_ms, 4)))
    table = dict(format=FORMAT, device=result.get("device") or result.get("gpu"),
                 torch=result.get("torch"), triton=result.get("triton"), source=source,
                 ratio="kernel ms / SDPA ms, CUDA graph replay; the kernel runs where ratio < threshold",
                 threshold=threshold, entries=entries)
    parse_table(table, source or "<bench result>")  # what is written must load
    return table


def write_table(table: dict[str, Any], path: Path | str) -> Path:
    path = Path(path)
    parse_table(table, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1) + "\n")
    return path


def summarize(table: DispatchTable, shapes: Iterable[dict[str, Any]], dtype: str = "float16") -> list[str]:
    """One line per shape ({name, Nq, Nk, D, causal}): which implementation the rule picks, why."""
    lines = []
    for s in shapes:
        d = table.decide(dtype, s["D"], s["Nq"], s["Nk"], s["causal"])
        ratios = ", ".join(f"{e.ratio:.2f}" for e in d.entries)
        lines.append(f"{s.get('name', ''):<22} {s['Nq']}x{s['Nk']} D{s['D']}{' causal' if s['causal'] else ''}: "
                     f"{d.impl} ({d.reason}{'; kernel/SDPA ' + ratios if ratios else ''})")
    return lines


def main(argv: list[str] | None = None) -> int:
    """python -m allspark.kernels.dispatch BENCH.json [--out TABLE]: a table from a GPU bench's JSON."""
    import argparse

    ap = argparse.ArgumentParser(description="attention dispatch table from `allspark bench kernels` JSON")
    ap.add_argument("bench", help="kernels.json written on a GPU")
    ap.add_argument("--out", default=str(TABLE_PATH))
    ap.add_argument("--threshold", type=float, default=1.0)
    a = ap.parse_args(argv)
    result = json.loads(Path(a.bench).read_text())
    print(write_table(table_from_bench(result, a.bench, a.threshold), a.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
