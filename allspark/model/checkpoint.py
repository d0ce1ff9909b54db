"""The checkpoint directory format: a JSON manifest plus safetensors.

    CKPT/manifest.json              format, schema_version, config, modalities, sha256 per file
    CKPT/llm/config.json            the base LLM in transformers' layout (LlamaForCausalLM)
    CKPT/llm/model.safetensors      or, past the shard size, model-0000k-of-0000n.safetensors + index
    CKPT/tokenizer/tokenizer.json   (+ tokenizer_config.json, special_tokens_map.json)
    CKPT/packs/<modality>.safetensors   encoder.*, bridge.*, head.*, adapters.<k>.<Lynx name>
    CKPT/convert_report.json        (converted checkpoints) what `allspark convert` used, dropped, created

A checkpoint may hold any subset of the modalities. Saving writes to a temporary directory and
renames it into place, the LLM a shard at a time; loading uses safetensors only and reports every
missing or left-over key.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file

from ..contract.integrity import cached_sha256
from ..contract.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_SCHEMA_VERSION, read_checkpoint_manifest
from ..errors import CheckpointError
from ..fsutil import atomic_directory, sha256_file
from .config import AllSparkConfig
from .model import AllSpark
from .weights import DEFAULT_SHARD_BYTES, ShardWriter, WeightDir, write_safetensors

FORMAT = CHECKPOINT_FORMAT
SCHEMA_VERSION = CHECKPOINT_SCHEMA_VERSION


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


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def save_checkpoint(model: AllSpark, out: str | Path, dtype: torch.dtype | None = None,
                    extra: dict[str, Any] | None = None, shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write `model` to directory `out` (replaced atomically if it exists)."""
    write_checkpoint(out, model.config, model.modalities, model.tokenizer, model.llm.config,
                     ((k, None, lambda v=v: _cast(v, dtype)) for k, v in model.llm.state_dict().items()),
                     {m: {k: _cast(v, dtype) for k, v in pack_state(model, m).items()} for m in model.modalities},
                     shard_bytes=shard_bytes, extra=extra)
    return Path(out)


