"""Input schemas: what one request of a modality must look like, checked before any model code.

A schema lists fields; each field has a kind (float, int, text), a shape of `Dim`s and value
rules. `validate` raises `InputError` naming modality, field, expected and actual.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ..errors import InputError


@dataclass(frozen=True)
class Dim:
    """One axis: exactly `lo` (hi=None means hi=lo), a range [lo, hi], or one of `choices`."""

    lo: int
    hi: int | None = None
    choices: tuple[int, ...] = ()
    name: str = ""

    def ok(self, n: int) -> bool:
        if self.choices:
            return n in self.choices
        return self.lo <= n <= (self.lo if self.hi is None else self.hi)

    def describe(self) -> str:
        label = f"{self.name}=" if self.name else ""
        if self.choices:
            return label + "{" + ",".join(map(str, self.choices)) + "}"
        if self.hi is None or self.hi == self.lo:
            return f"{label}{self.lo}"
        return f"{label}{self.lo}..{self.hi}"


def exact(n: int, name: str = "") -> Dim:
    return Dim(n, None, (), name)


@dataclass(frozen=True)
class Field:
    name: str
    kind: str  # "float" | "int" | "text"
    shape: tuple[Dim, ...] = ()
    value_range: tuple[float, float] | None = None  # inclusive, for ints: category bounds
    max_chars: int = 0  # text only
    # floats: a magnitude beyond which the model's float32 arithmetic overflows or loses all meaning
    max_abs: float = 1e6

    def describe_shape(self) -> str:
        return "[" + ", ".join(d.describe() for d in self.shape) + "]"


@dataclass(frozen=True)
class InputSchema:
    fields: tuple[Field, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    def validate(self, modality: str, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """Check every field; return the inputs as numpy arrays (or str for text)."""
        if not isinstance(inputs, Mapping):
            raise InputError(modality, "<inputs>", f"a mapping with fields {list(self.names)}",
                             type(inputs).__name__)
        unknown = sorted(set(inputs) - set(self.names))
        if unknown:
            raise InputError(modality, unknown[0], f"only fields {list(self.names)}", "an unknown field")
        return {f.name: _check_field(modality, f, inputs) for f in self.fields}


def _check_field(modality: str, f: Field, inputs: Mapping[str, Any]) -> Any:
    if f.name not in inputs:
        raise InputError(modality, f.name, "a value", "nothing (missing field)")
    v = inputs[f.name]
    if f.kind == "text":
        if not isinstance(v, str):
            raise InputError(modality, f.name, "a str", type(v).__name__)
        if not v.strip():
            raise InputError(modality, f.name, "non-empty text", "empty text")
        if f.max_chars and len(v) > f.max_chars:
            raise InputError(modality, f.name, f"at most {f.max_chars} characters", f"{len(v)}")
        check_text(modality, f.name, v)
        return v
    try:
        a = np.asarray(v)
    except Exception as e:  # ragged lists and the like
        raise InputError(modality, f.name, "an array", f"{type(v).__name__} ({e})") from None
    if f.kind == "float" and not (a.dtype.kind in "fiu"):
        raise InputError(modality, f.name, "a real-valued array (float or integer dtype)", f"dtype {a.dtype}")
    if f.kind == "int" and a.dtype.kind not in "iu":
        raise InputError(modality, f.name, "an integer array", f"dtype {a.dtype}")
    if a.ndim != len(f.shape):
        raise InputError(modality, f.name, f"rank {len(f.shape)} {f.describe_shape()}",
                         f"rank {a.ndim} {list(a.shape)}")
    for axis, (n, d) in enumerate(zip(a.shape, f.shape)):
        if not d.ok(n):
            raise InputError(modality, f.name, f"shape {f.describe_shape()} (axis {axis}: {d.describe()})",
                             f"shape {list(a.shape)}")
    if a.dtype.kind == "f" and a.size and not np.isfinite(a).all():
        bad = "NaN" if np.isnan(a).any() else "inf"
        raise InputError(modality, f.name, "finite values", f"{bad} at {int((~np.isfinite(a)).sum())} positions")
    if f.kind == "float" and a.size and (peak := float(np.abs(a.astype(np.float64)).max())) > f.max_abs:
        raise InputError(modality, f.name, f"values within +-{f.max_abs:g}", f"a value of magnitude {peak:.3g}")
    if f.value_range is not None and a.size:
        lo, hi = f.value_range
        if a.min() < lo or a.max() > hi:
            raise InputError(modality, f.name, f"values in [{lo:g}, {hi:g}]",
                             f"values in [{a.min():g}, {a.max():g}]")
    return a


def check_text(modality: str, field: str, text: str) -> None:
    """Text must be encodable as UTF-8 (no lone surrogates from a bad decode)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(modality, field, "valid Unicode text", f"an unencodable character at {e.start}") from None
