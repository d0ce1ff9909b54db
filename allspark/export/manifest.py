"""The build manifest: its schema, reading with clear errors, and `verify`.

Schema (version 1), top level: format, schema_version, created, precision, opset, fused_attention,
config, modalities, adapter_index, tokenizer, components, provenance. Per component: file, kind,
modality, sha256 {file: hex}, bytes, inputs/outputs [{name, dtype, dims}], opset, precision,
export_seconds, validation, parity {validation_shapes, outputs {name: {max_abs, max_rel}},
tolerance_abs, passed, failed}, external_data, nodes, attention_ops.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import AllSparkError, read_json_manifest
from ..model.checkpoint import sha256_file

FORMAT = "allspark-build"
SCHEMA_VERSION = 1

TOP_LEVEL = {"format": str, "schema_version": int, "created": str, "precision": str, "opset": int,
             "fused_attention": bool, "config": dict, "modalities": list, "adapter_index": dict,
             "components": dict, "provenance": dict}
COMPONENT = {"file": str, "kind": str, "sha256": dict, "bytes": int, "inputs": list, "outputs": list,
             "opset": int, "precision": str, "validation": str, "parity": dict}
TENSOR = {"name": str, "dtype": str, "dims": list}
KINDS = {"encoder", "bridge", "head", "embed_tokens", "decoder"}


class ManifestError(AllSparkError, ValueError):
    pass


def write_manifest(build: Path, manifest: dict[str, Any]) -> None:
    validate_manifest(manifest, build)
    (build / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(build: str | Path) -> dict[str, Any]:
    manifest = read_json_manifest(build, ManifestError, "build", "; run `allspark export` first")
    validate_manifest(manifest, Path(build) / "manifest.json")
    return manifest


def _check(obj: Any, fields: dict[str, type], where: str) -> None:
    if not isinstance(obj, dict):
        raise ManifestError(f"{where}: expected an object, got {type(obj).__name__}")
    for key, typ in fields.items():
        if key not in obj:
            raise ManifestError(f"{where}: missing field {key!r}")
        if not isinstance(obj[key], typ) or (typ is int and isinstance(obj[key], bool)):
            raise ManifestError(f"{where}.{key}: expected {typ.__name__}, got {type(obj[key]).__name__}")


def validate_manifest(m: Any, where: Path | str = "manifest") -> None:
    _check(m, TOP_LEVEL, str(where))
    if m["format"] != FORMAT:
        raise ManifestError(f"{where}: expected format {FORMAT!r}, got {m['format']!r}")
    if m["schema_version"] != SCHEMA_VERSION:
        raise ManifestError(f"{where}: expected schema_version {SCHEMA_VERSION}, got {m['schema_version']}")
    for name, c in m["components"].items():
        at = f"{where}: components.{name}"
        _check(c, COMPONENT, at)
        if c["kind"] not in KINDS:
            raise ManifestError(f"{at}.kind: expected one of {sorted(KINDS)}, got {c['kind']!r}")
        for io in ("inputs", "outputs"):
            for i, t in enumerate(c[io]):
                _check(t, TENSOR, f"{at}.{io}[{i}]")
    for needed in ("decoder", "embed_tokens"):
        if needed not in m["components"]:
            raise ManifestError(f"{where}: no {needed!r} component")


def verify_build(build: str | Path, parity: bool = True) -> list[str]:
    """Re-check every file's sha256 and (optionally) each graph's parity against the stored
    PyTorch outputs. Returns problems, one line per component; empty means the build is intact."""
    from .specs import TensorSpec
    from .validate import compare, load_cases

    build = Path(build)
    m = read_manifest(build)
    problems = []
    for name, c in m["components"].items():
        bad = [f for f, h in c["sha256"].items()
               if not (build / f).is_file() or sha256_file(build / f) != h]
        if bad:
            problems.append(f"{name}: {', '.join(bad)} altered or missing (sha256 mismatch)")
            continue
        if parity:
            spec = _StoredSpec(name, [TensorSpec(t["name"], t["dtype"], tuple(t["dims"])) for t in c["inputs"]],
                               [TensorSpec(t["name"], t["dtype"], tuple(t["dims"])) for t in c["outputs"]],
                               {c["precision"]: c["parity"]["tolerance_abs"]})
            r = compare(spec, build / c["file"], load_cases(build / c["validation"]), c["precision"])
            if not r["passed"]:
                worst = {o: r["outputs"][o]["max_abs"] for o in r["failed"]}
                problems.append(f"{name}: parity drifted beyond {r['tolerance_abs']:g}: {worst}")
    return problems


class _StoredSpec:
    """The slice of ComponentSpec that `compare` needs, rebuilt from the manifest."""

    def __init__(self, name, inputs, outputs, tolerance):
        self.name, self.inputs, self.outputs, self.tolerance = name, tuple(inputs), tuple(outputs), tolerance
