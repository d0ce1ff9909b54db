"""TensorRT optimization profiles (min/opt/max shape per input) derived from a build's manifest.

Every symbolic dim has a range in the manifest (`dims`: batch, seq_len, past_len, total_len,
num_tokens). Encoders, bridges and heads get one profile over those ranges. The decoder gets two,
because its two uses have disjoint shapes and an engine tuned for one is slow on the other:

    prefill   seq_len 1..max,   past_len 0,           total_len = seq_len
    decode    seq_len 1,        past_len 1..max - 1,  total_len = past_len + 1

so that `total_len = past_len + seq_len` holds at each of min, opt and max (TensorRT builds and
tunes kernels at those shapes, and the decoder's graph only exists where that equation holds).
`--profile dim=min:opt:max` overrides a dim's range. Needs no TensorRT: the engines that use these
profiles are built on a GPU machine (issue 16); here they are derived and checked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..contract.tensors import (
    BATCH,
    DECODER_COMPONENT,
    PAST_LEN,
    SEQ_LEN,
    TOTAL_LEN,
    DimRange,
)
from ..errors import ConfigError

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Profile:
    name: str
    shapes: dict[str, tuple[Shape, Shape, Shape]]  # input -> (min, opt, max)

    def ort_trt_options(self) -> dict[str, str]:
        """The profile as ONNX Runtime TensorRT provider options (`trt_profile_{min,opt,max}_shapes`)."""
        out = {}
        for i, which in enumerate(("min", "opt", "max")):
            out[f"trt_profile_{which}_shapes"] = ",".join(
                f"{name}:{'x'.join(str(d) for d in shapes[i])}" for name, shapes in self.shapes.items())
        return out


def ort_trt_provider_options(profs: Sequence[Profile], cache_dir: str, fp16: bool = True,
                             workspace_bytes: int = 8 << 30) -> dict[str, str]:
    """ONNX Runtime's TensorRT provider options for one graph: its profiles (several profiles list an
    input once per profile, in order), the engine and timing caches in `cache_dir` (engines built at
    the first session and reused by every later one), fp16, the workspace."""
    opts = {"trt_fp16_enable": "1" if fp16 else "0", "trt_max_workspace_size": str(workspace_bytes),
            "trt_engine_cache_enable": "1", "trt_engine_cache_path": cache_dir,
            "trt_timing_cache_enable": "1", "trt_timing_cache_path": cache_dir}
    for i, which in enumerate(("min", "opt", "max")):
        opts[f"trt_profile_{which}_shapes"] = ",".join(
            f"{name}:{'x'.join(str(d) for d in shapes[i])}" for p in profs for name, shapes in p.shapes.items())
    return opts


def parse_overrides(specs: Sequence[str]) -> dict[str, DimRange]:
    """`["seq_len=1:64:128", ...]` -> {dim: DimRange}; a malformed one raises ConfigError."""
    out: dict[str, DimRange] = {}
    for s in specs:
        name, _, rng = s.partition("=")
        parts = rng.split(":")
        try:
            lo, opt, hi = (int(p) for p in parts)
        except ValueError:
            raise ConfigError(f"--profile {s!r}: expected DIM=MIN:OPT:MAX with integers, e.g. seq_len=1:64:256") from None
        if not 0 <= lo <= opt <= hi or hi < 1:
            raise ConfigError(f"--profile {s!r}: expected 0 <= MIN <= OPT <= MAX and MAX >= 1")
        out[name.strip()] = DimRange(lo, opt, hi)
    return out


def _ranges(manifest: Mapping, overrides: Mapping[str, DimRange]) -> dict[str, DimRange]:
    dims = {k: DimRange(v["min"], v["opt"], v["max"]) for k, v in manifest["dims"].items()}
    unknown = sorted(set(overrides) - set(dims))
    if unknown:
        raise ConfigError(f"--profile: unknown dims {unknown}; the build's are {sorted(dims)}")
    for k, r in overrides.items():
        if r.max > dims[k].max:
            raise ConfigError(f"--profile {k}: max {r.max} exceeds the build's {dims[k].max} (the model's limit)")
    return {**dims, **overrides}


def _shape(dims: Sequence, fixed: Mapping[str, int]) -> Shape:
    return tuple(int(fixed[d]) if isinstance(d, str) else int(d) for d in dims)


def _profile(name: str, inputs: Sequence[Mapping], at: Sequence[Mapping[str, int]]) -> Profile:
    missing = {d for t in inputs for d in t["dims"] if isinstance(d, str)} - set(at[0])
    if missing:
        raise ConfigError(f"profile {name}: no range for dims {sorted(missing)}")
    return Profile(name, {t["name"]: tuple(_shape(t["dims"], a) for a in at) for t in inputs})  # type: ignore[misc]


def profiles(manifest: Mapping, component: str, overrides: Mapping[str, DimRange] | None = None) -> list[Profile]:
    """The optimization profiles of one component of the build."""
    if component not in manifest["components"]:
        raise ConfigError(f"no component {component!r}; the build has {sorted(manifest['components'])}")
    r = _ranges(manifest, overrides or {})
    inputs = manifest["components"][component]["inputs"]
    plain = [{k: getattr(v, w) for k, v in r.items()} for w in ("min", "opt", "max")]
    if component != DECODER_COMPONENT:
        return [_profile("default", inputs, plain)]
    seq, past, b = r[SEQ_LEN], r[PAST_LEN], r[BATCH]
    prefill = [{**p, PAST_LEN: 0, TOTAL_LEN: p[SEQ_LEN]} for p in plain]
    decode_past = (max(past.min, 1), max(past.opt, 1), max(past.max, 1))
    decode = [{BATCH: bb, SEQ_LEN: 1, PAST_LEN: pp, TOTAL_LEN: pp + 1, **{k: v for k, v in p.items()
              if k not in (BATCH, SEQ_LEN, PAST_LEN, TOTAL_LEN)}}
              for bb, pp, p in zip((b.min, b.opt, b.max), decode_past, plain)]
    for at in (prefill, decode):
        if any(a[TOTAL_LEN] > r[TOTAL_LEN].max for a in at):
            raise ConfigError(f"profile: total_len {max(a[TOTAL_LEN] for a in at)} exceeds the build's "
                              f"{r[TOTAL_LEN].max}; lower seq_len or past_len")
    if seq.max < 1:
        raise ConfigError("profile: seq_len max must be >= 1")
    return [_profile("prefill", inputs, prefill), _profile("decode", inputs, decode)]
