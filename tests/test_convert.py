"""`allspark convert` on checkpoints written in Lynx's exact layout (bytedance/lynx-llm): adapter
`scaling` of shape (1,), keys under `module.`, the video frame position embedding, the frozen vision
encoder absent from the training checkpoint and supplied in EVA's own layout (fused qkv, q_bias and
v_bias, positions for a smaller grid than the model's), a base LLM in transformers shards whose
tokenizer lacks Lynx's [PAD], and dimensions no preset has. Checked against computations written
here from the formulas, not against the importer's own code."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from allspark.errors import CheckpointError
from allspark.model.checkpoint import load_checkpoint
from allspark.model.lynx import convert_lynx

H, LAYERS, HEADS, INTER = 96, 4, 6, 160  # LLM: no preset is this shape
R = 24  # adapter bottleneck, on layers 0 and 2
W, DEPTH, VIT_HEADS, MLP, PATCH = 176, 2, 2, 768, 14  # EVA-style: 88-wide heads, mlp ratio 4.3637
FILE_GRID, MODEL_SIZE = 16, 420  # EVA's file: 224 px; Lynx's image_res: 420
LATENTS, BRIDGE_DEPTH, INNER, FF = 5, 2, 128, 3  # bridge: 2 heads of Lynx's 64


def _tokenizer(vocab: int):
    """A byte-level BPE with LLaMA's specials but no [PAD] (Lynx adds it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["user: this remote sensing image belongs to which category bot: forest lake"] * 5,
                            trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _eva_file(g: torch.Generator) -> dict[str, torch.Tensor]:
    """Vision weights in EVA's own layout (eva_vit_g.pth), 224 px positions."""
    r = lambda *s: torch.randn(*s, generator=g) * 0.05  # noqa: E731
    sd = {"cls_token": r(1, 1, W), "pos_embed": r(1, FILE_GRID ** 2 + 1, W),
          "patch_embed.proj.weight": r(W, 3, PATCH, PATCH), "patch_embed.proj.bias": r(W)}
    for i in range(DEPTH):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": 1 + r(W), b + "norm1.bias": r(W), b + "attn.qkv.weight": r(3 * W, W),
                   b + "attn.q_bias": r(W), b + "attn.v_bias": r(W), b + "attn.proj.weight": r(W, W),
                   b + "attn.proj.bias": r(W), b + "norm2.weight": 1 + r(W), b + "norm2.bias": r(W),
                   b + "mlp.fc1.weight": r(MLP, W), b + "mlp.fc1.bias": r(MLP), b + "mlp.fc2.weight": r(W, MLP),
                   b + "mlp.fc2.bias": r(W)})
    return sd


def _lynx_training_state(g: torch.Generator) -> dict[str, torch.Tensor]:
    """Bridge + adapters under Lynx's names, scaling (1,), a frame embedding; no ViT, no head."""
    r = lambda *s: torch.randn(*s, generator=g) * 0.05  # noqa: E731
    sd = {"bridge.latents": r(LATENTS, H), "bridge.norm.weight": 1 + r(H), "bridge.norm.bias": r(H),
          "absolute_frame_pos_embed": r(1, 5, 1, W),
          "LLM.model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}
    for j in range(BRIDGE_DEPTH):
        b = f"bridge.layers.{j}."
        sd.update({b + "0.norm_media.weight": 1 + r(W), b + "0.norm_media.bias": r(W),
                   b + "0.norm_latents.weight": 1 + r(H), b + "0.norm_latents.bias": r(H),
                   b + "0.to_q.weight": r(INNER, H), b + "0.to_kv.weight": r(2 * INNER, W),
                   b + "0.to_out.weight": r(H, INNER), b + "1.0.weight": 1 + r(H), b + "1.0.bias": r(H),
                   b + "1.1.weight": r(FF * H, H), b + "1.3.weight": r(H, FF * H)})
    for layer in (0, 2):
        a = f"LLM.model.layers.{layer}.output_adapter."
        sd.update({a + "scaling": torch.full((1,), 0.7), a + "adapter_norm_before.weight": 1 + r(H),
                   a + "adapter_norm_before.bias": r(H), a + "adapter_down.weight": r(R, H),
                   a + "adapter_down.bias": r(R), a + "adapter_up.weight": r(H, R), a + "adapter_up.bias": r(H)})
    return sd


@pytest.fixture(scope="module")
def lynx(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("lynx")
    g = torch.Generator().manual_seed(0)
    tok = _tokenizer(260)
    vocab = len(tok)  # no [PAD] yet
    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=H, intermediate_size=INTER,
                                       num_hidden_layers=LAYERS, num_attention_heads=HEADS, tie_word_embeddings=False))
    llm.save_pretrained(root / "vicuna", max_shard_size="300KB")  # shards + index, as 7B directories are
    tok.save_pretrained(root / "vicuna")
    eva, train = _eva_file(g), _lynx_training_state(g)
    torch.save(eva, root / "eva_vit_g.pth")
    torch.save({"model": {f"module.{k}": v for k, v in train.items()}}, root / "lynx.pt")
    return {"root": root, "eva": eva, "train": train, "llm": llm.state_dict(), "vocab": vocab}


