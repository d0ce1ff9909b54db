"""The checkpoint directory format: a JSON manifest plus safetensors.

    CKPT/manifest.json              format, schema_version, config, modalities, sha256 per file
    CKPT/llm/config.json            the base LLM in transformers' layout (LlamaForCausalLM)
    CKPT/llm/model.safetensors
    CKPT/tokenizer/tokenizer.json   (+ tokenizer_config.json, special_tokens_map.json)
    CKPT/packs/<modality>.safetensors   encoder.*, bridge.*, head.*, adapters.<k>.<Lynx name>

A checkpoint may hold any subset of the modalities. Saving writes to a temporary directory and
renames it into place; loading uses safetensors only and reports every missing or left-over key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file

from ..contract.manifest import read_json
from ..errors import CheckpointError
from ..fsutil import atomic_directory, sha256_file
from .config import AllSparkConfig
from .model import AllSpark

FORMAT = "allspark-checkpoint"
SCHEMA_VERSION = 1


def pack_state(model: AllSpark, modality: str) -> dict[str, torch.Tensor]:
    """One modality's pack: its encoder, bridge, head and (sliced out of the stack) adapter set."""
    i = model.adapter_index(modality)
    state = {k: v for k, v in model.packs[modality].state_dict().items()}
    for k, adapter in enumerate(model.adapters):
        state.update({f"adapters.{k}.{name}": t for name, t in adapter.lynx_state(i).items()})
    return state


def load_pack_state(model: AllSpark, modality: str, state: Mapping[str, torch.Tensor]) -> None:
    i = model.adapter_index(modality)
    adapter_keys = {k for k in state if k.startswith("adapters.")}
    pack = model.packs[modality]
    expected = set(pack.state_dict())
    given = set(state) - adapter_keys
    want_adapter = {f"adapters.{k}.{n}" for k in range(len(model.adapters))
                    for n in model.adapters[k].lynx_state(i)}
    _report(f"pack {modality!r}", expected | want_adapter, given | adapter_keys)
    try:
        pack.load_state_dict({k: state[k] for k in given}, strict=True)
        for k, adapter in enumerate(model.adapters):
            prefix = f"adapters.{k}."
            adapter.load_lynx_state(i, {n[len(prefix):]: t for n, t in state.items() if n.startswith(prefix)})
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"pack {modality!r}: {e}") from None


def _report(what: str, expected: set[str], given: set[str]) -> None:
    missing, extra = sorted(expected - given), sorted(given - expected)
    if missing or extra:
        raise CheckpointError(
            f"{what}: {len(missing)} missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}; "
            f"{len(extra)} unexpected keys {extra[:8]}{'...' if len(extra) > 8 else ''}")


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
            for k, v in state.items()}


def save_checkpoint(model: AllSpark, out: str | Path, dtype: torch.dtype | None = None,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write `model` to directory `out` (replaced atomically if it exists)."""
    out = Path(out)
    with atomic_directory(out) as tmp:
        (tmp / "llm").mkdir()
        (tmp / "packs").mkdir()
        model.llm.config.save_pretrained(tmp / "llm")
        save_file(_cast(model.llm.state_dict(), dtype), tmp / "llm" / "model.safetensors")
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(tmp / "tokenizer")
        for m in model.modalities:
            save_file(_cast(pack_state(model, m), dtype), tmp / "packs" / f"{m}.safetensors",
                      metadata={"modality": m})
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        manifest = {
            "format": FORMAT, "schema_version": SCHEMA_VERSION,
            "config": model.config.to_dict(),
            "modalities": list(model.modalities),
            "dtype": str(dtype or next(model.parameters()).dtype).replace("torch.", ""),
            "sha256": {f: sha256_file(tmp / f) for f in files},
            **(extra or {}),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def read_manifest(ckpt: str | Path) -> dict[str, Any]:
    path = Path(ckpt) / "manifest.json"
    manifest = read_json(ckpt, CheckpointError, "checkpoint")
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: expected format {FORMAT!r}, got {manifest.get('format')!r}")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise CheckpointError(f"{path}: expected schema_version {SCHEMA_VERSION}, got {manifest.get('schema_version')!r}")
    for key in ("config", "modalities", "sha256"):
        if key not in manifest:
            raise CheckpointError(f"{path}: missing field {key!r}")
    return manifest


def load_checkpoint(ckpt: str | Path, modalities: list[str] | None = None, verify: bool = True,
                    dtype: torch.dtype = torch.float32) -> AllSpark:
    """Load a checkpoint directory (optionally only some of its modalities)."""
    from .tokenizer import load_tokenizer

    ckpt = Path(ckpt)
    manifest = read_manifest(ckpt)
    config = AllSparkConfig.from_dict(manifest["config"])
    have = manifest["modalities"]
    wanted = modalities or have
    absent = [m for m in wanted if m not in have]
    if absent:
        raise CheckpointError(f"{ckpt}: no pack for {absent}; it holds {have}")
    files = ["llm/model.safetensors", *(f"packs/{m}.safetensors" for m in wanted)]
    for f in files:
        if not (ckpt / f).is_file():
            raise CheckpointError(f"{ckpt}: missing file {f}")
        if verify and sha256_file(ckpt / f) != manifest["sha256"].get(f):
            raise CheckpointError(f"{ckpt}: {f} does not match its sha256 in the manifest (altered or corrupt)")
    tok = load_tokenizer(ckpt / "tokenizer") if (ckpt / "tokenizer").is_dir() else None
    model = AllSpark(config, wanted, tokenizer=tok)
    llm_state = _safe_load(ckpt / "llm/model.safetensors")
    _report("llm", set(model.llm.state_dict()), set(llm_state))
    model.llm.load_state_dict(llm_state, strict=True)
    for m in wanted:
        load_pack_state(model, m, _safe_load(ckpt / f"packs/{m}.safetensors"))
    return model.to(dtype)


def _safe_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error types for truncated/garbled files
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
