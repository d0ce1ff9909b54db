"""Presets by exact name: the LLM, the bridge and the prompt budget here; each modality's part from
its registry entry (`ModalitySpec.presets`), so a plug-in modality joins every preset it defines.

    tiny    tests (seconds to build)
    demo    the embedded default (trained on CPU, `allspark.demo`)
    base    a realistic mid-size AllSpark: a TinyLlama-1.1B-shaped LLM (hidden 2048, 22 layers, 32
            heads, 4 KV heads, intermediate 5632), adapters 2048->1024->2048 on every 2nd layer,
            bridge 32 x 2048 depth 3, RGB through a ViT-L/14 at 224 px, the other encoders at the
            paper's sizes; buildable for real on one machine
    paper   the paper's sizes (Vicuna-7B, adapters 4096->2048->4096, bridge 32 x 4096 depth 3);
            build it on the meta device to count parameters

`reduced(config)` keeps a preset's widths but cuts its depths (LLM layers, encoder blocks), for tests
that need real widths at the cost of seconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

from ..errors import ConfigError
from .config import AllSparkConfig, BridgeConfig, LLMConfig
from .registry import resolve_modality, specs


@dataclass(frozen=True)
class PresetBase:
    """What a preset fixes besides the modalities."""

    llm: LLMConfig
    bridge: BridgeConfig
    max_prompt_tokens: int = 512


PRESETS: dict[str, PresetBase] = {
    "tiny": PresetBase(
        LLMConfig(vocab_size=512, hidden_size=64, num_layers=4, num_heads=4, intermediate_size=128,
                  adapter_size=16, max_position_embeddings=512),
        BridgeConfig(num_latents=8, depth=2, heads=2, head_dim=16, ff_mult=2),
        max_prompt_tokens=400),
    "demo": PresetBase(
        LLMConfig(vocab_size=1024, hidden_size=128, num_layers=4, num_heads=4, intermediate_size=344,
                  adapter_size=64, adapter_freq=1, max_position_embeddings=1024),
        BridgeConfig(num_latents=8, depth=2, heads=4, head_dim=32, ff_mult=4),
        max_prompt_tokens=256),
    # TinyLlama-1.1B's LLM (grouped-query attention: 32 query heads share 4 key/value heads) with
    # Lynx's adapter layout at half the width; the bridge keeps Lynx's resampler (8 heads x 64).
    "base": PresetBase(
        LLMConfig(vocab_size=32000, hidden_size=2048, num_layers=22, num_heads=32, num_kv_heads=4,
                  intermediate_size=5632, adapter_size=1024, adapter_freq=2, rms_norm_eps=1e-5,
                  rope_theta=10000.0, max_position_embeddings=2048),
        BridgeConfig(num_latents=32, depth=3, heads=8, head_dim=64, ff_mult=4)),
    # The paper's accounting (Table XV) uses LLaMA's 32000-token vocabulary.
    "paper": PresetBase(
        LLMConfig(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, intermediate_size=11008,
                  adapter_size=2048, adapter_freq=2),
        BridgeConfig(num_latents=32, depth=3, heads=8, head_dim=64, ff_mult=4)),
}


def preset_names() -> tuple[str, ...]:
    return tuple(PRESETS)


def get_preset(name: str, modalities: Sequence[str] | None = None) -> AllSparkConfig:
    """The preset `name` with every registered modality that defines it (or only `modalities`)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; expected one of: {', '.join(PRESETS)}")
    base = PRESETS[name]
    have = {m: s.presets[name] for m, s in specs().items() if name in s.presets}
    wanted = [resolve_modality(m) for m in modalities] if modalities else list(have)
    missing = [m for m in wanted if m not in have]
    if missing:
        raise ConfigError(f"preset {name!r} has no configuration for {missing}; it has {sorted(have)}")
    return AllSparkConfig(name=name, llm=base.llm, bridge=base.bridge, modalities=tuple(have[m] for m in wanted),
                          max_prompt_tokens=base.max_prompt_tokens)


def reduced(config: AllSparkConfig | str, layers: int = 2, encoder_depth: int = 1,
            bridge_depth: int | None = None) -> AllSparkConfig:
    """`config` (or the preset of that name) with every width kept and the depths cut: the LLM to
    `layers` layers, each encoder with blocks to at most `encoder_depth` (encoders without a depth,
    e.g. SAR's CNN, unchanged), the bridge to `bridge_depth` layers if given. For tests that need a
    preset's real shapes: `reduced("base")` with RGB builds in seconds in under 2 GB, where `base`
    itself needs 12 GB in fp32."""
    cfg = get_preset(config) if isinstance(config, str) else config
    if min(layers, encoder_depth) < 1 or (bridge_depth is not None and bridge_depth < 1):
        raise ConfigError(f"reduced: depths must be >= 1, got layers={layers}, encoder_depth={encoder_depth}, "
                          f"bridge_depth={bridge_depth}")

    def cut(mc):
        enc = mc.encoder
        if enc is None or "depth" not in {f.name for f in fields(enc)}:
            return mc
        return replace(mc, encoder=replace(enc, depth=min(enc.depth, encoder_depth)))

    return replace(cfg, name=f"{cfg.name}-reduced", llm=replace(cfg.llm, num_layers=min(cfg.llm.num_layers, layers)),
                   bridge=cfg.bridge if bridge_depth is None else replace(cfg.bridge, depth=bridge_depth),
                   modalities=tuple(cut(mc) for mc in cfg.modalities))
