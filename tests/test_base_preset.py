"""The `base` preset (TinyLlama-1.1B-shaped LLM, ViT-L/14 RGB encoder): its parameter counts against
formulas written here, `reduced("base")` (every width, 2 layers) on the meta device and for real,
and a TinyLlama-shaped transformers directory (grouped-query attention) imported into `base`'s
structure and converted by `allspark convert`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from allspark.cli import build_parser, main
from allspark.errors import CheckpointError, ConfigError
from allspark.model.config import BridgeConfig, LLMConfig
from allspark.model.counting import count_parameters
from allspark.model.lynx import export_lynx_state, import_llama, llm_config_from_hf
from allspark.model.model import AllSpark
from allspark.model.presets import get_preset, preset_names, reduced
from allspark.model.registry import random_inputs
from allspark.model.tokenizer import train_tokenizer

# ---- formulas (no code of the model's) ----------------------------------------------------------------

def llm_body(c: LLMConfig) -> int:
    """LLaMA without lm_head: embeddings, per layer q/o (H x H), k/v (H x kv*hd), gate/up/down, two
    RMSNorms; the final norm."""
    H, kv = c.hidden_size, c.num_kv_heads * (c.hidden_size // c.num_heads)
    layer = 2 * H * H + 2 * H * kv + 3 * H * c.intermediate_size + 2 * H
    return c.vocab_size * H + c.num_layers * layer + H


def adapter_set(c: LLMConfig) -> int:
    """One modality's adapters: LayerNorm, down (with bias), up (with bias), scaling, on layers 0, f, 2f..."""
    H, r = c.hidden_size, c.adapter_size
    return len(range(0, c.num_layers, c.adapter_freq)) * (2 * H + H * r + r + r * H + H + 1)


def bridge(b: BridgeConfig, D: int, media: int) -> int:
    """Lynx's resampler: per layer cross-attention (two LayerNorms, to_q, to_kv, to_out; no biases) and
    a feed-forward (LayerNorm, D -> mD -> D, no biases); latents; a final LayerNorm."""
    inner = b.heads * b.head_dim
    layer = 2 * media + 2 * D + D * inner + media * 2 * inner + inner * D + 2 * D + 2 * b.ff_mult * D * D
    return b.depth * layer + b.num_latents * D + 2 * D


def vit(width: int, depth: int, mlp: int, patch: int, channels: int, tokens: int) -> int:
    """EVA-style blocks (q and v biased, k not; proj, two LayerNorms, fc1/fc2 biased); patch conv,
    class token, positions; no final norm."""
    block = 4 * width * width + 2 * width * mlp + 8 * width + mlp
    return depth * block + channels * patch * patch * width + width + width + tokens * width


@pytest.fixture(scope="module")
def base_meta():
    with torch.device("meta"):
        return AllSpark(get_preset("base"))


@pytest.fixture(scope="module")
def reduced_meta():
    with torch.device("meta"):
        return AllSpark(reduced("base"))


# ---- the preset -------------------------------------------------------------------------------------


def test_base_is_tinyllama_shaped():
    cfg = get_preset("base")
    assert "base" in preset_names() and len(cfg.modalities) == 10
    c = cfg.llm
    assert (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.intermediate_size, c.vocab_size) == \
        (2048, 22, 32, 4, 5632, 32000)
    assert (c.rope_theta, c.max_position_embeddings, c.rms_norm_eps) == (10000.0, 2048, 1e-5)
    assert (c.adapter_size, c.adapter_layers) == (1024, tuple(range(0, 22, 2)))
    assert cfg.bridge == get_preset("paper").bridge  # Lynx's resampler: 32 latents, depth 3, 8 x 64
    rgb = cfg.modality("rgb")
    e = rgb.encoder
    assert (e.width, e.depth, e.heads, e.width * e.mlp_ratio, e.patch_size, e.image_size) == \
        (1024, 24, 16, 4096, 14, 224)
    assert rgb.frozen_encoder and rgb.label_set == "NWPU-RESISC45"
    paper = get_preset("paper")
    for mc in cfg.modalities:
        if mc.modality != "rgb":
            assert mc == paper.modality(mc.modality), mc.modality


