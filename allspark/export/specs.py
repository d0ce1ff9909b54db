"""Export specs: one per component, in the style of optimum's ONNX configs.

A spec names the component, wraps its module in a pure positional ``forward``, declares every
input and output (name, dtype, symbolic dims — the same names the runtime, the manifest and the
Triton configs use), and gives an example-input factory. The factory takes a batch size and a
"variant": export uses variant 0 at batch 2 (batch 1 would freeze the axis), validation uses other
variants at other shapes.

Components of a build:

    <modality>_encoder   preprocessed tensors          -> media      [batch, num_tokens, width]
    <modality>_bridge    media                          -> bridge_tokens [batch, num_latents, hidden]
    <modality>_head      hidden [batch, hidden]         -> output     [batch, out_dim]
    embed_tokens         input_ids [batch, seq_len]     -> inputs_embeds
    decoder              inputs_embeds, attention_mask, position_ids, adapter_ids, past_* ->
                         logits, last_hidden_state, present_*
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..model.config import HeadKind
from ..model.model import AllSpark
from ..model.registry import spec as modality_spec
from ..model.samples import random_inputs

# Symbolic dimension names, used unchanged in ONNX, the manifest and config.pbtxt.
BATCH, SEQ_LEN, PAST_LEN, TOTAL_LEN, NUM_TOKENS = "batch", "seq_len", "past_len", "total_len", "num_tokens"

Dims = tuple[str | int, ...]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32", "int64", ...
    dims: Dims

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "dims": list(self.dims)}


@dataclass
class ComponentSpec:
    name: str
    kind: str  # encoder | bridge | head | embed_tokens | decoder
    modality: str | None
    module: nn.Module
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    example: Callable[[int, int], tuple[torch.Tensor, ...]]  # (batch, variant) -> inputs in order
    # max abs error allowed against the fp32 PyTorch module, per precision of the graph
    # (fp32: 1e-4; fp16: 2e-2 — tiny/demo graphs measured at <= 3.2e-3)
    tolerance: dict[str, float] = field(default_factory=lambda: {"fp32": 1e-4, "fp16": 2e-2})

    def dynamic_shapes(self) -> dict:
        dims: dict[str, torch.export.Dim] = {}

        def dim(name: str) -> torch.export.Dim:
            return dims.setdefault(name, torch.export.Dim(name))

        shapes = {}
        for t in self.inputs:
            shapes[t.name] = {i: dim(d) for i, d in enumerate(t.dims) if isinstance(d, str)} or None
        return shapes


class _Encoder(nn.Module):
    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.encoder(*tensors)


class _Embed(nn.Module):
    def __init__(self, embed: nn.Module):
        super().__init__()
        self.embed = embed

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)


class DecoderModule(nn.Module):
    """The LLM for prefill (empty past) and decode, all adapter sets in one graph.

    Past key/values come as one flat list ``[key_0, value_0, key_1, ...]`` (a list keeps
    `dynamic_shapes` working where ``*past`` does not); every one is named in the ONNX graph.
    """

    def __init__(self, model: AllSpark):
        super().__init__()
        self.llm = model.llm  # adapters are hooked onto its layers; their weights are reached from there
        self.adapters = model.adapters
        self.num_layers = model.config.llm.num_layers

    def forward(self, inputs_embeds, attention_mask, position_ids, adapter_ids, past: list[torch.Tensor]):
        from transformers import DynamicCache

        cache = DynamicCache()
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        h = self.llm.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                           position_ids=position_ids, past_key_values=cache, use_cache=True,
                           adapter_ids=adapter_ids).last_hidden_state
        present = []
        for i in range(self.num_layers):
            present += [cache.layers[i].keys, cache.layers[i].values]
        return (self.llm.lm_head(h), h, *present)


def _stack_rows(rows: list[dict[str, torch.Tensor]], names: list[str]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.cat([r[n] for r in rows]) for n in names)


def _preprocessed(model: AllSpark, modality: str, batch: int, variant: int) -> list[dict[str, torch.Tensor]]:
    mc, s = model.config.modality(modality), modality_spec(modality)
    rng = np.random.default_rng(1000 * variant + batch)
    return [s.preprocess(mc, s.schema(mc).validate(modality, random_inputs(mc, rng, variant)))[0]
            for _ in range(batch)]


def encoder_spec(model: AllSpark, modality: str) -> ComponentSpec:
    rows = _preprocessed(model, modality, 1, 0)
    names = list(rows[0])
    ins = tuple(TensorSpec(n, str(t.numpy().dtype), (BATCH, *t.shape[1:])) for n, t in rows[0].items())
    pack = model.pack(modality)
    with torch.no_grad():
        media = pack.encoder(*_stack_rows(rows, names))
    return ComponentSpec(
        f"{modality}_encoder", "encoder", modality, _Encoder(pack.encoder), ins,
        (TensorSpec("media", "float32", (BATCH, media.shape[1], media.shape[2])),),
        lambda b, v: _stack_rows(_preprocessed(model, modality, b, v), names))


def bridge_spec(model: AllSpark, modality: str, media_tokens: int, media_width: int) -> ComponentSpec:
    cfg = model.config

    def example(b: int, v: int) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(17 * v + b)
        return (torch.randn(b, media_tokens + 5 * v, media_width, generator=g),)

    return ComponentSpec(
        f"{modality}_bridge", "bridge", modality, model.pack(modality).bridge,
        (TensorSpec("media", "float32", (BATCH, NUM_TOKENS, media_width)),),
        (TensorSpec("bridge_tokens", "float32", (BATCH, cfg.bridge.num_latents, cfg.llm.hidden_size)),), example)


def head_spec(model: AllSpark, modality: str) -> ComponentSpec:
    H = model.config.llm.hidden_size
    out_dim = modality_spec(modality).out_dim(model.config.modality(modality))

    def example(b: int, v: int) -> tuple[torch.Tensor, ...]:
        return (torch.randn(b, H, generator=torch.Generator().manual_seed(31 * v + b)),)

    return ComponentSpec(f"{modality}_head", "head", modality, model.pack(modality).head,
                         (TensorSpec("hidden", "float32", (BATCH, H)),),
                         (TensorSpec("output", "float32", (BATCH, out_dim)),), example)


def embed_spec(model: AllSpark) -> ComponentSpec:
    V, H = model.config.llm.vocab_size, model.config.llm.hidden_size

    def example(b: int, v: int) -> tuple[torch.Tensor, ...]:
        return (torch.randint(0, V, (b, 7 + 3 * v), generator=torch.Generator().manual_seed(v)),)

    return ComponentSpec("embed_tokens", "embed_tokens", None, _Embed(model.llm.get_input_embeddings()),
                         (TensorSpec("input_ids", "int64", (BATCH, SEQ_LEN)),),
                         (TensorSpec("inputs_embeds", "float32", (BATCH, SEQ_LEN, H)),), example,
                         tolerance={"fp32": 0.0, "fp16": 1e-2})


def past_names(num_layers: int, prefix: str) -> list[str]:
    return [f"{prefix}_{kv}.{i}" for i in range(num_layers) for kv in ("key", "value")]


def decoder_spec(model: AllSpark) -> ComponentSpec:
    c = model.config.llm
    L, A = c.num_layers, len(model.modalities)
    kv_dims = (BATCH, c.num_kv_heads, PAST_LEN, c.head_dim)

    def example(b: int, v: int) -> tuple:
        """Variant 0: decode-like (past 3, seq 5). Others: left-padded rows, mixed adapter sets."""
        g = torch.Generator().manual_seed(101 * v + b)
        past_len, seq = (3, 5) if v == 0 else (2 * (v - 1), 6 + v)
        mask = torch.ones(b, past_len + seq, dtype=torch.int64)
        for i in range(1, b):  # left padding of different lengths
            mask[i, : min(i * 2, past_len + seq - 1)] = 0
        pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, past_len:]
        ids = torch.arange(b) % A
        past = [torch.randn(b, c.num_kv_heads, past_len, c.head_dim, generator=g) for _ in range(2 * L)]
        return (torch.randn(b, seq, c.hidden_size, generator=g), mask, pos, ids, past)

    ins = (TensorSpec("inputs_embeds", "float32", (BATCH, SEQ_LEN, c.hidden_size)),
           TensorSpec("attention_mask", "int64", (BATCH, TOTAL_LEN)),
           TensorSpec("position_ids", "int64", (BATCH, SEQ_LEN)),
           TensorSpec("adapter_ids", "int64", (BATCH,)),
           *(TensorSpec(n, "float32", kv_dims) for n in past_names(L, "past")))
    present_dims = (BATCH, c.num_kv_heads, TOTAL_LEN, c.head_dim)
    outs = (TensorSpec("logits", "float32", (BATCH, SEQ_LEN, c.vocab_size)),
            TensorSpec("last_hidden_state", "float32", (BATCH, SEQ_LEN, c.hidden_size)),
            *(TensorSpec(n, "float32", present_dims) for n in past_names(L, "present")))
    return ComponentSpec("decoder", "decoder", None, DecoderModule(model), ins, outs, example)


def component_specs(model: AllSpark) -> list[ComponentSpec]:
    """Every component of `model`, in export order."""
    specs: list[ComponentSpec] = []
    for m in model.modalities:
        s = modality_spec(m)
        if s.has_encoder:
            enc = encoder_spec(model, m.value)
            _, n, w = enc.outputs[0].dims
            specs += [enc, bridge_spec(model, m.value, int(n), int(w))]
        if s.head != HeadKind.GENERATION:
            specs.append(head_spec(model, m.value))
    return specs + [embed_spec(model), decoder_spec(model)]


def flatten_inputs(args: tuple) -> list[torch.Tensor]:
    """Example args (the decoder's last one is a list) -> the flat list of graph inputs."""
    flat: list[torch.Tensor] = []
    for a in args:
        flat.extend(a if isinstance(a, list) else [a])
    return flat
