"""What the shared entry models hold: a `Runtime` over BLS, and reading a Triton request into
`allspark.runtime.Request` rows (one per batch row) by its modality's registry schema.

A request reaches the shared model through its modality's ensemble, which renames its fields
(`image` -> `rgb.image`) and asks for that modality's outputs (`rgb.label`): so the modality is
known even when a field is missing, and the schema can say which. Fields arrive as the config
declares them: float FP32, int INT64, text BYTES [1], per-row scalars reshaped to []. A float field
may be sent with integer values and the request parameter `dtype:<field>` = "uint8" (or another
integer dtype): the entry restores that dtype before validation, so an 8-bit image is scaled
exactly as `Runtime.predict` scales it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import InputError
from ...runtime import Request, Runtime
from ..layouts import Reach
from .triton import (
    decode_text,
    input_or_none,
    output_dtypes,
    parameters,
    request_parameters,
)

INTEGER_DTYPES = ("uint8", "int8", "uint16", "int16", "int32", "int64")
DTYPE_PARAM = "dtype:"


@dataclass(frozen=True)
class FieldInfo:
    name: str  # the registry's field name (`image`)
    tensor: str  # its input on the shared model (`rgb.image`)
    kind: str  # float | int | text
    rank: int


@dataclass
class EntryContext:
    """What a shared entry model holds: the runtime over BLS, and per modality its fields."""

    runtime: Runtime
    fields: dict[str, tuple[FieldInfo, ...]]  # modality -> fields
    batched: frozenset[str]  # modalities whose fields carry a batch dim (rows), the others one request each
    out_dtypes: dict[str, np.dtype]
    params: dict[str, str]

    @classmethod
    def load(cls, args: dict, generation: bool) -> EntryContext:
        """From the python backend's `initialize` args; `generation`: the model streams tokens
        (over BLS it then fetches every decoder output, a head only the hidden state)."""
        from ...model.registry import spec
        from ..model_config import field_tensor

        cfg = json.loads(args["model_config"])
        params = parameters(cfg)
        version = Path(args["model_repository"]) / args["model_version"]
        manifest = json.loads((version / "manifest.json").read_text())
        # how this model reaches the graphs: in this process, or over BLS (layouts.Reach)
        rt = Reach(params.get("layout", Reach.BLS.value)).load(version, manifest, params, generation)
        fields = {m: tuple(FieldInfo(f.name, field_tensor(m, f.name), f.kind, len(f.shape))
                           for f in spec(m).schema(rt.config.modality(m)).fields)
                  for m in json.loads(params["modalities"])}
        if "batched_modalities" in params:  # allspark_runtime: single-pass rows, one stream per generation
            batched = frozenset(json.loads(params["batched_modalities"]))
        else:
            batched = frozenset(fields) if cfg["max_batch_size"] > 0 else frozenset()
        return cls(rt, fields, batched, output_dtypes(cfg), params)

    def modality_of(self, request) -> str:
        """The modality a request is for: its ensemble asks for that modality's outputs
        (`rgb.label`, ...); a direct call to the shared model is told by the fields it carries."""
        asked = {name.split(".", 1)[0] for name in request.requested_output_names()} & set(self.fields)
        if len(asked) == 1:
            return asked.pop()
        present = [m for m, fs in self.fields.items() if any(input_or_none(request, f.tensor) is not None for f in fs)]
        if len(present) != 1:
            raise InputError("<request>", "<inputs>", f"the fields of exactly one of {sorted(self.fields)} "
                             "(send requests to the model named after the modality)", f"{present or 'none'}")
        return present[0]

    def read(self, request) -> list[Request]:
        """One `Request` per batch row (generation: exactly one)."""
        m = self.modality_of(request)
        fields = self.fields[m]
        batched = m in self.batched
        casts = _dtype_params(m, request_parameters(request), fields)
        arrays = {f.name: a for f in fields if (a := input_or_none(request, f.tensor)) is not None}
        prompt = input_or_none(request, "prompt")
        size = sum(_nbytes(a) for a in [*arrays.values(), *([prompt] if prompt is not None else [])])
        limit = int(self.params.get("max_request_bytes", "0"))
        if limit and size > limit:  # before any copy or decode: a huge request costs nothing more
            raise InputError(m, "<inputs>", f"at most {_size(limit)} per request (--max-request-mb); "
                             "tile whole scenes (allspark map)", _size(size))
        sizes = {len(a) for a in arrays.values()} | ({len(prompt)} if prompt is not None else set())
        if batched and len(sizes) > 1:
            raise InputError(m, "<inputs>", "the same batch size for every input", f"sizes {sorted(sizes)}")
        rows = (sizes.pop() if sizes else 1) if batched else 1
        if rows < 1:
            raise InputError(m, "<inputs>", "at least one row", "a batch of 0")
        out = []
        for i in range(rows):
            inputs: dict[str, Any] = {}  # a missing field stays missing: the schema names it
            for f in fields:
                if f.name not in arrays:
                    continue
                v = arrays[f.name][i] if batched else arrays[f.name]
                if f.kind == "text":
                    v = decode_text(m, f.name, np.asarray(v).reshape(-1)[0])
                elif f.rank == 0:
                    v = np.asarray(v).reshape(())
                if f.name in casts:
                    v = _restore_dtype(m, f.name, v, casts[f.name])
                inputs[f.name] = v
            p = None
            if prompt is not None:
                p = decode_text(m, "prompt", np.asarray(prompt[i] if batched else prompt).reshape(-1)[0])
            out.append(Request(m, inputs, p))
        return out


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def _nbytes(a: np.ndarray) -> int:
    if a.dtype == np.object_:  # text: the bytes of each element
        return sum(len(x) if isinstance(x, (bytes, str)) else 8 for x in a.reshape(-1))
    return a.nbytes


def _dtype_params(modality: str, params: dict[str, Any], fields: Sequence[FieldInfo]) -> dict[str, str]:
    casts = {k[len(DTYPE_PARAM):]: v for k, v in params.items() if k.startswith(DTYPE_PARAM)}
    kinds = {f.name: f.kind for f in fields}
    for name, dtype in casts.items():
        if kinds.get(name) != "float":
            raise InputError(modality, f"{DTYPE_PARAM}{name}", f"a parameter naming a float field of {sorted(kinds)}",
                             repr(name))
        if dtype not in INTEGER_DTYPES:
            raise InputError(modality, f"{DTYPE_PARAM}{name}", f"one of {list(INTEGER_DTYPES)}", repr(dtype))
    return casts


def _restore_dtype(modality: str, field: str, v: np.ndarray, dtype: str) -> np.ndarray:
    info = np.iinfo(dtype)
    a = np.asarray(v)
    if a.size and (not np.isfinite(a).all() or (a != np.round(a)).any() or a.min() < info.min or a.max() > info.max):
        raise InputError(modality, field, f"integer values in [{info.min}, {info.max}] (sent as {dtype})",
                         "non-integer, non-finite or out-of-range values")
    return a.astype(dtype)
