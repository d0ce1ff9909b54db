"""Recognising a checkpoint directory (and telling it from a build) without loading it.

Checkpoints and builds both keep a `manifest.json`; its `format` says which:

    CKPT/manifest.json     format "allspark-checkpoint", schema_version 1, config, modalities, sha256
    BUILD/manifest.json    format "allspark-build", schema_version 2 (`allspark.contract.manifest`)

A command given one where it wants the other says so and gives the command that turns a checkpoint
into a build, instead of "missing field 'created'". Reading a checkpoint's manifest here needs only
`json` (no torch), so `allspark info/new/export` check their arguments in well under a second.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from .jsondir import read_json

CHECKPOINT_FORMAT = "allspark-checkpoint"
CHECKPOINT_SCHEMA_VERSION = 1
BUILD_FORMAT = "allspark-build"  # = manifest.FORMAT (kept here too: manifest.py imports this module)
_NAME = re.compile(r"[a-z][a-z0-9_]*")


def directory_format(path: str | Path) -> str | None:
    """The `format` of `path/manifest.json`, or None (no manifest, unreadable, not an object)."""
    try:
        data = json.loads((Path(path) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return data.get("format") if isinstance(data, dict) and isinstance(data.get("format"), str) else None


def is_checkpoint(path: str | Path) -> bool:
    return directory_format(path) == CHECKPOINT_FORMAT


def is_build(path: str | Path) -> bool:
    return directory_format(path) == BUILD_FORMAT


def export_hint(ckpt: str | Path) -> str:
    return f"allspark export {ckpt} --out BUILD"


def checkpoint_given_as_build(path: str | Path) -> str:
    """The one line for a checkpoint where a build was expected (`allspark run CKPT`)."""
    return f"{path} is a checkpoint, not a build; export it first: {export_hint(path)}"


def build_given_as_checkpoint(path: str | Path, manifest: dict) -> str:
    source = manifest.get("provenance", {}).get("checkpoint") if isinstance(manifest.get("provenance"), dict) else None
    return (f"{path} is a build (exported graphs), not a checkpoint; give the checkpoint it was exported from"
            + (f" ({source})" if source else ""))


def read_checkpoint_manifest(ckpt: str | Path) -> dict[str, Any]:
    """`CKPT/manifest.json`, checked at the JSON level (format, schema version, field types,
    modality names); CheckpointError saying what `ckpt` is instead when it is not a checkpoint."""
    path = Path(ckpt) / "manifest.json"
    manifest = read_json(ckpt, CheckpointError, "checkpoint")
    if manifest.get("format") == BUILD_FORMAT:
        raise CheckpointError(build_given_as_checkpoint(ckpt, manifest))
    if manifest.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: expected format {CHECKPOINT_FORMAT!r}, got {manifest.get('format')!r}")
    if manifest.get("schema_version") != CHECKPOINT_SCHEMA_VERSION:
        raise CheckpointError(f"{path}: expected schema_version {CHECKPOINT_SCHEMA_VERSION}, "
                              f"got {manifest.get('schema_version')!r}")
    for key, typ in (("config", dict), ("modalities", list), ("sha256", dict)):
        if not isinstance(manifest.get(key), typ):
            raise CheckpointError(f"{path}: field {key!r}: expected a JSON {typ.__name__}, got "
                                  f"{type(manifest.get(key)).__name__ if key in manifest else 'nothing'}")
    bad = [m for m in manifest["modalities"] if not (isinstance(m, str) and _NAME.fullmatch(m))]
    if bad:
        raise CheckpointError(f"{path}: modalities: expected lower-case names, got {bad}")
    return manifest


def check_modalities_in(ckpt: str | Path, manifest: dict, wanted: list[str] | None) -> None:
    """Every asked-for modality has a pack in the checkpoint."""
    absent = [m for m in wanted or () if m not in manifest["modalities"]]
    if absent:
        raise CheckpointError(f"{ckpt}: no pack for {absent}; it holds {manifest['modalities']}")