def test_base_counts_match_formulas_and_readme(base_meta):
    cfg = base_meta.config
    counts = count_parameters(base_meta)
    D = cfg.llm.hidden_size
    for m, row in counts.items():
        comps = row["components"]
        assert comps["base_llm"] == llm_body(cfg.llm), m
        assert comps["adapters"] == adapter_set(cfg.llm), m
        enc = cfg.modality(m).encoder
        assert comps["bridge"] == (bridge(cfg.bridge, D, enc.width) if enc is not None else 0), m
    e = cfg.modality("rgb").encoder
    assert counts["rgb"]["components"]["encoder"] == vit(1024, 24, 4096, 14, 3, e.num_tokens)
    assert counts["rgb"]["trainable"] == counts["rgb"]["total"] - llm_body(cfg.llm) - counts["rgb"]["components"]["encoder"]
    # TinyLlama-1.1B with its lm_head: 1100.05 M; the figures README's table gives
    assert llm_body(cfg.llm) + cfg.llm.vocab_size * D == sum(p.numel() for p in base_meta.llm.parameters()) == 1_100_048_384
    assert round(counts["language"]["components"]["base_llm"] / 1e6, 3) == 1034.512
    assert round(counts["language"]["components"]["adapters"] / 1e6, 3) == 46.216
    assert round(counts["rgb"]["components"]["encoder"] / 1e6, 3) == 303.152
    assert round(counts["rgb"]["components"]["bridge"] / 1e6, 3) == 110.201
    assert round(counts["msi"]["components"]["bridge"] / 1e6, 3) == 109.413
    assert round(sum(p.numel() for p in base_meta.parameters()) / 1e6, 2) == 3033.53


# ---- reduced("base") --------------------------------------------------------------------------------


def test_reduced_keeps_widths_and_cuts_depths(base_meta, reduced_meta):
    full, red = base_meta.config, reduced_meta.config
    assert red.llm == LLMConfig(**{**vars(full.llm), "num_layers": 2}) and red.llm.adapter_layers == (0,)
    assert red.bridge == full.bridge
    for a, b in zip(full.modalities, red.modalities):
        if hasattr(a.encoder, "depth"):
            assert b.encoder.depth == 1 and b.encoder.width == a.encoder.width, a.modality
        else:
            assert a == b
    # every weight of the reduced model has the full model's shape (same names, fewer layers/blocks)
    full_shapes = {k: v.shape for k, v in base_meta.state_dict().items()}
    red_shapes = {k: v.shape for k, v in reduced_meta.state_dict().items()}
    assert set(red_shapes) < set(full_shapes)
    assert all(full_shapes[k] == s for k, s in red_shapes.items())
    assert len(full_shapes) - len(red_shapes) > 20 * 9  # 20 LLM layers and 10 adapter layers fewer, blocks fewer
    counts = count_parameters(reduced_meta)
    assert counts["language"]["components"]["base_llm"] == llm_body(red.llm)
    assert counts["language"]["components"]["adapters"] == adapter_set(red.llm)
    e = red.modality("rgb").encoder
    assert counts["rgb"]["components"]["encoder"] == vit(1024, 1, 4096, 14, 3, e.num_tokens)
    assert reduced("base", layers=3, encoder_depth=2, bridge_depth=1).bridge.depth == 1
    with pytest.raises(ConfigError, match="depths must be >= 1"):
        reduced("base", layers=0)


def test_reduced_base_builds_and_runs_for_real():
    """Real widths (2048-wide LLM, 32000 vocabulary, ViT-L blocks): 351 M parameters, about 1.9 GB
    and 5-15 s on 2 cores."""
    cfg = reduced("base")
    torch.manual_seed(0)
    model = AllSpark(cfg, ["rgb", "language"], tokenizer=train_tokenizer(cfg.llm.vocab_size))
    rng = np.random.default_rng(0)
    rows = [model.prepare(m, random_inputs(cfg.modality(m), rng)) for m in ("rgb", "language")]
    assert model.build_batch(rows).inputs_embeds.shape[-1] == 2048
    rgb, lang = model(rows)
    assert rgb.shape == (45,) and lang.shape == (32000,)
    assert torch.isfinite(rgb).all() and torch.isfinite(lang).all()
    assert model.postprocess(rows[0], rgb).label in cfg.modality("rgb").labels


def test_cli_accepts_base():
    parser, _ = build_parser()
    assert parser.parse_args(["new", "--preset", "base", "--out", "x"]).preset == "base"
    assert parser.parse_args(["info", "--preset", "base"]).preset == "base"
    # `new` streams the LLM to disk, so the paper's 7B preset can be written too (fp16: 13.5 GB)
    assert parser.parse_args(["new", "--preset", "paper", "--dtype", "fp16", "--out", "x"]).dtype == "fp16"
    with pytest.raises(SystemExit):
        parser.parse_args(["new", "--preset", "base", "--dtype", "int8", "--out", "x"])


# ---- a TinyLlama-shaped transformers directory --------------------------------------------------------