@pytest.fixture(scope="module")
def converted(lynx):
    out = lynx["root"] / "ckpt"
    report = convert_lynx(lynx["root"] / "lynx.pt", lynx["root"] / "vicuna", "rgb", out,
                          vision=lynx["root"] / "eva_vit_g.pth", shard_bytes=200_000)
    return out, report


def test_converts_without_flags_and_reports_everything(lynx, converted):
    out, report = converted
    cfg = json.loads((out / "manifest.json").read_text())["config"]
    enc = cfg["modalities"][0]["encoder"]
    assert (enc["width"], enc["depth"], enc["heads"], enc["patch_size"], enc["image_size"]) == (W, DEPTH, VIT_HEADS,
                                                                                                PATCH, MODEL_SIZE)
    assert cfg["bridge"] == {"num_latents": LATENTS, "depth": BRIDGE_DEPTH, "heads": 2, "head_dim": 64, "ff_mult": FF}
    assert (cfg["llm"]["hidden_size"], cfg["llm"]["adapter_size"], cfg["llm"]["vocab_size"]) == (H, R, lynx["vocab"] + 1)
    assert report.prefixes_removed == {"module.": len(lynx["train"])}
    assert "no AllSpark modality takes video frames" in report.dropped["absolute_frame_pos_embed"]
    assert "recomputed" in report.dropped["LLM.model.layers.0.self_attn.rotary_emb.inv_freq"]
    v = lynx["vocab"]
    assert set(report.created) == {"head.proj.weight", "head.proj.bias", f"llm model.embed_tokens.weight[{v}:]",
                                   f"llm lm_head.weight[{v}:]"}
    assert "--vision blocks.0.attn.qkv.weight" in report.renamed and "interpolated to 30x30" in report.renamed["encoder.pos_embed"]
    assert "(weights)" in report.dims["encoder width"] and "Lynx" in report.dims["bridge heads"]
    saved = json.loads((out / "convert_report.json").read_text())
    assert saved["dropped"] == report.dropped and saved["written"]["llm_files"][-1] == "model.safetensors.index.json"
    assert "convert_report.json" in json.loads((out / "manifest.json").read_text())["sha256"]


