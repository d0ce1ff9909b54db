"""Synthetic data for every modality with a demo task: deterministic by seed.

    generate(modality, n, seed, config) -> [Sample(modality, inputs, target), ...]

Each modality's generator is its registry entry's `DemoTask.generate(modality_config, rng) ->
(inputs, target)`. `inputs` is a request exactly as `AllSpark.prepare(modality, inputs)` accepts
it; `target` is the answer in the form the evaluation compares with: a label index
(classification), an array in the postprocessed shape and units (regression: PM2.5 in ug/m3 (1,),
future positions in metres (pred_len, 2), speeds in mph (nodes, horizon)), or the answer text
(language, code). Sizes come from the preset, so the same generators serve `tiny`. Each modality
draws from its own stream, `default_rng([seed, stream])`: adding samples of one modality never
changes another's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from ..errors import ConfigError
from ..model.config import AllSparkConfig
from ..model.pipeline import build_question
from ..model.presets import get_preset
from ..model.registry import ModalitySpec, resolve_modality, spec, specs
from ..model.tokenizer import format_prompt

Target = Union[int, np.ndarray, str]


@dataclass(frozen=True)
class Sample:
    modality: str
    inputs: dict[str, Any]  # a request for AllSpark.prepare
    target: Target


def _config(config: AllSparkConfig | str) -> AllSparkConfig:
    return get_preset(config) if isinstance(config, str) else config


def demo_spec(modality: str) -> ModalitySpec:
    s = spec(modality)
    if s.demo is None:
        raise ConfigError(f"modality {s.name!r} has no demo task (no synthetic generator)")
    return s


def generate(modality: str, n: int, seed: int, config: AllSparkConfig | str = "demo") -> list[Sample]:
    """`n` samples of one modality, a pure function of (modality, n, seed, config)."""
    s = demo_spec(modality)
    mc = _config(config).modality(s.name)
    rng = np.random.default_rng([seed, s.demo.stream_id(s.name)])
    return [Sample(s.name, *s.demo.generate(mc, rng)) for _ in range(n)]


def generate_all(n: int | dict[str, int], seed: int, config: AllSparkConfig | str = "demo",
                 modalities: Iterable[str] | None = None) -> dict[str, list[Sample]]:
    cfg = _config(config)
    mods = [resolve_modality(m) for m in modalities] if modalities is not None else [mc.modality for mc in cfg.modalities]
    return {m: generate(m, n[m] if isinstance(n, dict) else n, seed, cfg) for m in mods}


def tokenizer_corpus(config: AllSparkConfig | str = "demo", n_text: int = 400, seed: int = 0) -> list[str]:
    """Text to train the demo tokenizer on: every modality's formatted prompt (repeated, so whole
    prompt words become tokens), and the generation modalities' synthetic inputs and answers."""
    cfg = _config(config)
    lines = []
    for mc in cfg.modalities:
        if spec(mc.modality).prompts:
            lines += [format_prompt(build_question(spec(mc.modality), mc, None, {}))] * 20
    for m, s in specs().items():
        if s.head.generates and s.demo is not None and m in [mc.modality for mc in cfg.modalities]:
            for x in generate(m, n_text, seed + 7919, cfg):
                lines += [format_prompt(build_question(s, cfg.modality(m), None, x.inputs)), " " + x.target]
    return lines
