"""The build manifest (`BUILD/manifest.json`): schema version, validation, reading, typed views.

Schema version 2, top level:

    format "allspark-build", schema_version 2, created, precision, opset, fused_attention,
    config            the model config (AllSparkConfig.to_dict)
    modalities        [name, ...] in adapter-set order; adapter_index {name: i}
    routes            {modality: {encoder, bridge, head}}: component names, null where it has none
    dims              {symbolic dim: {min, opt, max}}
    tokenizer         directory name or null
    sha256            {file: hex} of the files outside components (tokenizer, validation cases)
    components        {name: component}
    provenance        versions, checkpoint path and its manifest's sha256

A build made from a skeleton (`allspark.bench.skeleton`) also has `synthetic_weights` (timing only);
a skeleton itself has `skeleton` and is refused by `read_manifest`.

A component: kind, modality, artifacts {format: {file, sha256 {file: hex}, bytes}}, inputs and
outputs [{name, dtype, dims}], opset, precision, export_seconds, validation, parity, and for the
decoder `cache` {past: [...], present: [...]} (the KV-cache tensor names, in layer order). A decoder
exported with `--static-cache` also has the artifact `onnx-static-cache`: its file plus its own inputs,
outputs, precision, validation cases, parity record and `cache` {past, new}.

Version 1 builds (one `file` per component, no routes) are refused with the command that
re-exports them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import AllSparkError
from .checkpoint import BUILD_FORMAT, CHECKPOINT_FORMAT, checkpoint_given_as_build
from .jsondir import read_json
from .tensors import DECODER_COMPONENT, EMBED_COMPONENT, STATIC_CACHE, Kind

FORMAT = BUILD_FORMAT
SCHEMA_VERSION = 2

TOP_LEVEL = {"format": str, "schema_version": int, "created": str, "precision": str, "opset": int,
             "fused_attention": bool, "config": dict, "modalities": list, "adapter_index": dict,
             "routes": dict, "dims": dict, "sha256": dict, "components": dict, "provenance": dict}
COMPONENT = {"kind": str, "artifacts": dict, "inputs": list, "outputs": list, "opset": int, "precision": str,
             "validation": str, "parity": dict}
ARTIFACT = {"file": str, "sha256": dict, "bytes": int}
TENSOR = {"name": str, "dtype": str, "dims": list}
STATIC_ARTIFACT = {**ARTIFACT, "inputs": list, "outputs": list, "precision": str, "validation": str, "parity": dict,
                   "cache": dict}  # the decoder's `onnx-static-cache` artifact (allspark.export.static_cache)
CONFIG_KEYS = ("name", "llm", "bridge", "modalities")
# a build's graphs without weights, for transfer (allspark.bench.skeleton): refused until filled
SKELETON_KEY = "skeleton"
SYNTHETIC_KEY = "synthetic_weights"  # filled from a skeleton: seeded noise, for timing only


class ManifestError(AllSparkError, ValueError):
    """A build manifest is missing, malformed, or of a schema this version does not read."""


def read_manifest(build: str | Path) -> dict[str, Any]:
    manifest = read_json(build, ManifestError, "build", "; run `allspark export` first")
    if manifest.get("format") == CHECKPOINT_FORMAT:  # `allspark run CKPT`: say what to do, not a missing field
        raise ManifestError(checkpoint_given_as_build(build))
    validate_manifest(manifest, Path(build) / "manifest.json")
    if manifest.get(SKELETON_KEY):
        raise ManifestError(f"{build} is a skeleton build (its graphs' weights were dropped for transfer): make it "
                            f"runnable with seeded weights, for timing only: python -m allspark.bench.skeleton fill "
                            f"{build} OUT")
    return manifest


def require_modality(manifest: dict[str, Any], modality: str, build: str | Path = "BUILD") -> None:
    """ModalityNotInBuildError (one line: what the build has, the export that adds it) unless the
    build serves `modality`."""
    have = list(manifest.get("modalities", []))
    if modality not in have:
        from ..errors import ModalityNotInBuildError

        ckpt = manifest.get("provenance", {}).get("checkpoint") or "CKPT"
        raise ModalityNotInBuildError(modality, tuple(have), f"allspark export {ckpt} --out {build} --overwrite "
                                      f"--modalities {' '.join([*have, modality])}")


def write_manifest(build: Path, manifest: dict[str, Any]) -> None:
    validate_manifest(manifest, build)
    (build / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _check(obj: Any, fields: dict[str, type], where: str) -> None:
    if not isinstance(obj, dict):
        raise ManifestError(f"{where}: expected an object, got {type(obj).__name__}")
    for key, typ in fields.items():
        if key not in obj:
            raise ManifestError(f"{where}: missing field {key!r}")
        if not isinstance(obj[key], typ) or (typ is int and isinstance(obj[key], bool)):
            raise ManifestError(f"{where}.{key}: expected {typ.__name__}, got {type(obj[key]).__name__}")


def validate_manifest(m: Any, where: Path | str = "manifest") -> None:
    if isinstance(m, dict) and m.get("format") == FORMAT and m.get("schema_version") != SCHEMA_VERSION:
        ckpt = m.get("provenance", {}).get("checkpoint", "CHECKPOINT") if isinstance(m.get("provenance"), dict) \
            else "CHECKPOINT"
        build = Path(str(where)).parent if str(where).endswith("manifest.json") else "BUILD"
        raise ManifestError(f"{where}: expected schema_version {SCHEMA_VERSION}, got {m.get('schema_version')!r} "
                            f"(written by another allspark version); re-export it: allspark export {ckpt} --out {build}")
    _check(m, TOP_LEVEL, str(where))
    if m["format"] != FORMAT:
        raise ManifestError(f"{where}: expected format {FORMAT!r}, got {m['format']!r}")
    missing = [k for k in CONFIG_KEYS if k not in m["config"]]
    if missing:
        raise ManifestError(f"{where}: config: missing {missing} (an incomplete model config)")
    comps = m["components"]
    for name, c in comps.items():
        at = f"{where}: components.{name}"
        _check(c, COMPONENT, at)
        try:
            Kind(c["kind"])
        except ValueError:
            raise ManifestError(f"{at}.kind: expected one of {[k.value for k in Kind]}, got {c['kind']!r}") from None
        if not c["artifacts"]:
            raise ManifestError(f"{at}.artifacts: expected at least one artifact (e.g. 'onnx')")
        for fmt, a in c["artifacts"].items():
            _check(a, ARTIFACT, f"{at}.artifacts.{fmt}")
        static = c["artifacts"].get(STATIC_CACHE.name)
        if static is not None:  # a graph with its own tensors, cases and parity record
            _check(static, STATIC_ARTIFACT, f"{at}.artifacts.{STATIC_CACHE.name}")
            _check(static["cache"], {"past": list, "new": list}, f"{at}.artifacts.{STATIC_CACHE.name}.cache")
        for io in ("inputs", "outputs"):
            for i, t in enumerate(c[io]):
                _check(t, TENSOR, f"{at}.{io}[{i}]")
    for needed in (DECODER_COMPONENT, EMBED_COMPONENT):
        if needed not in comps:
            raise ManifestError(f"{where}: no {needed!r} component")
    _check(comps[DECODER_COMPONENT].get("cache"), {"past": list, "present": list}, f"{where}: components.decoder.cache")
    for mod in m["modalities"]:
        if mod not in m["routes"] or mod not in m["adapter_index"]:
            raise ManifestError(f"{where}: modality {mod!r} has no route or adapter index")
        for kind, name in m["routes"][mod].items():
            if name is not None and name not in comps:
                raise ManifestError(f"{where}: routes.{mod}.{kind} names {name!r}, which is not a component")


# ---- typed views -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """The components one modality's requests go through (None: it has none of that kind)."""

    encoder: str | None
    bridge: str | None
    head: str | None
    adapter_index: int