def test_every_weight_lands_where_it_belongs(lynx, converted):
    from safetensors.torch import load_file

    out, _ = converted
    pack = load_file(out / "packs" / "rgb.safetensors")
    train, eva = lynx["train"], lynx["eva"]
    for k, v in train.items():
        if k.startswith("bridge."):
            assert torch.equal(pack[k], v), k
    for idx, layer in enumerate((0, 2)):
        for name in ("adapter_norm_before.weight", "adapter_down.weight", "adapter_down.bias", "adapter_up.weight",
                     "adapter_up.bias"):
            assert torch.equal(pack[f"adapters.{idx}.{name}"], train[f"LLM.model.layers.{layer}.output_adapter.{name}"])
        assert pack[f"adapters.{idx}.scaling"].shape == () and float(pack[f"adapters.{idx}.scaling"]) == pytest.approx(0.7)
    for i in range(DEPTH):
        q, k, v = eva[f"blocks.{i}.attn.qkv.weight"].chunk(3)
        b = f"encoder.blocks.{i}.attn."
        assert torch.equal(pack[b + "q_proj.weight"], q) and torch.equal(pack[b + "k_proj.weight"], k)
        assert torch.equal(pack[b + "v_proj.weight"], v)
        assert torch.equal(pack[b + "q_proj.bias"], eva[f"blocks.{i}.attn.q_bias"])
        assert torch.equal(pack[b + "v_proj.bias"], eva[f"blocks.{i}.attn.v_bias"])
        assert b + "k_proj.bias" not in pack
    assert torch.allclose(pack["encoder.pos_embed"], _interpolate(eva["pos_embed"], MODEL_SIZE // PATCH))
    model = load_checkpoint(out)  # the LLM from its shards, [PAD] rows = mean of the others
    for name, t in lynx["llm"].items():
        got = model.llm.state_dict()[name]
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(got[:-1], t) and torch.allclose(got[-1], t.mean(0)), name
        else:
            assert torch.equal(got, t), name
    assert model.tokenizer.pad_token == "[PAD]" and len(model.tokenizer) == lynx["vocab"] + 1


def _interpolate(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """Lynx's interpolate_pos_embed, written out: class token kept, the square grid resized bicubically."""
    g = math.isqrt(pos.shape[1] - 1)
    tokens = pos[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
    tokens = F.interpolate(tokens, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :1], tokens.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


def _eva_forward(eva: dict[str, torch.Tensor], image: torch.Tensor) -> torch.Tensor:
    """EVA's forward from its own layout: fused qkv with bias (q_bias, zeros, v_bias), no final norm."""
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    x = F.conv2d((image - mean) / std, eva["patch_embed.proj.weight"], eva["patch_embed.proj.bias"], stride=PATCH)
    x = torch.cat([eva["cls_token"], x.flatten(2).transpose(1, 2)], 1) + _interpolate(eva["pos_embed"], MODEL_SIZE // PATCH)
    B, N, _ = x.shape
    for i in range(DEPTH):
        p = lambda n: eva[f"blocks.{i}.{n}"]  # noqa: E731
        h = F.layer_norm(x, (W,), p("norm1.weight"), p("norm1.bias"), eps=1e-6)
        bias = torch.cat([p("attn.q_bias"), torch.zeros(W), p("attn.v_bias")])
        q, k, v = F.linear(h, p("attn.qkv.weight"), bias).reshape(B, N, 3, VIT_HEADS, -1).permute(2, 0, 3, 1, 4)
        a = ((q * (W // VIT_HEADS) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        x = x + F.linear((a @ v).transpose(1, 2).reshape(B, N, W), p("attn.proj.weight"), p("attn.proj.bias"))
        h = F.layer_norm(x, (W,), p("norm2.weight"), p("norm2.bias"), eps=1e-6)
        x = x + F.linear(F.gelu(F.linear(h, p("mlp.fc1.weight"), p("mlp.fc1.bias"))), p("mlp.fc2.weight"), p("mlp.fc2.bias"))
    return x


def _perceiver(train: dict[str, torch.Tensor], media: torch.Tensor) -> torch.Tensor:
    """Lynx's PerceiverResampler, written out (scale dim_head^-0.5, max-subtracted softmax)."""
    p = lambda n: train[f"bridge.{n}"]  # noqa: E731
    B = media.shape[0]
    lat = p("latents").expand(B, -1, -1)
    for j in range(BRIDGE_DEPTH):
        x = F.layer_norm(media, (W,), p(f"layers.{j}.0.norm_media.weight"), p(f"layers.{j}.0.norm_media.bias"))
        ln = F.layer_norm(lat, (H,), p(f"layers.{j}.0.norm_latents.weight"), p(f"layers.{j}.0.norm_latents.bias"))
        q = (ln @ p(f"layers.{j}.0.to_q.weight").T).view(B, LATENTS, 2, 64).transpose(1, 2) * 64 ** -0.5
        k, v = (x @ p(f"layers.{j}.0.to_kv.weight").T).chunk(2, dim=-1)
        k, v = (t.view(B, -1, 2, 64).transpose(1, 2) for t in (k, v))
        sim = q @ k.transpose(-2, -1)
        out = ((sim - sim.amax(-1, keepdim=True)).softmax(-1) @ v).transpose(1, 2).reshape(B, LATENTS, INNER)
        lat = out @ p(f"layers.{j}.0.to_out.weight").T + lat
        h = F.layer_norm(lat, (H,), p(f"layers.{j}.1.0.weight"), p(f"layers.{j}.1.0.bias"))
        lat = F.gelu(h @ p(f"layers.{j}.1.1.weight").T) @ p(f"layers.{j}.1.3.weight").T + lat
    return F.layer_norm(lat, (H,), p("norm.weight"), p("norm.bias"))


def test_converted_model_computes_what_lynx_computes(lynx, converted):
    out, _ = converted
    model = load_checkpoint(out)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (300, 460, 3), dtype=np.uint8)  # not square: resized and centre-cropped
    row = model.prepare("rgb", {"image": img}, prompt="which scene is this?")  # a byte-level toy tokenizer
    image = torch.from_numpy(row.tensors["image"])
    with torch.no_grad():
        media = model.pack("rgb").encoder(image)
        torch.testing.assert_close(media, _eva_forward(lynx["eva"], image), atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(model.pack("rgb").bridge(media), _perceiver(lynx["train"], media), atol=2e-5, rtol=1e-4)
        y = model([row])[0]
    assert y.shape == (45,) and torch.isfinite(y).all()  # a fresh head over NWPU-RESISC45's classes


def test_rgb_preprocessing_is_lynxs_test_transform():
    """Shorter side to the model's size (PIL bicubic, torchvision's rounding), centre crop, /255."""
    from PIL import Image

    from allspark.model.presets import get_preset
    from allspark.model.registry import spec

    mc = get_preset("paper").modality("rgb")
    for h, w in ((480, 640), (640, 453), (420, 420), (200, 900)):
        img = np.random.default_rng(h).integers(0, 256, (h, w, 3), dtype=np.uint8)
        got = spec("rgb").preprocess(mc, {"image": img})[0]["image"][0]
        short = min(h, w)
        size = (420, int(420 * h / w)) if w <= h else (int(420 * w / h), 420)  # PIL (width, height)
        ref = np.asarray(Image.fromarray(img).resize(size, Image.BICUBIC), np.float32) / 255.0
        top, left = int(round((size[1] - 420) / 2.0)), int(round((size[0] - 420) / 2.0))
        ref = ref[top:top + 420, left:left + 420].transpose(2, 0, 1)
        assert got.shape == (3, 420, 420) and short > 0
        np.testing.assert_array_equal(got, ref)


def test_missing_encoder_keys_are_named(lynx, tmp_path):
    eva = {k: v for k, v in lynx["eva"].items() if not k.startswith("blocks.1.mlp.")}
    torch.save(eva, tmp_path / "eva_part.pth")
    with pytest.raises(CheckpointError, match=r"missing 4 weights of encoder: \['encoder.blocks.1.mlp.fc1.bias'"):
        convert_lynx(lynx["root"] / "lynx.pt", lynx["root"] / "vicuna", "rgb", tmp_path / "ck", vision=tmp_path / "eva_part.pth")
    with pytest.raises(CheckpointError, match=r"no vision_encoder\.\* keys.*--vision"):
        convert_lynx(lynx["root"] / "lynx.pt", lynx["root"] / "vicuna", "rgb", tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


def test_dimensions_shapes_cannot_tell_are_asked_for(lynx, tmp_path):
    eva = {k: v for k, v in lynx["eva"].items()}
    eva["patch_embed.proj.weight"] = torch.zeros(100, 3, PATCH, PATCH)  # a 100-wide ViT: heads unknowable
    torch.save(eva, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match=r"cannot tell the number of heads.*--config"):
        convert_lynx(lynx["root"] / "lynx.pt", lynx["root"] / "vicuna", "rgb", tmp_path / "ck", vision=tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match=r"unknown sections \['heads'\]"):
        convert_lynx(lynx["root"] / "lynx.pt", lynx["root"] / "vicuna", "rgb", tmp_path / "ck",
                     vision=lynx["root"] / "eva_vit_g.pth", config={"heads": 3})
    for bad, words in (('{"encoder": {"heads": 3}', "inline JSON does not parse"),
                       (str(tmp_path / "none.json"), "not a readable JSON file.*or an inline JSON object")):
        with pytest.raises(CheckpointError, match=words):
            convert_lynx(lynx["root"] / "lynx.pt", lynx["root"] / "vicuna", "rgb", tmp_path / "ck",
                         vision=lynx["root"] / "eva_vit_g.pth", config=bad)


@pytest.mark.parametrize("given", ["file", "inline"])
def test_cli_convert_with_config_and_dtype(lynx, tmp_path, capsys, given):
    from allspark.cli import main

    dims = json.dumps({"encoder": {"image_size": 224}, "labels": ["a", "b", "c"] * 15})
    (tmp_path / "dims.json").write_text(dims)
    config = str(tmp_path / "dims.json") if given == "file" else dims
    assert main(["convert", "--lynx", str(lynx["root"] / "lynx.pt"), "--llm", str(lynx["root"] / "vicuna"),
                 "--modality", "rgb", "--vision", str(lynx["root"] / "eva_vit_g.pth"), "--out", str(tmp_path / "ck"),
                 "--config", config, "--dtype", "fp16"]) == 0
    printed = capsys.readouterr().out
    assert "created fresh: head.proj.weight" in printed and "224 (--config)" in printed
    m = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    assert m["dtype"] == "float16" and m["config"]["modalities"][0]["encoder"]["image_size"] == 224
    assert "renamed" in json.loads((tmp_path / "ck" / "convert_report.json").read_text())


def test_pickle_payloads_are_never_executed(lynx, tmp_path):
    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"model": {"bridge.latents": Evil()}}))
    with pytest.raises(CheckpointError, match="weights-only"):
        convert_lynx(tmp_path / "evil.pt", lynx["root"] / "vicuna", "rgb", tmp_path / "ck")
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "ck").exists()
