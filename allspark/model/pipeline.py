"""One pipeline for every way of running the model: request -> row, and head output -> prediction.

    prepare_row(spec, mc, tokenizer, inputs, prompt)   validate, preprocess, build the prompt, tokenize
    padding(lengths)                                   left padding: mask, positions = cumsum(mask) - 1
    to_prediction(spec, mc, y, context)                head output -> label + scores | values

The PyTorch reference model (`AllSpark`) and `Runtime` (any backend) call these, so a request is
validated, preprocessed, tokenized and answered identically whichever runs it; generation is the
one decode loop in `allspark.model.generation`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InputError
from .config import ModalityConfig
from .registry import ModalitySpec, specs
from .schema import check_text
from .tokenizer import encode_prompt


@dataclass
class Row:
    """One prepared request: preprocessed arrays (batch of 1) and its prompt's token ids."""

    modality: str
    tensors: dict[str, np.ndarray]
    prompt_ids: list[int]
    context: dict[str, Any] = field(default_factory=dict)


@dataclass
class Prediction:
    modality: str
    label: str | None = None  # classification
    scores: dict[str, float] | None = None  # classification: probability per label
    values: np.ndarray | None = None  # regression, in the task's real units and shape
    text: str | None = None  # generation
    tokens: list[int] | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)

    def units(self) -> tuple[str, str]:
        """(quantity, unit) of a regression answer, as its modality's spec declares them."""
        s = specs().get(self.modality)
        return (s.quantity, s.unit) if s is not None else ("", "")

    def describe_values(self) -> str:
        """A regression answer in words: 'PM2.5 17.63 ug/m3', or the quantity, unit and shape, then the array."""
        v = np.asarray(self.values)
        quantity, unit = self.units()
        quantity = quantity or "values"
        if v.size == 1:
            return f"{quantity} {float(v.reshape(-1)[0]):.4g}{' ' + unit if unit else ''}"
        shape = " x ".join(map(str, v.shape))
        body = np.array2string(v, precision=2, suppress_small=True, max_line_width=100)
        return f"{quantity}{' in ' + unit if unit else ''} ({shape}):\n{body}"

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"modality": self.modality}
        for k in ("label", "scores", "text", "tokens"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        if self.values is not None:
            d["values"] = np.asarray(self.values).tolist()
            d.update({k: v for k, v in zip(("quantity", "unit"), self.units()) if v})
        d["timings_ms"] = {k: round(v, 3) for k, v in self.timings_ms.items()}
        return d


def build_question(spec: ModalitySpec, mc: ModalityConfig, prompt: str | None, context: dict) -> str:
    """The question put into Lynx's template: the prompt (labels filled in), plus a text input."""
    p = spec.default_prompt if prompt is None else prompt
    if mc.labels:
        p = p.replace("[category list]", ", ".join(mc.labels))
    if "text" in context:
        return f"{p} {context['text']}".strip()
    return p


def prepare_row(spec: ModalitySpec, mc: ModalityConfig, tokenizer, inputs: Any, prompt: str | None,
                max_prompt_tokens: int, tokenizer_lock: Any = None) -> Row:
    """Validate, preprocess and tokenize one request; InputError names what is wrong."""
    if spec.layout is not None and isinstance(inputs, dict):
        inputs = spec.layout(mc, inputs)
    x = spec.schema(mc).validate(spec.name, inputs)
    if prompt is not None:
        if not isinstance(prompt, str):
            raise InputError(spec.name, "prompt", "a str or None", type(prompt).__name__)
        check_text(spec.name, "prompt", prompt)
    tensors, ctx = spec.preprocess(mc, x)
    if tokenizer is None:
        raise InputError(spec.name, "prompt", "a model with a tokenizer", "none attached")
    with tokenizer_lock or contextlib.nullcontext():
        ids = encode_prompt(tokenizer, build_question(spec, mc, prompt, ctx))
    if len(ids) > max_prompt_tokens:
        raise InputError(spec.name, "prompt" if spec.has_encoder else "text",
                         f"at most {max_prompt_tokens} tokens", f"{len(ids)} tokens")
    return Row(spec.name, {k: np.asarray(v) for k, v in tensors.items()}, ids, ctx)


def stack(rows: Sequence[Row]) -> dict[str, np.ndarray]:
    """Rows of one modality -> one batch per input (concatenated along the batch axis)."""
    return {k: np.concatenate([r.tensors[k] for r in rows]) for k in rows[0].tensors}


def padding(lengths: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Left padding of sequences of `lengths`: attention mask and positions, each (B, T) int64.

    Positions come from the mask (cumsum - 1), so a row's positions do not depend on its padding:
    it gives the same answer alone or inside any batch."""
    T = max(lengths)
    mask = np.zeros((len(lengths), T), np.int64)
    for i, n in enumerate(lengths):
        mask[i, T - n:] = 1
    return mask, np.clip(mask.cumsum(-1) - 1, 0, None)


def to_prediction(spec: ModalitySpec, mc: ModalityConfig, y: np.ndarray, context: dict) -> Prediction:
    """A head's output (out_dim,) -> the answer: label and probabilities, or values in real units."""
    y = np.asarray(y, dtype=np.float32)
    pred = Prediction(spec.name)
    if spec.head.classifies:
        p = np.exp(y - y.max())
        p /= p.sum()
        pred.label = mc.labels[int(y.argmax())]
        pred.scores = {lab: float(v) for lab, v in zip(mc.labels, p)}
    elif spec.head.regresses:
        pred.values = spec.postprocess(mc, y, context)
    else:
        raise InputError(spec.name, "head", "a classification or regression head", f"a {spec.head.value} modality")
    return pred
