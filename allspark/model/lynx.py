"""Importers: a transformers LLaMA/Vicuna directory and a Lynx/AllSpark training checkpoint.

A Lynx checkpoint is ``{"model": state_dict}`` or the bare state dict, without the frozen base LLM
(that comes from the Vicuna directory the training used). Its keys, per ALLSPARK.md:
``vision_encoder.*`` (EVA ViT), ``bridge.*`` (Perceiver resampler), ``LLM.model.layers.i.
output_adapter.*`` on adapter layers, and optionally ``head.*`` / ``encoder.*`` (AllSpark packs).
Every key is accounted for: used, dropped for a stated reason, or reported as left over.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import CheckpointError
from .config import AllSparkConfig, LLMConfig
from .model import AllSpark
from .presets import get_preset
from .registry import resolve_modality, spec

_ADAPTER_KEY = re.compile(r"^LLM\.model\.layers\.(\d+)\.output_adapter\.(.+)$")
_DROPPABLE = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


@dataclass
class ImportReport:
    used: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)  # key -> why
    left_over: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"used {len(self.used)} keys, dropped {len(self.dropped)}, "
                 f"left over {len(self.left_over)}, missing {len(self.missing)}"]
        lines += [f"  left over: {k}" for k in self.left_over[:20]]
        lines += [f"  missing:   {k}" for k in self.missing[:20]]
        return "\n".join(lines)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """safetensors, or a torch pickle loaded with weights_only=True (never a full unpickle)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        if path.suffix == ".safetensors":
            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be read as safetensors or a weights-only torch file ({e})") from None
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor) or {{'model': state dict}}")
    return sd


