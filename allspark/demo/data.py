"""Synthetic data for all ten modalities: one generator per modality, deterministic by seed.

    GENERATORS[modality](modality_config, rng) -> (inputs, target)

`inputs` is a request exactly as `AllSpark.prepare(modality, inputs)` accepts it; `target` is the
answer in the form the evaluation compares with: a label index (classification), an array in the
postprocessed shape and units (regression: PM2.5 in ug/m3 (1,), future positions in metres
(pred_len, 2), speeds in mph (nodes, horizon)), or the answer text (language, code). Sizes come
from the preset (`get_preset("demo").modality(m).encoder`), so the same generators serve `tiny`.
Each modality draws from its own stream, `default_rng([seed, modality index])`: adding samples of
one modality never changes another's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Union

import numpy as np

from ..model.config import AllSparkConfig, Modality, ModalityConfig, get_preset
from ..model.registry import REGISTRY, build_question
from ..model.tokenizer import format_prompt
from . import geometry, imagery, records, text

Target = Union[int, np.ndarray, str]
Generator = Callable[[ModalityConfig, np.random.Generator], tuple[dict[str, Any], Target]]

M = Modality
GENERATORS: dict[Modality, Generator] = {
    M.LANGUAGE: text.language,
    M.CODE: text.code,
    M.TABLE: records.table,
    M.RGB: imagery.rgb,
    M.MSI: imagery.msi,
    M.HSI: imagery.hsi,
    M.SAR: imagery.sar,
    M.TRAJECTORY: geometry.trajectory,
    M.GRAPH: records.graph,
    M.POINT_CLOUD: geometry.point_cloud,
}
if set(GENERATORS) != set(Modality):
    raise RuntimeError("every Modality needs exactly one synthetic generator")


@dataclass(frozen=True)
class Sample:
    modality: Modality
    inputs: dict[str, Any]  # a request for AllSpark.prepare
    target: Target


def _config(config: AllSparkConfig | str) -> AllSparkConfig:
    return get_preset(config) if isinstance(config, str) else config


def generate(modality: Modality | str, n: int, seed: int, config: AllSparkConfig | str = "demo") -> list[Sample]:
    """`n` samples of one modality, a pure function of (modality, n, seed, config)."""
    m = Modality(modality)
    mc = _config(config).modality(m)
    rng = np.random.default_rng([seed, list(Modality).index(m)])
    return [Sample(m, *GENERATORS[m](mc, rng)) for _ in range(n)]


def generate_all(n: int | dict[Modality, int], seed: int, config: AllSparkConfig | str = "demo",
                 modalities: Iterable[Modality] | None = None) -> dict[Modality, list[Sample]]:
    cfg = _config(config)
    mods = list(modalities) if modalities is not None else [mc.modality for mc in cfg.modalities]
    return {m: generate(m, n[m] if isinstance(n, dict) else n, seed, cfg) for m in mods}


def answer_text(sample: Sample) -> str:
    """What a generation modality should produce (the target text), else ''."""
    return sample.target if isinstance(sample.target, str) else ""


def tokenizer_corpus(config: AllSparkConfig | str = "demo", n_text: int = 400, seed: int = 0) -> list[str]:
    """Text to train the demo tokenizer on: every modality's formatted prompt (repeated, so whole
    prompt words become tokens), synthetic reviews and functions, and their answers."""
    cfg = _config(config)
    lines = []
    for mc in cfg.modalities:
        if REGISTRY[mc.modality].prompts:
            lines += [format_prompt(build_question(mc.modality, mc, None, {}))] * 20
    for m in (M.LANGUAGE, M.CODE):
        if m in [mc.modality for mc in cfg.modalities]:
            for s in generate(m, n_text, seed + 7919, cfg):
                lines += [format_prompt(build_question(m, cfg.modality(m), None, s.inputs)), " " + s.target]
    return lines
