"""Parity of an exported graph against its PyTorch module, at shapes other than the export's.

Every output's max abs and max relative error is measured on each validation variant; all
failures are collected before raising, so one run names every component and output that drifts.
Reference inputs and outputs are kept (``validation/<component>.npz``) so `verify` can re-check a
build without the checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ..contract.tensors import (
    ATTENTION_MASK,
    CACHE_POSITION,
    PAST_LEN,
    SEQ_LEN,
    TOTAL_LEN,
    TensorSpec,
)
from ..errors import AllSparkError
from ..onnxrt import session
from .specs import ComponentSpec
from .upcast import fp32_reference

# (batch, variant) pairs: other batch sizes, sequence lengths, token counts, padding than export's (2, 0)
VALIDATION_SHAPES = ((3, 1), (1, 2))


class ParityError(AllSparkError, RuntimeError):
    """An exported graph's outputs differ from its PyTorch module beyond the stated tolerance."""


class Checked(Protocol):
    """What `compare` needs of a component: an export spec, or one rebuilt from a manifest."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    tolerance: dict[str, float]


def reference(spec: ComponentSpec) -> tuple[list[dict[str, np.ndarray]], str]:
    """Inputs and PyTorch outputs (fp32) for each validation shape, as flat name -> array dicts, and
    what computed them (see `fp32_reference`)."""
    cases = []
    for b, v in VALIDATION_SHAPES:
        values = spec.example(b, v)
        with torch.no_grad(), fp32_reference(spec.module) as how:
            out = spec.module(*spec.forward_args(values))
        outs = out if isinstance(out, tuple) else (out,)
        case = {f"in:{t.name}": values[t.name].numpy() for t in spec.inputs}
        case.update({f"out:{t.name}": y.float().numpy() for t, y in zip(spec.outputs, outs)})
        cases.append(case)
    return cases, how


def compare(spec: Checked, path: Path | str, cases: list[dict[str, np.ndarray]], precision: str,
            sess: Any = None, metric: str | None = None) -> dict:
    """Run the graph on each case; errors per output (worst over cases) and pass/fail by `metric` (the
    precision's PARITY_METRIC unless given: `verify` re-judges a build by the metric it recorded).

    (fp16 graphs: onnxruntime's CPU kernels compute fp16 MatMuls in fp32 through inserted Casts, so the
    session holds an fp32 copy of every weight -- 4.7 GB for the base decoder's 2.2 GB graph, folded at
    load or, with optimizations off, cast at the start of each run: a 7B fp16 graph cannot be checked
    on a 24 GB CPU machine; docs/benchmarks/scale.md.)"""
    sess = sess or session(path)
    in_types = {i.name: i.type for i in sess.get_inputs()}
    tol = spec.tolerance[precision]
    errors = {t.name: {"max_abs": 0.0, "max_rel": 0.0, "max_scaled": 0.0, "rel_rms": 0.0} for t in spec.outputs}
    shapes = []
    for case in cases:
        feed = {}
        for t in spec.inputs:
            x = case[f"in:{t.name}"]
            feed[t.name] = x.astype(np.float16) if in_types[t.name] == "tensor(float16)" else x
        got = sess.run([t.name for t in spec.outputs], feed)
        # the request-shaped inputs (not each layer's cache: past_len, or a static cache's buffers)
        shapes.append({t.name: list(feed[t.name].shape) for t in spec.inputs
                       if PAST_LEN not in t.dims and not t.name.startswith("past_")})
        for t, g in zip(spec.outputs, got):
            ref = case[f"out:{t.name}"]
            if g.shape != ref.shape:
                raise ParityError(f"{spec.name}: output {t.name}: expected shape {ref.shape}, got {g.shape}")
            keep = _real_positions(t.dims, feed.get(ATTENTION_MASK), ref.shape, feed.get(CACHE_POSITION))
            diff, ref = np.abs(g.astype(np.float32) - ref)[keep], ref[keep]
            err = float(diff.max()) if diff.size else 0.0
            scale = float(np.abs(ref).max()) if ref.size else 0.0
            e = errors[t.name]
            e["max_abs"] = max(e["max_abs"], err)
            e["max_rel"] = max(e["max_rel"], err / scale if scale else 0.0)
            e["max_scaled"] = max(e["max_scaled"], err / max(1.0, scale))
            e["rel_rms"] = max(e["rel_rms"], relative_rms(diff, ref))
    metric = metric or PARITY_METRIC.get(precision, "max_abs")  # a recorded build's own metric, on re-check
    failed = {n: e for n, e in errors.items() if not e[metric] <= tol}  # NaN fails too
    return {"validation_shapes": shapes, "outputs": errors, TOLERANCE_KEY[metric]: tol,
            "passed": not failed, "failed": sorted(failed)}


def relative_rms(diff: np.ndarray, ref: np.ndarray) -> float:
    """||diff||_2 / ||ref||_2 over the real positions (float64); a zero reference: 0 if exact, else inf."""
    d = float(np.linalg.norm(diff.astype(np.float64).ravel())) if diff.size else 0.0
    r = float(np.linalg.norm(ref.astype(np.float64).ravel())) if ref.size else 0.0
    return d / r if r else (0.0 if d == 0 else float("inf"))


# quantization error scales with each output's magnitude (a regression head answers in real units), so
# its tolerance is relative. Weight-only int8/int4 adds noise to every element that accumulates through
# depth: the worst element against the largest (max_rel) measures the tail of that noise, not the signal
# lost (0.46 on base's late-layer KV at int4, random weights), so int8/int4 are judged by relative RMS error
# ||graph - reference||_2 / ||reference||_2 per output and case over the real positions (rel_rms, worst
# over cases); max_abs and max_rel are still recorded. Builds written before judged int8/int4 by max_rel
# (`tolerance_rel`) and are re-checked by what they recorded. fp16 keeps ~3 significant digits
# at any magnitude: absolute for outputs within [-1, 1], relative beyond (max abs / max(1, max |ref|));
# an HSI encoder's features reach |10| on the demo checkpoint, where one fp16 ulp is 0.008. fp32: absolute.
PARITY_METRIC = {"fp16": "max_scaled", "int8": "rel_rms", "int4": "rel_rms"}
# the key of a parity record that names its metric and holds its tolerance
TOLERANCE_KEY = {"max_abs": "tolerance_abs", "max_rel": "tolerance_rel", "max_scaled": "tolerance_scaled",
                 "rel_rms": "tolerance_rms"}


def tolerance_of(parity: dict) -> tuple[str, float]:
    """(metric, tolerance) a manifest's parity record was judged by."""
    for metric, key in TOLERANCE_KEY.items():
        if key in parity:
            return metric, parity[key]
    raise KeyError("parity record has no tolerance")


def failed_outputs(parity: dict) -> str:
    """The failed outputs of a parity record, each with its error and the tolerance it missed."""
    metric, tol = tolerance_of(parity)
    errs = {o: parity["outputs"].get(o, {}).get(metric) for o in parity["failed"]}
    return ", ".join(o if e is None else f"{o}: {metric} {e:.3g} > {tol:g}" for o, e in errs.items())


def _real_positions(dims, attention_mask, shape, cache_position=None) -> np.ndarray:
    """Boolean index of the output elements that belong to real (unpadded) tokens.

    Values at left-padding positions are meaningless and differ between attention kernels, so
    parity is measured on real tokens only: dims named `seq_len` follow the mask's last part (a
    static cache's: the slots at `cache_position`), `total_len` the whole mask."""
    keep = np.ones(shape, dtype=bool)
    if attention_mask is None:
        return keep
    real = attention_mask.astype(bool)  # (B, total_len)
    for axis, d in enumerate(dims):
        if d in (SEQ_LEN, TOTAL_LEN) and axis > 0:
            if d == TOTAL_LEN:
                m = real
            else:
                m = real[:, -shape[axis]:] if cache_position is None else real[:, np.asarray(cache_position)]
            view = [shape[0]] + [1] * (len(shape) - 1)
            view[axis] = shape[axis]
            keep &= m.reshape(view)
    return keep


def save_cases(path: Path, cases: list[dict[str, np.ndarray]]) -> None:
    np.savez_compressed(path, **{f"{i}|{k}": v for i, c in enumerate(cases) for k, v in c.items()})


def load_cases(path: Path) -> list[dict[str, np.ndarray]]:
    with np.load(path) as z:
        cases: dict[int, dict[str, np.ndarray]] = {}
        for key in z.files:
            i, name = key.split("|", 1)
            cases.setdefault(int(i), {})[name] = z[key]
    return [cases[i] for i in sorted(cases)]
