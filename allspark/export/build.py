"""`allspark export`: a checkpoint -> a build directory of ONNX graphs plus `manifest.json`.

    BUILD/manifest.json           versioned; everything the runtime, Triton configs and benchmarks read
    BUILD/<component>.onnx        (+ .onnx.data when a graph needs external data)
    BUILD/validation/<component>.npz   inputs and PyTorch outputs behind the recorded parity
    BUILD/tokenizer/              copied from the checkpoint

The build is written into a temporary sibling directory and renamed into place only when every
component exported, passed the checker and matched PyTorch: a failed or killed export leaves no
(half-written) BUILD, and an existing BUILD is replaced only by a complete one.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from .. import __version__
from ..model.checkpoint import load_checkpoint, sha256_file
from ..model.config import Precision
from .manifest import FORMAT, SCHEMA_VERSION, write_manifest
from .onnx_export import export_component
from .specs import component_specs
from .validate import ParityError, compare, reference_cases, save_cases

DTYPES = {Precision.FP32: torch.float32, Precision.FP16: torch.float16}


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
    prec = Precision(precision)
    if prec not in DTYPES:
        raise ValueError(f"precision: expected one of {[p.value for p in DTYPES]}, got {precision!r}")
    ckpt, out = Path(ckpt), Path(out)
    model = load_checkpoint(ckpt, list(modalities) if modalities else None)
    specs = component_specs(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would make the renamed build private to its writer
    try:
        (tmp / "validation").mkdir()
        components, failures = {}, []
        bar = tqdm(specs, desc="export", unit="graph", disable=not progress, leave=False)
        for spec in bar:
            bar.set_postfix_str(spec.name)
            components[spec.name], ok = _export_one(spec, tmp, prec, opset, fuse)
            if not ok:
                failures.append(f"{spec.name} ({', '.join(components[spec.name]['parity']['failed'])})")
        if failures:
            raise ParityError(f"parity against PyTorch failed for: {'; '.join(failures)}")
        if (ckpt / "tokenizer").is_dir():
            shutil.copytree(ckpt / "tokenizer", tmp / "tokenizer")
        manifest = {
            "format": FORMAT, "schema_version": SCHEMA_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "precision": prec.value, "opset": opset, "fused_attention": fuse,
            "config": model.config.to_dict(),
            "modalities": [m.value for m in model.modalities],
            "adapter_index": {m.value: i for i, m in enumerate(model.modalities)},
            "tokenizer": "tokenizer" if (tmp / "tokenizer").is_dir() else None,
            "components": components,
            "provenance": {**_versions(), "checkpoint": str(ckpt.resolve()),
                           "checkpoint_manifest_sha256": sha256_file(ckpt / "manifest.json")},
        }
        write_manifest(tmp, manifest)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _export_one(spec, tmp: Path, prec: Precision, opset: int, fuse: bool) -> tuple[dict, bool]:
    cases = reference_cases(spec)  # fp32 PyTorch outputs, before any cast
    if prec != Precision.FP32:
        spec.module.to(DTYPES[prec])  # in place: never two copies of the weights
    path = tmp / f"{spec.name}.onnx"
    t0 = time.perf_counter()
    facts = export_component(spec, path, opset=opset, fuse=fuse, dtype=DTYPES[prec])
    export_s = time.perf_counter() - t0
    parity = compare(spec, path, cases, prec.value)
    save_cases(tmp / "validation" / f"{spec.name}.npz", cases)
    files = [path.name] + ([path.name + ".data"] if (tmp / (path.name + ".data")).exists() else [])
    entry = {
        "file": path.name, "kind": spec.kind, "modality": spec.modality,
        "sha256": {f: sha256_file(tmp / f) for f in files},
        "bytes": sum((tmp / f).stat().st_size for f in files),
        "inputs": [t.to_json() for t in spec.inputs], "outputs": [t.to_json() for t in spec.outputs],
        "opset": opset, "precision": prec.value, "export_seconds": round(export_s, 2),
        "validation": f"validation/{spec.name}.npz", "parity": parity, **facts,
    }
    return entry, parity["passed"]


def _remove_stale_temps(out: Path) -> None:
    """Temp dirs of earlier exports to `out` whose process is gone (killed midway)."""
    for d in out.parent.glob(f".{out.name}.tmp-*-*"):
        try:
            pid = int(d.name.split(".tmp-", 1)[1].split("-", 1)[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, PermissionError):
            continue


def _replace_dir(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
