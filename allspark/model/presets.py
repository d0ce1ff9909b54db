"""Presets by exact name: the LLM, the bridge and the prompt budget here; each modality's part from
its registry entry (`ModalitySpec.presets`), so a plug-in modality joins every preset it defines.

    tiny    tests (seconds to build)
    demo    the embedded default (trained on CPU, `allspark.demo`)
    paper   the paper's sizes (Vicuna-7B, adapters 4096->2048->4096, bridge 32 x 4096 depth 3);
            build it on the meta device to count parameters
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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