def replace_packs(model: AllSpark, start: str | Path, out: str | Path, modalities: Sequence[str],
                  dtype: torch.dtype | None = None, extra: dict[str, Any] | None = None) -> Path:
    """The checkpoint `start` with the packs of `modalities` (and the config) taken from `model`,
    written to `out` (may be `start`; replaced atomically): every other file is copied byte for byte,
    and the manifest keeps its fields but config, sha256 and those in `extra`."""
    start = Path(start)
    manifest = read_manifest(start)
    absent = [m for m in modalities if m not in manifest["modalities"]]
    if absent:
        raise CheckpointError(f"{start}: no pack for {absent} to replace; it holds {manifest['modalities']}")
    with atomic_directory(out) as tmp:
        for f in manifest["sha256"]:
            (tmp / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(start / f, tmp / f)
        for m in modalities:
            write_safetensors(tmp / "packs" / f"{m}.safetensors",
                              {k: _cast(v, dtype).contiguous() for k, v in pack_state(model, m).items()},
                              metadata={"modality": m})
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        manifest = {**manifest, "config": model.config.to_dict(), "sha256": {f: sha256_file(tmp / f) for f in files},
                    **(extra or {})}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return Path(out)


def write_checkpoint(out: str | Path, config: AllSparkConfig, modalities: Sequence[str], tokenizer, llm_config,
                     llm_tensors: Iterable[tuple[str, int | None, Callable[[], torch.Tensor]]],
                     packs: dict[str, Mapping[str, torch.Tensor] | Callable[[], Mapping[str, torch.Tensor]]],
                     shard_bytes: int = DEFAULT_SHARD_BYTES, extra: dict[str, Any] | None = None,
                     report: Any = None, on_pack: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The checkpoint directory from its parts. `packs` is consumed (each pack -- or the function
    that makes it, called when its turn comes -- is released once written, before the LLM); the LLM
    comes as (name, bytes or None, read) and is read one tensor at a time into shards of at most
    `shard_bytes`. Returns what was written (files, bytes, largest shard)."""
    with atomic_directory(out) as tmp:
        (tmp / "llm").mkdir()
        (tmp / "packs").mkdir()
        pack_bytes = {}
        for m in modalities:
            pack = packs.pop(m)
            write_safetensors(tmp / "packs" / f"{m}.safetensors",
                              {k: v.contiguous() for k, v in (pack() if callable(pack) else pack).items()},
                              metadata={"modality": m})
            del pack
            pack_bytes[m] = (tmp / "packs" / f"{m}.safetensors").stat().st_size
            if on_pack is not None:
                on_pack(m)
        llm_config.save_pretrained(tmp / "llm")
        writer = ShardWriter(tmp / "llm", "model", shard_bytes)
        for name, size, read in llm_tensors:
            writer.add(name, read, size)
        llm_files = writer.close()
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "tokenizer")
        written = {"llm_files": [f.name for f in llm_files], "llm_bytes": writer.total_bytes,
                   "largest_llm_shard_bytes": writer.largest_shard_bytes, "pack_bytes": pack_bytes}
        if report is not None:
            report.written = written
            (tmp / "convert_report.json").write_text(json.dumps(report.to_json(), indent=2) + "\n")
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        manifest = {
            "format": FORMAT, "schema_version": SCHEMA_VERSION,
            "config": config.to_dict(),
            "modalities": list(modalities),
            "dtype": "/".join(sorted(writer.dtypes)),
            "sha256": {f: sha256_file(tmp / f) for f in files},
            **(extra or {}),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return written


def read_manifest(ckpt: str | Path) -> dict[str, Any]:
    return read_checkpoint_manifest(ckpt)


STORED_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Modules built inside are born in `dtype` (no fp32 copy to cast from)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def stored_dtype(manifest: dict[str, Any]) -> torch.dtype:
    """The LLM's dtype as written; a mixed or unknown one reads as fp32."""
    return STORED_DTYPES.get(manifest.get("dtype", ""), torch.float32)


def verify_files(ckpt: Path, manifest: dict[str, Any], modalities: Sequence[str] | None = None,
                 verify: bool = True) -> list[str]:
    """The modalities to load (all by default), after checking that the LLM's files and their packs
    exist and (with `verify`) match the manifest's sha256."""
    have = manifest["modalities"]
    wanted = list(modalities or have)
    absent = [m for m in wanted if m not in have]
    if absent:
        raise CheckpointError(f"{ckpt}: no pack for {absent}; it holds {have}")
    llm = WeightDir(ckpt / "llm")
    index = [f"llm/{p.name}" for p in (ckpt / "llm").glob("*.index.json")]
    files = [*(f"llm/{p.name}" for p in llm.files), *index, *(f"packs/{m}.safetensors" for m in wanted)]
    for f in files:
        if not (ckpt / f).is_file():
            raise CheckpointError(f"{ckpt}: missing file {f}")
        if verify and cached_sha256(ckpt / f) != manifest["sha256"].get(f):  # hashed once per file version
            raise CheckpointError(f"{ckpt}: {f} does not match its sha256 in the manifest (altered or corrupt)")
    return wanted


def load_checkpoint(ckpt: str | Path, modalities: list[str] | None = None, verify: bool = True,
                    dtype: torch.dtype | None = torch.float32, lazy_llm: bool = False) -> AllSpark:
    """Load a checkpoint directory (optionally only some of its modalities) in `dtype` (None: the
    dtype it was written in -- an fp16 7B checkpoint then loads at its own 13.5 GB, not at 27 GB).
    The model is built in that dtype with the LLM on the meta device, then filled tensor by tensor --
    or, with `lazy_llm`, left there until `load_llm(model, ckpt)` (an export holds the LLM only for
    the components that use it)."""
    from .tokenizer import load_tokenizer

    ckpt = Path(ckpt)
    manifest = read_manifest(ckpt)
    config = AllSparkConfig.from_dict(manifest["config"])
    wanted = verify_files(ckpt, manifest, modalities, verify)
    tok = load_tokenizer(ckpt / "tokenizer") if (ckpt / "tokenizer").is_dir() else None
    dtype = dtype or stored_dtype(manifest)
    with default_dtype(dtype):
        model = AllSpark(config, wanted, tokenizer=tok, llm_device="meta")
    if not lazy_llm:
        load_llm(model, ckpt)
    for m in wanted:
        load_pack_state(model, m, _safe_load(ckpt / f"packs/{m}.safetensors"))
    return model.to(dtype)


def load_llm(model: AllSpark, ckpt: str | Path) -> None:
    """Fill the meta-device LLM of a `lazy_llm` model from the checkpoint, a tensor at a time (in the
    dtype the model was built in); a no-op once loaded."""
    if not any(t.is_meta for t in [*model.llm.parameters(), *model.llm.buffers()]):
        return
    _load_streaming(model.llm, WeightDir(Path(ckpt) / "llm"))
    _materialise_buffers(model.llm)


def _load_streaming(module: torch.nn.Module, weights: WeightDir) -> None:
    """The module's state from `weights`, one tensor in memory at a time: each becomes its parameter
    (or buffer) in place of the meta or random one (no second full copy of a multi-GB LLM)."""
    targets = {**dict(module.named_parameters(remove_duplicate=False)),
               **dict(module.named_buffers(remove_duplicate=False))}
    expected = set(module.state_dict())
    _report("llm", expected, set(weights.shapes()))
    for name, t in weights.tensors():
        dst = targets[name]
        if tuple(t.shape) != tuple(dst.shape):
            raise CheckpointError(f"llm: {name}: expected shape {tuple(dst.shape)}, got {tuple(t.shape)}")
        prefix, _, leaf = name.rpartition(".")
        owner = module.get_submodule(prefix) if prefix else module
        t = t.to(dst.dtype)
        if isinstance(dst, torch.nn.Parameter):  # (a meta parameter cannot take CPU data: it is replaced)
            owner._parameters[leaf] = torch.nn.Parameter(t, requires_grad=dst.requires_grad)
        else:
            owner._buffers[leaf] = t


def _materialise_buffers(llm: torch.nn.Module) -> None:
    """Buffers no checkpoint holds (the rotary embedding's inverse frequencies) are computed again
    for a model built on the meta device; anything else still on meta is an error."""
    for name, mod in llm.named_modules():
        if type(mod).__name__.endswith("RotaryEmbedding") and any(b.is_meta for b in mod.buffers()):
            with default_dtype(torch.float32):
                fresh = type(mod)(config=llm.config)
            parent = llm.get_submodule(name.rsplit(".", 1)[0]) if "." in name else llm
            setattr(parent, name.rsplit(".", 1)[-1], fresh)
    left = [n for n, t in [*llm.named_parameters(), *llm.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"llm: {len(left)} tensors were not loaded: {left[:5]}")


def _safe_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error types for truncated/garbled files
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
