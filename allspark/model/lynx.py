"""Importers: a Lynx/AllSpark training checkpoint (with its base LLM directory, and EVA's own vision
file if the checkpoint lacks the frozen encoder) -> a checkpoint directory; a transformers LLaMA
directory as the base LLM of fresh packs.

What a Lynx training checkpoint holds (bytedance/lynx-llm; ALLSPARK.md), under optional `module.`
/ `model.` wrappers:

    vision_encoder.{cls_token, pos_embed, patch_embed.proj.*, blocks.i.{norm1, attn.{q,k,v}_proj,
                    attn.proj, norm2, mlp.fc1, mlp.fc2}.*}          (AllSpark packs: encoder.*)
    bridge.{latents, layers.j.0.{norm_media, norm_latents, to_q, to_kv, to_out}, layers.j.1.{0,1,3}, norm}
    LLM.model.layers.i.output_adapter.{scaling (1,), adapter_norm_before, adapter_down, adapter_up}
    LLM.* (the frozen base: taken from --llm), absolute_frame_pos_embed (video only), head.* (AllSpark)

EVA's `eva_vit_g.pth` names the vision weights its own way — fused `blocks.i.attn.qkv.weight`
(q; k; v), `attn.q_bias`, `attn.v_bias` (k has no bias), `pos_embed` for 224 px — which Lynx renames
to q/k/v_proj and interpolates bicubically to its grid on load; `eva_layout_to_lynx` and
`interpolate_pos_embed` do exactly that.

Every dimension is read from the weights' shapes and the LLM's config.json; what shapes cannot tell
(a ViT's or the bridge's head count, normalisation, label names, an image size the weights do not
fix) comes from `--config`, else from Lynx's conventions or the modality's paper defaults — each
recorded in the report with where it came from. The conversion streams the base LLM a tensor at a
time into shards of bounded size; no model is instantiated.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from .adapters import LYNX_ADAPTER_KEYS, StackedAdapter
from .config import AllSparkConfig, BridgeConfig, LLMConfig, ModalityConfig
from .heads import make_head
from .model import AllSpark, ModalityPack, llama_config
from .presets import get_preset
from .registry import resolve_modality, spec
from .weights import (
    DEFAULT_SHARD_BYTES,
    WeightDir,
    load_state_dict_file,
    strip_prefixes,
)

_ADAPTER_KEY = re.compile(r"^LLM\.model\.layers\.(\d+)\.output_adapter\.(.+)$")
_ROTARY = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
FRAME_POS = "absolute_frame_pos_embed"
LYNX_BRIDGE_HEAD_DIM = 64  # Lynx builds its PerceiverResampler with the default dim_head=64
EMBEDDING_ROWS = ("model.embed_tokens.weight", "lm_head.weight")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class ConversionReport:
    """Every source key used, dropped (with why) or renamed; every weight created fresh (with why);
    every dimension with where it came from."""

    sources: dict[str, str] = field(default_factory=dict)
    dims: dict[str, str] = field(default_factory=dict)
    used: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)
    renamed: dict[str, str] = field(default_factory=dict)
    created: dict[str, str] = field(default_factory=dict)
    prefixes_removed: dict[str, int] = field(default_factory=dict)
    written: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"used {len(self.used)} weights, renamed {len(self.renamed)}, dropped {len(self.dropped)}, "
                 f"created fresh {len(self.created)}"]
        if self.prefixes_removed:
            lines.append("removed wrappers: " + ", ".join(f"{p!r} from {n} keys" for p, n in self.prefixes_removed.items()))
        lines += [f"  {k:<24} {v}" for k, v in self.dims.items()]
        reasons: dict[str, list[str]] = {}
        for k, why in self.dropped.items():
            reasons.setdefault(why, []).append(k)
        lines += [f"  dropped {len(ks)} ({why}): {', '.join(ks[:3])}{' ...' if len(ks) > 3 else ''}"
                  for why, ks in reasons.items()]
        lines += [f"  created fresh: {k} ({why})" for k, why in self.created.items()]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- the vision file -----------------------------------------------------------------------------------


def eva_layout_to_lynx(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """EVA's fused attention weights under Lynx's names, as `create_eva_vit_g` renames them: qkv.weight
    split into q/k/v_proj.weight (q; k; v stacked), q_bias -> q_proj.bias, v_bias -> v_proj.bias."""
    out: dict[str, torch.Tensor] = {}
    renamed: dict[str, str] = {}
    for k, v in sd.items():
        if k.endswith(".attn.qkv.weight"):
            base = k[: -len("qkv.weight")]
            for part, t in zip(("q", "k", "v"), torch.split(v, v.shape[0] // 3, dim=0)):
                out[f"{base}{part}_proj.weight"] = t
            renamed[k] = f"{base}{{q,k,v}}_proj.weight"
        elif k.endswith(".attn.q_bias") or k.endswith(".attn.v_bias"):
            new = k[: -len("q_bias")] + ("q_proj.bias" if k.endswith("q_bias") else "v_proj.bias")
            out[new] = v
            renamed[k] = new
        else:
            out[k] = v
    return out, renamed


def interpolate_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """Lynx's `interpolate_pos_embed`: the class token kept, the square grid of position embeddings
    resized bicubically (align_corners=False) to grid x grid. pos (1, 1 + g*g, W)."""
    extra, tokens = pos[:, :1], pos[:, 1:]
    g = math.isqrt(tokens.shape[1])
    if g == grid:
        return pos
    width = tokens.shape[-1]
    t = tokens.float().reshape(-1, g, g, width).permute(0, 3, 1, 2)
    t = torch.nn.functional.interpolate(t, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([extra.float(), t.permute(0, 2, 3, 1).flatten(1, 2)], dim=1).to(pos.dtype)


# ---- dimensions from shapes ------------------------------------------------------------------------------


def _shapes(sd: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def infer_bridge(shapes: Mapping[str, tuple[int, ...]], hints: Mapping[str, Any]
                 ) -> tuple[BridgeConfig, int, dict[str, str]]:
    """(config, media width, notes) of a Perceiver resampler from its weights (Lynx's names)."""
    try:
        num_latents, dim = shapes["latents"]
        inner, _ = shapes["layers.0.0.to_q.weight"]
        media = shapes["layers.0.0.to_kv.weight"][1]
        ff = shapes["layers.0.1.1.weight"][0]
    except KeyError as e:
        raise CheckpointError(f"bridge: no {e.args[0]!r} among its weights; expected Lynx's Perceiver resampler") from None
    depth = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("layers."))
    notes = {"bridge latents": f"{num_latents} (weights)", "bridge depth": f"{depth} (weights)",
             "bridge media width": f"{media} (weights)", "bridge ff_mult": f"{ff // dim} (weights)"}
    if "heads" in hints or "head_dim" in hints:
        head_dim = int(hints.get("head_dim", inner // int(hints.get("heads", 1))))
        src = "--config"
    else:
        head_dim, src = LYNX_BRIDGE_HEAD_DIM, "Lynx's dim_head; --config bridge.heads overrides"
    if inner % head_dim:
        raise CheckpointError(f"bridge: attention width {inner} is not a multiple of {head_dim}-wide heads; "
                              "pass --config '{\"bridge\": {\"heads\": N}}'")
    notes["bridge heads"] = f"{inner // head_dim} x {head_dim} ({src})"
    return BridgeConfig(num_latents=num_latents, depth=depth, heads=inner // head_dim, head_dim=head_dim,
                        ff_mult=ff // dim), media, notes


def adapter_layout(adapters: Mapping[str, torch.Tensor]) -> tuple[list[int], int]:
    layers = sorted({int(m.group(1)) for k in adapters if (m := _ADAPTER_KEY.match(k))})
    if not layers:
        raise CheckpointError("the training checkpoint has no LLM.model.layers.N.output_adapter.* weights")
    down = adapters.get(f"LLM.model.layers.{layers[0]}.output_adapter.adapter_down.weight")
    if down is None:
        raise CheckpointError(f"adapter of layer {layers[0]}: no output_adapter.adapter_down.weight")
    return layers, int(down.shape[0])


def llm_config_from_hf(hf: dict, adapter_size: int, adapter_freq: int, vocab_size: int | None = None) -> LLMConfig:
    """The LLM's dimensions from a transformers LLaMA `config.json`; `num_key_value_heads` (grouped-query
    attention, e.g. TinyLlama's 4 of 32) defaults to `num_attention_heads`."""
    try:
        head_dim = hf.get("head_dim")
        if head_dim is not None and head_dim * hf["num_attention_heads"] != hf["hidden_size"]:
            raise CheckpointError(f"LLaMA config.json: head_dim {head_dim} x {hf['num_attention_heads']} heads != "
                                  f"hidden_size {hf['hidden_size']}; only head_dim = hidden_size / heads is supported")
        return LLMConfig(
            vocab_size=vocab_size or hf["vocab_size"], hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"], adapter_size=adapter_size,
            adapter_freq=adapter_freq, rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=hf.get("rope_theta", 10000.0),
            max_position_embeddings=hf.get("max_position_embeddings", 2048))
    except KeyError as e:
        raise CheckpointError(f"LLaMA config.json lacks {e}") from None
    except TypeError as e:
        raise CheckpointError(f"LLaMA config.json has a malformed value ({e})") from None


# ---- the conversion ----------------------------------------------------------------------------------------


def _hints(config: Mapping[str, Any] | str | Path | None) -> dict[str, Any]:
    if config is None:
        return {"encoder": {}, "bridge": {}}
    if isinstance(config, str) and config.lstrip().startswith("{"):  # inline JSON (a path never starts so)
        try:
            config = json.loads(config)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"--config: inline JSON does not parse ({e}); expected a JSON object "
                                  "or the path of a JSON file") from None
    elif isinstance(config, (str, Path)):
        try:
            config = json.loads(Path(config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"--config {config}: not a readable JSON file ({e}); expected the path of a "
                                  "JSON file or an inline JSON object") from None
    if not isinstance(config, Mapping):
        raise CheckpointError(f"--config: expected a JSON object, got {type(config).__name__}")
    unknown = set(config) - {"encoder", "vision", "bridge", "labels", "label_set", "max_prompt_tokens"}
    if unknown:
        raise CheckpointError(f"--config: unknown sections {sorted(unknown)}; expected encoder (or vision), bridge, "
                              "labels, label_set, max_prompt_tokens")
    return {**config, "encoder": dict(config.get("encoder", config.get("vision", {}))),
            "bridge": dict(config.get("bridge", {}))}


def _split(sd: dict[str, torch.Tensor], encoder_prefix: str | None, report: ConversionReport
           ) -> tuple[dict, dict, dict, dict]:
    """The training checkpoint's keys by destination: (encoder, bridge, head, adapters)."""
    enc, bridge, head, adapters, left = {}, {}, {}, {}, []
    prefixes = (encoder_prefix, "encoder.") if encoder_prefix else ()
    for k, v in sd.items():
        if _ADAPTER_KEY.match(k):
            adapters[k] = v
        elif _ROTARY.search(k):
            report.dropped[k] = "rotary inv_freq buffer (recomputed)"
        elif k.startswith("LLM."):
            report.dropped[k] = "base LLM weight in the training checkpoint: the --llm directory's is used"
        elif k == FRAME_POS:
            report.dropped[k] = "video frame position embedding: no AllSpark modality takes video frames"
        elif (p := next((p for p in prefixes if k.startswith(p)), None)) is not None:
            enc[k[len(p):]] = v
        elif k.startswith("bridge.") and encoder_prefix:
            bridge[k[len("bridge."):]] = v
        elif k.startswith("head."):
            head[k[len("head."):]] = v
        else:
            left.append(k)
    if left:
        raise CheckpointError(f"keys that belong nowhere in this modality's pack: {left[:10]}"
                              f"{' ...' if len(left) > 10 else ''} ({len(left)})")
    return enc, bridge, head, adapters


def _vision_file(path: str | Path, enc: dict[str, torch.Tensor], encoder_prefix: str, report: ConversionReport
                 ) -> bool:
    """Add a vision file's weights (EVA's or Lynx's names) where the training checkpoint has none.
    Returns whether its pos_embed is the one used (then the grid is the file's, not the model's)."""
    sd, removed = strip_prefixes(load_state_dict_file(path), ("module.", "model.", encoder_prefix, "encoder."))
    for p, n in removed.items():
        report.prefixes_removed[f"--vision {p}"] = n
    sd, renamed = eva_layout_to_lynx(sd)
    report.renamed.update({f"--vision {k}": v for k, v in renamed.items()})
    pos_from_file = "pos_embed" in sd and "pos_embed" not in enc
    for k, v in sd.items():
        if k in enc:
            report.dropped[f"--vision {k}"] = "also in the training checkpoint, whose weight is used"
        else:
            enc[k] = v
    return pos_from_file


def _encoder_config(s, enc: dict[str, torch.Tensor], hints: dict[str, Any], pos_from_file: bool,
                    report: ConversionReport) -> ModalityConfig:
    default = s.presets.get("paper") or next(iter(s.presets.values()))
    if s.infer is None:
        mc = default
        report.dims["encoder"] = f"{type(default.encoder).__name__} of the {default.modality} paper defaults " \
                                 "(this modality reads no dimensions from weights)"
        return mc
    mc, notes = s.infer(_shapes(enc), default, hints)
    report.dims.update({f"encoder {k}": v for k, v in notes.items()})
    if pos_from_file and "image_size" not in hints:
        size = default.encoder.image_size
        mc = dataclasses.replace(mc, encoder=dataclasses.replace(mc.encoder, image_size=size))
        report.dims["encoder image_size"] = (f"{size} ({default.modality} paper default, as Lynx's image_res; the "
                                             "vision file's positions are interpolated to it)")
    return mc


def _labels(mc: ModalityConfig, s, head: dict[str, torch.Tensor], hints: dict[str, Any],
            report: ConversionReport) -> ModalityConfig:
    if not s.head.classifies:
        return mc
    labels = tuple(hints.get("labels", mc.labels))
    label_set = hints.get("label_set", mc.label_set if "labels" not in hints else "")
    n = head["proj.weight"].shape[0] if "proj.weight" in head else len(labels)
    if len(labels) != n:
        raise CheckpointError(f"head: {n} classes in the weights but {len(labels)} label names "
                              f"({label_set or 'defaults'}); pass --config '{{\"labels\": [...]}}'")
    report.dims["labels"] = f"{n} ({'--config' if 'labels' in hints else label_set})"
    return dataclasses.replace(mc, labels=labels, label_set=label_set)


def _pack_state(m: str, cfg: AllSparkConfig, enc: dict, bridge: dict, head: dict, adapters: dict,
                layers: list[int], report: ConversionReport) -> dict[str, torch.Tensor]:
    """The pack file's tensors (checkpoint layout), checked against a meta-device pack's shapes."""
    with torch.device("meta"):
        pack = ModalityPack(cfg.modality(m), cfg)
        adapter = StackedAdapter(1, cfg.llm.hidden_size, cfg.llm.adapter_size)
    expected = {k: tuple(v.shape) for k, v in pack.state_dict().items()}
    for k in range(len(layers)):
        expected.update({f"adapters.{k}.{n}": tuple(t.shape) for n, t in adapter.lynx_state(0).items()})
    given = {**{f"encoder.{k}": v for k, v in enc.items()}, **{f"bridge.{k}": v for k, v in bridge.items()},
             **{f"head.{k}": v for k, v in head.items()}}
    for key, v in adapters.items():
        a = _ADAPTER_KEY.match(key)
        given[f"adapters.{layers.index(int(a.group(1)))}.{a.group(2)}"] = v
    extra = sorted(set(given) - set(expected))
    if extra:
        raise CheckpointError(f"pack {m!r}: weights that this modality's pack does not have: {extra[:10]}")
    missing = sorted(set(expected) - set(given))
    fresh_head = [k for k in missing if k.startswith("head.")]
    other = [k for k in missing if not k.startswith("head.")]
    if other:
        parts = sorted({k.split(".")[0] for k in other})
        raise CheckpointError(f"pack {m!r}: missing {len(other)} weights of {', '.join(parts)}: {other[:10]}"
                              f"{' ...' if len(other) > 10 else ''} (a vision encoder can come from --vision EVA_FILE)")
    if fresh_head:
        new = make_head(spec(m).head, cfg.llm.hidden_size, spec(m).out_dim(cfg.modality(m))).state_dict()
        for k in fresh_head:
            given[k] = new[k[len("head."):]]
            report.created[k] = "Lynx checkpoints carry no task head: initialised fresh, to be trained"
    out = {}
    for k, shape in expected.items():
        t = given[k]
        if k.endswith(".scaling"):
            t = t.reshape(())  # Lynx stores (1,); the stacked adapter a scalar per set
        if tuple(t.shape) != shape:
            raise CheckpointError(f"pack {m!r}: {k}: expected shape {shape}, got {tuple(t.shape)}")
        out[k] = t
    return out


def _mean_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """An embedding/output matrix grown to `rows`: the new rows the mean of the others (Lynx's [PAD])."""
    return torch.cat([t, t.float().mean(0, keepdim=True).to(t.dtype).expand(rows - t.shape[0], -1)])


def _llm_tensors(llm: WeightDir, cfg: LLMConfig, dtype: torch.dtype | None, report: ConversionReport):
    """(name, bytes, read) of the base LLM's tensors as the checkpoint stores them: checked against
    LlamaForCausalLM's shapes and cast when read. Rows the tokenizer adds ([PAD]) are the mean of
    the others, as Lynx initialises them."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        expected = {k: (tuple(v.shape), v.dtype) for k, v in LlamaForCausalLM(llama_config(cfg)).state_dict().items()}
    seen = set()
    for lazy in llm.lazy():
        name, read = lazy.name, lazy.read
        if _ROTARY.search(name):
            report.dropped[f"--llm {name}"] = "rotary inv_freq buffer (recomputed)"
            continue
        if name not in expected:
            raise CheckpointError(f"--llm {llm.path}: weight {name!r} is not part of LlamaForCausalLM")
        shape = expected[name][0]

        def load(name=name, read=read, shape=shape) -> torch.Tensor:
            t = read()
            if name in EMBEDDING_ROWS and t.shape[0] < shape[0]:
                extra = shape[0] - t.shape[0]
                t = _mean_rows(t, shape[0])
                report.created[f"llm {name}[{shape[0] - extra}:]"] = \
                    "rows of tokens the tokenizer adds ([PAD]): the mean of the other rows, as Lynx does"
            if tuple(t.shape) != shape:
                raise CheckpointError(f"--llm {llm.path}: {name}: expected shape {shape}, got {tuple(t.shape)}")
            return t.to(dtype) if dtype is not None and t.is_floating_point() else t

        seen.add(name)
        report.used.append(f"--llm {name}")
        yield name, math.prod(shape) * (dtype or lazy.dtype).itemsize, load
    missing = sorted(set(expected) - seen)
    if missing:
        raise CheckpointError(f"--llm {llm.path}: missing base LLM weights {missing[:10]}")


def convert_lynx(lynx_file: str | Path, llm_dir: str | Path, modality: str, out: str | Path,
                 vision: str | Path | None = None, config: Mapping[str, Any] | str | Path | None = None,
                 dtype: str | None = None, shard_bytes: int = DEFAULT_SHARD_BYTES) -> ConversionReport:
    """Write a one-modality checkpoint to `out` from a Lynx/AllSpark training checkpoint."""
    from .checkpoint import write_checkpoint

    m = resolve_modality(modality)
    s = spec(m)
    hints = _hints(config)
    cast = DTYPES[dtype] if dtype else None
    if dtype and dtype not in DTYPES:
        raise CheckpointError(f"--dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    report = ConversionReport(sources={"lynx": str(lynx_file), "llm": str(llm_dir),
                                       **({"vision": str(vision)} if vision else {})})
    sd, report.prefixes_removed = strip_prefixes(load_state_dict_file(lynx_file))
    enc, bridge, head, adapters = _split(sd, s.lynx_prefix if s.has_encoder else None, report)
    pos_from_file = _vision_file(vision, enc, s.lynx_prefix, report) if vision else False
    layers, adapter_size = adapter_layout(adapters)
    llm = WeightDir(llm_dir)
    tokenizer = _maybe_tokenizer(llm.path)
    vocab = max(llm.config.get("vocab_size", 0), len(tokenizer) if tokenizer is not None else 0)
    freq = layers[1] - layers[0] if len(layers) > 1 else llm.config.get("num_hidden_layers", 1)
    llm_cfg = llm_config_from_hf(llm.config, adapter_size, freq, vocab)
    if tuple(layers) != llm_cfg.adapter_layers:
        raise CheckpointError(f"adapters on layers {layers}; expected every {freq}-th: {llm_cfg.adapter_layers}")
    report.dims.update({"llm": f"{llm_cfg.num_layers} layers x {llm_cfg.hidden_size} (config.json)",
                        "vocabulary": f"{vocab} ({'tokenizer' if vocab != llm.config.get('vocab_size') else 'config.json'})",
                        "adapters": f"{len(layers)} of {llm_cfg.hidden_size}->{adapter_size}, every {freq} layers (weights)"})
    if s.has_encoder:
        if not enc:
            raise CheckpointError(f"no encoder weights: the training checkpoint has no {s.lynx_prefix}* keys "
                                  "(Lynx keeps its frozen ViT out); pass --vision EVA_FILE")
        if not bridge:
            raise CheckpointError("no bridge.* weights in the training checkpoint")
        bridge_cfg, media, notes = infer_bridge(_shapes(bridge), hints["bridge"])
        report.dims.update(notes)
        mc = _encoder_config(s, enc, hints["encoder"], pos_from_file, report)
        if "pos_embed" in enc and hasattr(mc.encoder, "num_tokens"):
            grid = math.isqrt(mc.encoder.num_tokens - 1)
            if math.isqrt(enc["pos_embed"].shape[1] - 1) != grid:
                report.renamed["encoder.pos_embed"] = f"interpolated to {grid}x{grid} (bicubic, as Lynx)"
                enc["pos_embed"] = interpolate_pos_embed(enc["pos_embed"], grid)
    else:
        bridge_cfg, mc = BridgeConfig(), next(iter(s.presets.values()))
    mc = _labels(mc, s, head, hints, report)
    cfg = AllSparkConfig(name=f"lynx-{m}", llm=llm_cfg, bridge=bridge_cfg, modalities=(mc,),
                         max_prompt_tokens=int(hints.get("max_prompt_tokens", get_preset("paper").max_prompt_tokens)))
    pack = _pack_state(m, cfg, enc, bridge, head, adapters, layers, report)
    report.used += sorted(sd.keys() - report.dropped.keys())
    packs = {m: {k: (v.to(cast) if cast is not None and v.is_floating_point() else v) for k, v in pack.items()}}
    del sd, enc, bridge, head, adapters, pack  # written first and released: the LLM streams after
    report.written = write_checkpoint(
        out, cfg, [m], tokenizer, llm_config=llama_config(cfg.llm), llm_tensors=_llm_tensors(llm, llm_cfg, cast, report),
        packs=packs, shard_bytes=shard_bytes, report=report,
        extra={"imported_from": {**report.sources, "converted": _dt.datetime.now(_dt.timezone.utc).isoformat(
            timespec="seconds")}})
    return report


# ---- our own models in Lynx's layout, and a bare LLaMA directory -----------------------------------------------


def export_lynx_state(model: AllSpark, modality: str) -> dict[str, torch.Tensor]:
    """One modality of `model` as a Lynx-format training state dict (adapter `scaling` of shape (1,),
    as Lynx stores it); what tests write to check the importer."""
    from .checkpoint import pack_state

    m = resolve_modality(modality)
    out: dict[str, torch.Tensor] = {}
    layer_ids = model.config.llm.adapter_layers
    for k, v in pack_state(model, m).items():
        if k.startswith("adapters."):
            _, idx, rest = k.split(".", 2)
            out[f"LLM.model.layers.{layer_ids[int(idx)]}.output_adapter.{rest}"] = v.reshape(1) if rest == "scaling" else v
        elif k.startswith("encoder."):
            out[spec(m).lynx_prefix + k[len("encoder."):]] = v
        else:
            out[k] = v
    return out


def import_llama(llm_dir: str | Path, preset: str = "paper", modalities: list[str] | None = None,
                 adapter_size: int | None = None) -> AllSpark:
    """A transformers LLaMA/Vicuna directory (TinyLlama's included: grouped-query attention, its
    KV-head count read from config.json) as the base LLM, with fresh packs from `preset`: the
    preset's bridge, encoders and adapter layout, the directory's LLM dimensions. Tokens the
    tokenizer adds ([PAD], as Lynx) get embedding and output rows, the mean of the others."""
    llm = WeightDir(llm_dir)
    base = get_preset(preset)
    tokenizer = _maybe_tokenizer(llm.path)
    vocab = max(llm.config.get("vocab_size", 0), len(tokenizer) if tokenizer is not None else 0)
    cfg = dataclasses.replace(base, name=f"{preset}+{llm.path.name}",
                              llm=llm_config_from_hf(llm.config, adapter_size or base.llm.adapter_size,
                                                     base.llm.adapter_freq, vocab))
    model = AllSpark(cfg, modalities)
    state = {k: v for k, v in llm.tensors() if not _ROTARY.search(k)}
    for k in EMBEDDING_ROWS:
        if k in state and state[k].ndim == 2 and state[k].shape[0] < vocab:
            state[k] = _mean_rows(state[k], vocab)
    own = model.llm.state_dict()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        raise CheckpointError(f"{llm.path}: base LLM keys missing {missing[:10]}, unexpected {extra[:10]}")
    try:
        model.llm.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{llm.path}: {e}") from None
    model.tokenizer = tokenizer
    return model


def _maybe_tokenizer(path: Path):
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: the tokenizer files cannot be read ({type(e).__name__}: {e})") from None
    tok.padding_side = "left"
    if tok.pad_token is None:  # Lynx adds [PAD] to LLaMA's tokenizer
        tok.add_special_tokens({"pad_token": "[PAD]"})
    return tok


__all__ = ["ConversionReport", "LYNX_ADAPTER_KEYS", "convert_lynx", "eva_layout_to_lynx", "export_lynx_state",
           "import_llama", "interpolate_pos_embed", "llm_config_from_hf"]
