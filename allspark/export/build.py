"""`allspark export`: a checkpoint -> a build directory of ONNX graphs plus `manifest.json`.

    BUILD/manifest.json           the contract (`allspark.contract.manifest`): what the runtime,
                                  Triton configs and benchmarks read
    BUILD/<component>.onnx        (+ .onnx.data when a graph needs external data)
    BUILD/validation/<component>.npz   inputs and PyTorch outputs behind the recorded parity
    BUILD/tokenizer/              copied from the checkpoint

The build is written into a temporary sibling directory and renamed into place only when every
component exported, passed the checker and matched PyTorch: a failed or killed export leaves no
(half-written) BUILD, and an existing BUILD is replaced only by a complete one.
"""

from __future__ import annotations

import datetime as _dt
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from .. import __version__
from ..contract.manifest import FORMAT, SCHEMA_VERSION, write_manifest
from ..contract.tensors import ONNX, PRECISION_DTYPES, Kind, dim_ranges
from ..errors import ConfigError
from ..fsutil import atomic_directory, sha256_file
from ..model.checkpoint import load_checkpoint
from ..model.config import Precision
from ..model.model import AllSpark
from .onnx_export import export_component
from .specs import ComponentSpec, component_specs, routes
from .validate import ParityError, compare, reference_cases, save_cases


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import transformers

    return {"allspark": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "transformers": transformers.__version__}


def export_build(ckpt: str | Path, out: str | Path, modalities: Sequence[str] | None = None,
                 precision: str = "fp32", opset: int = 23, fuse: bool = True,
                 progress: bool = True) -> dict:
    """Export every component of `ckpt` (or of the given modalities) into directory `out`."""
    try:
        prec = Precision(precision)
    except ValueError:
        raise ConfigError(f"precision: expected one of {[p.value for p in Precision]}, got {precision!r}") from None
    ckpt, out = Path(ckpt), Path(out)
    model = load_checkpoint(ckpt, list(modalities) if modalities else None)
    specs = component_specs(model)
    with atomic_directory(out) as tmp:
        (tmp / "validation").mkdir()
        components, failures = {}, []
        bar = tqdm(specs, desc="export", unit="component", disable=not progress, leave=False)
        for spec in bar:
            bar.set_postfix_str(spec.name)
            components[spec.name], ok = _export_one(spec, tmp, prec, opset, fuse)
            if not ok:
                failures.append(f"{spec.name} ({', '.join(components[spec.name]['parity']['failed'])})")
        if failures:
            raise ParityError(f"parity against PyTorch failed for: {'; '.join(failures)}")
        if (ckpt / "tokenizer").is_dir():
            shutil.copytree(ckpt / "tokenizer", tmp / "tokenizer")
        others = sorted(p.relative_to(tmp).as_posix() for d in ("tokenizer", "validation") for p in (tmp / d).rglob("*")
                        if p.is_file())
        manifest = {
            "format": FORMAT, "schema_version": SCHEMA_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "precision": prec.value, "opset": opset, "fused_attention": fuse,
            "config": model.config.to_dict(),
            "modalities": list(model.modalities),
            "adapter_index": {m: i for i, m in enumerate(model.modalities)},
            "routes": routes(model, specs),
            "dims": {k: r.to_json() for k, r in _dim_ranges(model, specs).items()},
            "tokenizer": "tokenizer" if (tmp / "tokenizer").is_dir() else None,
            "sha256": {f: sha256_file(tmp / f) for f in others},
            "components": components,
            "provenance": {**_versions(), "checkpoint": str(ckpt.resolve()),
                           "checkpoint_manifest_sha256": sha256_file(ckpt / "manifest.json")},
        }
        write_manifest(tmp, manifest)
    return manifest


def _dim_ranges(model: AllSpark, specs: list[ComponentSpec]):
    media = [int(s.outputs[0].dims[1]) for s in specs if s.kind == Kind.ENCODER] or [1]
    c = model.config
    return dim_ranges(c.max_prompt_tokens, c.bridge.num_latents, c.llm.max_position_embeddings, max(media))


def _export_one(spec: ComponentSpec, tmp: Path, prec: Precision, opset: int, fuse: bool) -> tuple[dict, bool]:
    cases = reference_cases(spec)  # fp32 PyTorch outputs, before any cast
    dtype = getattr(torch, PRECISION_DTYPES[prec.value])
    if prec != Precision.FP32:
        spec.module.to(dtype)  # in place: never two copies of the weights
    path = tmp / f"{spec.name}{ONNX.suffix}"
    t0 = time.perf_counter()
    facts = export_component(spec, path, opset=opset, fuse=fuse, dtype=dtype)
    export_s = time.perf_counter() - t0
    parity = compare(spec, path, cases, prec.value)
    save_cases(tmp / "validation" / f"{spec.name}.npz", cases)
    files = [path.name] + ([path.name + ".data"] if (tmp / (path.name + ".data")).exists() else [])
    entry = {
        "kind": spec.kind.value, "modality": spec.modality,
        "artifacts": {ONNX.name: {"file": path.name, "sha256": {f: sha256_file(tmp / f) for f in files},
                                  "bytes": sum((tmp / f).stat().st_size for f in files), **facts}},
        "inputs": [t.to_json() for t in spec.inputs], "outputs": [t.to_json() for t in spec.outputs],
        "opset": opset, "precision": prec.value, "export_seconds": round(export_s, 2),
        "validation": f"validation/{spec.name}.npz", "parity": parity,
    }
    if spec.cache is not None:
        entry["cache"] = {"past": list(spec.cache.past), "present": list(spec.cache.present)}
    return entry, parity["passed"]