def routes(m: dict[str, Any]) -> dict[str, Route]:
    return {mod: Route(r.get("encoder"), r.get("bridge"), r.get("head"), int(m["adapter_index"][mod]))
            for mod, r in ((mod, m["routes"][mod]) for mod in m["modalities"])}


@dataclass(frozen=True)
class CacheIO:
    past: tuple[str, ...]  # decoder inputs, [key_0, value_0, key_1, ...]
    present: tuple[str, ...]  # decoder outputs, same order


def decoder_cache(m: dict[str, Any]) -> CacheIO:
    c = m["components"][DECODER_COMPONENT]["cache"]
    return CacheIO(tuple(c["past"]), tuple(c["present"]))


def artifact(component: dict[str, Any], fmt: str, name: str = "") -> dict[str, Any]:
    """One artifact of a component, or a ManifestError naming the formats it has."""
    try:
        return component["artifacts"][fmt]
    except KeyError:
        raise ManifestError(f"component {name or component.get('kind')!r} has no {fmt!r} artifact; "
                            f"it has {sorted(component['artifacts'])}") from None


def component_files(component: dict[str, Any]) -> dict[str, str]:
    """Every file of every artifact of a component, with its sha256."""
    files: dict[str, str] = {}
    for a in component["artifacts"].values():
        files.update(a["sha256"])
    return files


def component_bytes(component: dict[str, Any]) -> int:
    """Bytes on disk of all of a component's artifacts."""
    return sum(int(a["bytes"]) for a in component["artifacts"].values())
