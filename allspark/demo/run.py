"""`allspark demo`: the README's main job. Export the embedded default checkpoint once (cached),
then run one held-out sample per modality through a runtime backend: prediction, truth and
per-stage latency. Without the trained demo checkpoint it runs `tiny` (random weights)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..contract.integrity import verify_files
from ..contract.manifest import SCHEMA_VERSION, read_manifest
from ..fsutil import sha256_file

log = logging.getLogger(__name__)

STAGES = ("encoder", "bridge", "decoder", "head", "generate", "total")


def cache_dir() -> Path:
    return Path(os.environ.get("ALLSPARK_CACHE", Path.home() / ".cache" / "allspark"))


def demo_checkpoint() -> tuple[Path, bool]:
    """(checkpoint, trained?): the shipped demo checkpoint, or a tiny random one made once."""
    from . import DEFAULT_CHECKPOINT

    if (DEFAULT_CHECKPOINT / "manifest.json").is_file():
        return DEFAULT_CHECKPOINT, True
    tiny = cache_dir() / "tiny-checkpoint"
    if not (tiny / "manifest.json").is_file():
        from ..model.checkpoint import save_checkpoint
        from ..model.factory import build_model

        save_checkpoint(build_model("tiny", seed=0), tiny)
    return tiny, False


def demo_build(ckpt: Path, progress: bool = True, static_cache: bool = False) -> Path:
    """Export `ckpt` to a build keyed by its manifest hash and the build schema, unless an intact
    one is there: a cached build that fails verification (half-written, damaged) is rebuilt.
    `static_cache`: with the decoder's static-cache graph (a build of its own)."""
    from ..errors import AllSparkError
    from ..export.build import export_build

    key = sha256_file(ckpt / "manifest.json")[:16]
    out = cache_dir() / f"build-v{SCHEMA_VERSION}-{key}{'-static' if static_cache else ''}"
    if out.exists():
        try:
            verify_files(out, read_manifest(out))
            return out
        except AllSparkError as e:
            log.warning("the cached build %s failed verification (%s): exporting it again", out, e)
    else:
        log.info("exporting %s to %s (once; later runs reuse it)", ckpt, out)
    export_build(ckpt, out, progress=progress, static_cache=static_cache)  # replaces a damaged one atomically
    return out


def _samples(runtime, trained: bool, seed: int) -> list[tuple[str, dict[str, Any], str]]:
    """(modality, inputs, truth as text) per modality."""
    if trained:
        from .data import generate
        from .evaluate import EVAL_SEED

        out = []
        for m in runtime.modalities:
            s = generate(m, 1, EVAL_SEED + seed, runtime.config)[0]
            out.append((m, s.inputs, _truth_text(runtime.config.modality(m), s.target)))
        return out
    from ..model.registry import random_inputs

    rng = np.random.default_rng(seed)
    return [(m, random_inputs(runtime.config.modality(m), rng), "n/a (random weights)") for m in runtime.modalities]


def _truth_text(mc, target) -> str:
    if isinstance(target, str):
        return target
    t = np.asarray(target)
    if t.ndim == 0 and mc.labels:
        return mc.labels[int(t)]
    return _values_text(t)


def _values_text(v) -> str:
    flat = np.asarray(v, dtype=np.float64).ravel()
    return " ".join(f"{x:.2f}" for x in flat[:3]) + (" ..." if flat.size > 3 else "")


def run_demo(seed: int = 0, backend: str = "onnxruntime", progress: bool = True) -> dict[str, Any]:
    """{"what", "build", "rows": [{modality, prediction, truth, timings_ms}]}: one sample per modality."""
    from ..runtime import Runtime

    ckpt, trained = demo_checkpoint()
    build = demo_build(ckpt, progress)
    rt = Runtime.load(build, backend=backend)
    rows = []
    for m, inputs, truth in _samples(rt, trained, seed):
        rt.predict(m, inputs)  # warm-up: first calls allocate
        p = rt.predict(m, inputs)
        pred = p.label if p.label is not None else p.text if p.text is not None else _values_text(p.values)
        rows.append({"modality": m, "prediction": pred, "truth": truth, "timings_ms": p.timings_ms})
    what = "demo (trained on synthetic data)" if trained else "tiny (random weights: train the demo checkpoint for real answers)"
    return {"what": what, "build": str(build), "rows": rows}