# TinyLlama's ratios at tiny width: 8 heads share 2 KV heads, MLP 2.75 x hidden, RMS eps 1e-5
HF = {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 8,
      "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048,
      "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}


def _llama_tokenizer():
    """A byte-level BPE with LLaMA's specials and, like LLaMA's, no [PAD] (the importer adds it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["user: please utilize the provided air quality indicators bot: forty two"] * 5,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def tinyllama_dir(tmp_path_factory):
    """`save_pretrained` of a LlamaForCausalLM (safetensors) and its tokenizer, as TinyLlama's directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _llama_tokenizer()
    torch.manual_seed(3)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), **HF))
    out = tmp_path_factory.mktemp("tinyllama") / "TinyLlama-shaped"
    hf.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    assert (out / "model.safetensors").is_file() and "num_key_value_heads" in (out / "config.json").read_text()
    return out, hf


def _same_llm(ours: dict[str, torch.Tensor], hf: dict[str, torch.Tensor]) -> None:
    """Every weight lands exactly; the embedding and output matrices gain [PAD]'s row, the mean."""
    for k, v in hf.items():
        if k in ("model.embed_tokens.weight", "lm_head.weight"):
            assert ours[k].shape[0] == v.shape[0] + 1, k
            assert torch.equal(ours[k][:-1], v), k
            torch.testing.assert_close(ours[k][-1], v.mean(0))
        else:
            assert torch.equal(ours[k], v), k


@pytest.fixture(scope="module")
def imported(tinyllama_dir):
    return import_llama(tinyllama_dir[0], preset="base", modalities=["language", "table"], adapter_size=32)


def test_tinyllama_directory_imports_into_base(tinyllama_dir, imported):
    hf = tinyllama_dir[1]
    c = imported.config.llm
    assert (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.intermediate_size) == \
        (64, 2, 8, 2, 176)  # from config.json, num_key_value_heads included
    assert c.vocab_size == hf.config.vocab_size + 1 == len(imported.tokenizer)  # + [PAD]
    assert (c.rms_norm_eps, c.rope_theta, c.adapter_size, c.adapter_freq) == (1e-5, 10000.0, 32, 2)
    assert imported.config.bridge == get_preset("base").bridge  # the rest of base's structure
    assert imported.config.modality("table") == get_preset("base").modality("table")
    attn = imported.llm.model.layers[0].self_attn
    assert tuple(attn.q_proj.weight.shape) == (64, 64) and tuple(attn.k_proj.weight.shape) == (16, 64)
    _same_llm(imported.llm.state_dict(), hf.state_dict())
    # fresh adapters are the identity: the imported LLM computes what transformers' own does
    rows = [imported.prepare("table", random_inputs(imported.config.modality("table"), np.random.default_rng(0)))]
    with torch.no_grad():
        b = imported.build_batch(rows)
        want = hf.model(inputs_embeds=b.inputs_embeds, attention_mask=b.attention_mask,
                        position_ids=b.position_ids).last_hidden_state
        torch.testing.assert_close(imported.decode(b).last_hidden_state, want, atol=1e-6, rtol=1e-6)
    assert np.isfinite(imported.postprocess(rows[0], imported(rows)[0]).values).all()


def test_llm_config_from_hf_reads_kv_heads(tinyllama_dir):
    hf = json.loads((tinyllama_dir[0] / "config.json").read_text())
    assert llm_config_from_hf(hf, 32, 2).num_kv_heads == 2
    assert llm_config_from_hf({k: v for k, v in hf.items() if k != "num_key_value_heads"}, 32, 2).num_kv_heads == 8
    with pytest.raises(CheckpointError, match="head_dim 16"):
        llm_config_from_hf({**hf, "head_dim": 16}, 32, 2)


def test_cli_convert_with_a_gqa_llm(tinyllama_dir, tmp_path, capsys):
    """`allspark convert`: a training checkpoint of base's structure over the TinyLlama-shaped LLM."""
    from allspark.model.checkpoint import load_checkpoint

    path, hf = tinyllama_dir
    imported = import_llama(path, preset="base", modalities=["table"], adapter_size=32)
    with torch.no_grad():  # trained adapters: not the identity
        for a in imported.adapters:
            a.up_weight.normal_(0.0, 0.05)
    torch.save(export_lynx_state(imported, "table"), tmp_path / "lynx.pt")
    assert main(["convert", "--lynx", str(tmp_path / "lynx.pt"), "--llm", str(path), "--modality", "table",
                 "--out", str(tmp_path / "ck")]) == 0
    capsys.readouterr()
    model = load_checkpoint(tmp_path / "ck")
    assert model.config.llm == imported.config.llm and model.config.bridge == imported.config.bridge
    _same_llm(model.llm.state_dict(), hf.state_dict())
    x = random_inputs(model.config.modality("table"), np.random.default_rng(1))
    r1, r2 = model.prepare("table", x), imported.prepare("table", x)
    torch.testing.assert_close(model([r1])[0], imported([r2])[0], atol=1e-5, rtol=1e-5)