def read_llama_dir(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json as dict, state dict) of a transformers LLaMA/Vicuna directory."""
    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{path}: not a transformers model directory (no config.json)")
    cfg = json.loads(cfg_path.read_text())
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors or pytorch_model*.bin weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_state_dict_file(f))
    return cfg, state


def llm_config_from_hf(hf: dict, adapter_size: int, adapter_freq: int) -> LLMConfig:
    try:
        return LLMConfig(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"], adapter_size=adapter_size,
            adapter_freq=adapter_freq, rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=hf.get("rope_theta", 10000.0),
            max_position_embeddings=hf.get("max_position_embeddings", 2048))
    except KeyError as e:
        raise CheckpointError(f"LLaMA config.json lacks {e}") from None


def _adapter_layout(sd: dict[str, torch.Tensor]) -> tuple[list[int], int]:
    layers = sorted({int(m.group(1)) for k in sd if (m := _ADAPTER_KEY.match(k))})
    if not layers:
        raise CheckpointError("Lynx checkpoint has no LLM.model.layers.N.output_adapter.* keys")
    down = sd[f"LLM.model.layers.{layers[0]}.output_adapter.adapter_down.weight"]
    return layers, down.shape[0]


def import_lynx(lynx_file: str | Path, llm_dir: str | Path, modality: str, preset: str = "paper",
                allow_missing: bool = False) -> tuple[AllSpark, ImportReport]:
    """Build a one-modality AllSpark from a Lynx checkpoint and its base LLM directory.

    Sizes the weights cannot tell (heads, label names) come from `preset`; every shape is checked.
    """
    m = resolve_modality(modality)
    sd = load_state_dict_file(lynx_file)
    hf_cfg, llm_state = read_llama_dir(llm_dir)
    layers, adapter_size = _adapter_layout(sd)
    freq = layers[1] - layers[0] if len(layers) > 1 else hf_cfg["num_hidden_layers"]
    base = get_preset(preset)
    cfg = AllSparkConfig(name=f"lynx-{m}", llm=llm_config_from_hf(hf_cfg, adapter_size, freq),
                         bridge=base.bridge, modalities=(base.modality(m),),
                         max_prompt_tokens=base.max_prompt_tokens)
    if tuple(layers) != cfg.llm.adapter_layers:
        raise CheckpointError(f"adapters on layers {layers}, expected every {freq}-th: {cfg.llm.adapter_layers}")
    model = AllSpark(cfg, [m])
    report = ImportReport()

    # base LLM: transformers' own names; Lynx may add a [PAD] row, which we keep as is.
    llm_state = {k: v for k, v in llm_state.items() if not _DROPPABLE.search(k)}
    _load_strict(model.llm, llm_state, "base LLM", report, allow_missing)

    pack_sd: dict[str, torch.Tensor] = {}
    prefixes = {spec(m).lynx_prefix: "encoder.", "encoder.": "encoder.", "bridge.": "bridge.", "head.": "head."}
    for k, v in sd.items():
        if (a := _ADAPTER_KEY.match(k)):
            pack_sd[f"adapters.{layers.index(int(a.group(1)))}.{a.group(2)}"] = v
        elif _DROPPABLE.search(k):
            report.dropped[k] = "rotary inv_freq buffer (recomputed)"
        elif k.startswith("LLM."):
            report.dropped[k] = "base LLM weight in the training checkpoint: the --llm directory's is used"
        elif (p := next((p for p in prefixes if k.startswith(p)), None)) and spec(m).has_encoder:
            pack_sd[prefixes[p] + k[len(p):]] = v
        else:
            report.left_over.append(k)
    _load_pack(model, m, pack_sd, report, allow_missing)
    model.tokenizer = _maybe_tokenizer(Path(llm_dir))
    if report.left_over:
        raise CheckpointError(f"{lynx_file}: keys left over that belong nowhere: {report.left_over[:10]}")
    return model, report


def _load_strict(module: torch.nn.Module, state: dict, what: str, report: ImportReport, allow_missing: bool) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    for k in extra:
        report.left_over.append(f"{what}: {k}")
    if missing and not allow_missing:
        raise CheckpointError(f"{what}: missing keys {missing[:10]} (pass allow_missing to keep them initialised)")
    report.missing += [f"{what}: {k}" for k in missing]
    for k, v in state.items():
        if k in own and own[k].shape != v.shape:
            raise CheckpointError(f"{what}: {k}: expected shape {tuple(own[k].shape)}, got {tuple(v.shape)}")
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    report.used += [f"{what}: {k}" for k in state if k in own]


def _load_pack(model: AllSpark, m: str, sd: dict, report: ImportReport, allow_missing: bool) -> None:
    from .checkpoint import load_pack_state, pack_state

    own = pack_state(model, m)
    missing = sorted(set(own) - set(sd))
    if missing and not allow_missing:
        raise CheckpointError(f"pack {m!r}: missing keys {missing[:10]} (a Lynx checkpoint has no task "
                              "head; pass allow_missing to keep it initialised)")
    report.missing += [f"pack {m}: {k}" for k in missing]
    merged = {k: v.detach().clone() for k, v in own.items()}
    for k, v in sd.items():
        if k not in own:
            report.left_over.append(k)
        elif own[k].shape != v.shape:
            raise CheckpointError(f"pack {m!r}: {k}: expected shape {tuple(own[k].shape)}, got {tuple(v.shape)}")
        else:
            merged[k] = v
            report.used.append(k)
    load_pack_state(model, m, merged)


def export_lynx_state(model: AllSpark, modality: str) -> dict[str, torch.Tensor]:
    """The inverse of `import_lynx` for one modality: a Lynx-format training state dict."""
    from .checkpoint import pack_state

    m = resolve_modality(modality)
    out: dict[str, torch.Tensor] = {}
    layer_ids = model.config.llm.adapter_layers
    enc_prefix = spec(m).lynx_prefix
    for k, v in pack_state(model, m).items():
        if k.startswith("adapters."):
            _, idx, rest = k.split(".", 2)
            out[f"LLM.model.layers.{layer_ids[int(idx)]}.output_adapter.{rest}"] = v
        elif k.startswith("encoder."):
            out[enc_prefix + k[len("encoder."):]] = v
        else:
            out[k] = v
    return out


def import_llama(llm_dir: str | Path, preset: str = "paper", modalities: list[str] | None = None,
                 adapter_size: int | None = None) -> AllSpark:
    """A transformers LLaMA/Vicuna directory as the base LLM, with fresh packs from `preset`."""
    hf_cfg, llm_state = read_llama_dir(llm_dir)
    base = get_preset(preset)
    llm = llm_config_from_hf(hf_cfg, adapter_size or base.llm.adapter_size, base.llm.adapter_freq)
    cfg = dataclasses.replace(base, name=f"{preset}+{Path(llm_dir).name}", llm=llm)
    model = AllSpark(cfg, modalities)
    _load_strict(model.llm, {k: v for k, v in llm_state.items() if not _DROPPABLE.search(k)},
                 "base LLM", ImportReport(), allow_missing=False)
    model.tokenizer = _maybe_tokenizer(Path(llm_dir))
    return model


def _maybe_tokenizer(path: Path):
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": "[PAD]"})
    return tok
