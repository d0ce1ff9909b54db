"""Language and code: text in, text out (no encoder: the prompt and the text are tokenized together,
and the LLM's own lm_head generates the answer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..model.config import HeadKind, ModalityConfig
from ..model.readers import check_file_size
from ..model.registry import DemoTask, ModalitySpec
from .common import EXACT_MATCH_BAR, MAX_TEXT_CHARS, text_schema
from .synthetic import text as synthetic

_WORDS = "the movie was great and the acting was wonderful but the plot felt slow at times".split()


def preprocess(mc: ModalityConfig, x: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict]:
    return {}, {"text": x["text"]}  # the text joins the prompt (pipeline.build_question)


def read(path: Path, mc: ModalityConfig) -> dict[str, Any]:
    """A UTF-8 text file (at most 4 bytes per allowed character, checked before reading)."""
    check_file_size(path, 4 * MAX_TEXT_CHARS)
    try:
        return {"text": path.read_text(encoding="utf-8")}
    except UnicodeDecodeError as e:  # an image, an archive: not text
        raise InputError("<file>", "<file>", "a UTF-8 text file",
                         f"a {path.suffix.lower() or 'extensionless'} file that is not UTF-8 text "
                         f"(byte {e.start}: {e.reason})") from None


def _words(rng: np.random.Generator, v: int) -> tuple[int, list[str]]:
    n = 5 + 3 * v + int(rng.integers(0, 6))
    return n, [_WORDS[i] for i in rng.integers(0, len(_WORDS), n)]


def sample_review(mc: ModalityConfig, rng: np.random.Generator, v: int = 0) -> dict[str, Any]:
    return {"text": " ".join(_words(rng, v)[1])}


def sample_code(mc: ModalityConfig, rng: np.random.Generator, v: int = 0) -> dict[str, Any]:
    n, words = _words(rng, v)
    return {"text": f"def f(x):\n    return x + {n}  # {words[0]}"}


def _spec(name: str, task: str, metrics: tuple[str, ...], prompts: tuple[str, ...], sample, generate,
          stream: int) -> ModalitySpec:
    mc = ModalityConfig(name)
    return ModalitySpec(
        name=name, task=task, metrics=metrics, head=HeadKind.GENERATION, prompts=prompts,
        schema=text_schema, preprocess=preprocess, sample=sample, read=read,
        presets={"tiny": mc, "demo": mc, "base": mc, "paper": mc}, out_dim=lambda mc: 0,
        demo=DemoTask(generate, EXACT_MATCH_BAR, stream=stream))


LANGUAGE = _spec("language", "sentiment (IMDB)", ("accuracy",),
                 ("Please determine if this movie review is positive or negative?",),
                 sample_review, synthetic.language, stream=0)
CODE = _spec("code", "code -> documentation (CodeSearchNet)", ("MRR", "exact match"), (),
             sample_code, synthetic.code, stream=1)
