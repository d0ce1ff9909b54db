"""Export specs: one per component, in the style of optimum's ONNX configs.

A spec names the component (`allspark.contract.component_name`), wraps its module in a pure
positional ``forward``, declares every input and output (name, dtype, symbolic dims — the
contract's names, which the runtime, the manifest and the Triton configs read back), says how
the named inputs map onto ``forward``'s arguments, and gives an example-input factory. The factory
takes a batch size and a "variant": export uses variant 0 at batch 2 (batch 1 would freeze the
axis), validation uses other variants at other shapes.

    <modality>_encoder   preprocessed tensors (one list argument)  -> media
    <modality>_bridge    media                                      -> bridge_tokens
    <modality>_head      hidden                                     -> output
    embed_tokens         input_ids                                  -> inputs_embeds
    decoder              inputs_embeds, attention_mask, position_ids, adapter_ids, [past_*] ->
                         logits, last_hidden_state, present_*
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..contract import tensors as C
from ..contract.manifest import CacheIO
from ..contract.tensors import Kind, TensorSpec, component_name
from ..model.decoder import DecoderModule
from ..model.model import AllSpark
from ..model.registry import random_inputs
from ..model.registry import spec as modality_spec
from ..model.skeleton import fake_parameters
from .upcast import fp32_reference

# weight-only int8 / int4 graphs (block-wise MatMulNBits, 32 per block) against the fp32 module: relative
# RMS error ||graph - reference|| / ||reference|| per output over the real positions, worst over the
# validation cases' random inputs (validate.PARITY_METRIC; max abs and max rel are recorded too). Measured
# (2026-12-04, this 2-core machine): demo int8 <= 0.016 (point cloud encoder; decoder 0.008), demo int4
# <= 0.094 (table bridge; decoder 0.092); base int4 (22 layers, random weights): the encoders and bridges
# pass 0.35, the decoder's error grows with depth to 0.36 at the last layer's KV and the logits (its
# max_rel 0.46). int4: 0.5 (1.4x base's worst); a wrong graph measures >= 1 (a zeroed output 1, an
# uncorrelated one ~1.4, a sign flip 2; tests/test_parity_metric.py). int8: 0.05 (3x demo's worst; base
# int8 unmeasured: int8 steps are 1/16 of int4's, which predicts ~0.02-0.03 there).
# What the answers lose is measured by `allspark eval --build` and `allspark bench agreement`
# (docs/benchmarks/quantized.md)
INT8_TOLERANCE = 0.05
INT4_TOLERANCE = 0.5

Args = tuple[str | tuple[str, ...], ...]  # forward's positional arguments: an input, or a list of inputs


@dataclass
class ComponentSpec:
    name: str
    kind: Kind
    modality: str | None
    module: nn.Module
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    example: Callable[[int, int], dict[str, torch.Tensor]]  # (batch, variant) -> inputs by name
    args: Args  # how the inputs map onto forward's arguments
    # max abs error allowed against the fp32 PyTorch module, per precision of the graph
    # (fp32: 1e-4 abs; fp16: 2e-2 abs within [-1, 1], relative beyond (validate.PARITY_METRIC) — demo graphs
    # measured at <= 3.2e-3, the hsi encoder 2.6e-3 of |10|; int8/int4: relative RMS, see above)
    tolerance: dict[str, float] = field(default_factory=lambda: {"fp32": 1e-4, "fp16": 2e-2, "int8": INT8_TOLERANCE,
                                                                 "int4": INT4_TOLERANCE})
    cache: CacheIO | None = None  # the decoder's KV-cache names
    rebuild: Callable[[AllSpark], "ComponentSpec"] | None = None  # the spec again (a reduced-depth twin's)

    def forward_args(self, values: Mapping[str, torch.Tensor]) -> tuple:
        """Named inputs -> `module`'s positional arguments (a list where the spec groups inputs)."""
        return tuple([values[n] for n in a] if isinstance(a, tuple) else values[a] for a in self.args)

    def dynamic_shapes(self) -> tuple:
        """torch.export dynamic shapes in `forward_args`' structure; one `Dim` per symbolic name."""
        dims: dict[str, torch.export.Dim] = {}
        by_name = {t.name: t for t in self.inputs}

        def shape(name: str) -> dict | None:
            t = by_name[name]
            return {i: dims.setdefault(d, torch.export.Dim(d)) for i, d in enumerate(t.dims) if isinstance(d, str)} or None

        return tuple([shape(n) for n in a] if isinstance(a, tuple) else shape(a) for a in self.args)

    @property
    def state_inputs(self) -> tuple[str, ...]:
        """Inputs that carry state between calls (the decoder's past), not request data."""
        return self.cache.past if self.cache else ()


class _Encoder(nn.Module):
    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return self.encoder(*tensors)


class _Embed(nn.Module):
    def __init__(self, embed: nn.Module):
        super().__init__()
        self.embed = embed

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)


def _stack(rows: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.concatenate([r[k] for r in rows])) for k in rows[0]}


def _preprocessed(model: AllSpark, modality: str, batch: int, variant: int) -> list[dict[str, np.ndarray]]:
    mc, s = model.config.modality(modality), modality_spec(modality)
    rng = np.random.default_rng(1000 * variant + batch)
    return [s.preprocess(mc, s.schema(mc).validate(modality, random_inputs(mc, rng, variant)))[0]
            for _ in range(batch)]


def encoder_spec(model: AllSpark, modality: str) -> ComponentSpec:
    first = _stack(_preprocessed(model, modality, 1, 0))
    names = tuple(first)
    mc = model.config.modality(modality)
    bounds = {f.name: tuple(int(v) for v in f.value_range) for f in modality_spec(modality).schema(mc).fields
              if f.kind == "int" and f.value_range is not None}  # what a direct caller may send
    ins = tuple(TensorSpec(n, str(t.numpy().dtype), (C.BATCH, *t.shape[1:]), bounds.get(n)) for n, t in first.items())
    pack = model.pack(modality)
    if any(p.is_meta for p in pack.encoder.parameters()):  # a skeleton (streamed export): shapes only
        with torch.no_grad(), fake_parameters(pack.encoder, torch.float32) as mode, mode:
            media = pack.encoder(*first.values())
    else:
        with torch.no_grad(), fp32_reference(pack.encoder):  # (an fp16 checkpoint's encoder, on fp32 inputs)
            media = pack.encoder(*first.values())
    return ComponentSpec(
        component_name(Kind.ENCODER, modality), Kind.ENCODER, modality, _Encoder(pack.encoder), ins,
        (TensorSpec(C.MEDIA, "float32", (C.BATCH, media.shape[1], media.shape[2])),),
        lambda b, v: _stack(_preprocessed(model, modality, b, v)), args=(names,))


def bridge_spec(model: AllSpark, modality: str, media_tokens: int, media_width: int) -> ComponentSpec:
    cfg = model.config

    def example(b: int, v: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(17 * v + b)
        return {C.MEDIA: torch.randn(b, media_tokens + 5 * v, media_width, generator=g)}

    return ComponentSpec(
        component_name(Kind.BRIDGE, modality), Kind.BRIDGE, modality, model.pack(modality).bridge,
        (TensorSpec(C.MEDIA, "float32", (C.BATCH, C.NUM_TOKENS, media_width)),),
        (TensorSpec(C.BRIDGE_TOKENS, "float32", (C.BATCH, cfg.bridge.num_latents, cfg.llm.hidden_size)),),
        example, args=(C.MEDIA,))


def head_spec(model: AllSpark, modality: str) -> ComponentSpec:
    H = model.config.llm.hidden_size
    out_dim = modality_spec(modality).out_dim(model.config.modality(modality))

    def example(b: int, v: int) -> dict[str, torch.Tensor]:
        return {C.HIDDEN: torch.randn(b, H, generator=torch.Generator().manual_seed(31 * v + b))}

    return ComponentSpec(component_name(Kind.HEAD, modality), Kind.HEAD, modality, model.pack(modality).head,
                         (TensorSpec(C.HIDDEN, "float32", (C.BATCH, H)),),
                         (TensorSpec(C.HEAD_OUTPUT, "float32", (C.BATCH, out_dim)),), example, args=(C.HIDDEN,))


def embed_spec(model: AllSpark) -> ComponentSpec:
    V, H = model.config.llm.vocab_size, model.config.llm.hidden_size

    def example(b: int, v: int) -> dict[str, torch.Tensor]:
        return {C.INPUT_IDS: torch.randint(0, V, (b, 7 + 3 * v), generator=torch.Generator().manual_seed(v))}

    return ComponentSpec(component_name(Kind.EMBED_TOKENS), Kind.EMBED_TOKENS, None,
                         _Embed(model.llm.get_input_embeddings()),
                         (TensorSpec(C.INPUT_IDS, "int64", (C.BATCH, C.SEQ_LEN), (0, V - 1)),),
                         (TensorSpec(C.INPUTS_EMBEDS, "float32", (C.BATCH, C.SEQ_LEN, H)),), example,
                         args=(C.INPUT_IDS,), tolerance={"fp32": 0.0, "fp16": 1e-2, "int8": 1e-3, "int4": 1e-3})  # int8/int4: the table kept fp16


def decoder_spec(model: AllSpark) -> ComponentSpec:
    c = model.config.llm
    L, A = c.num_layers, len(model.modalities)
    cache = CacheIO(tuple(C.past_names(L)), tuple(C.present_names(L)))

    def example(b: int, v: int) -> dict[str, torch.Tensor]:
        """Variant 0: decode-like (past 3, seq 5). Others: left-padded rows, mixed adapter sets."""
        g = torch.Generator().manual_seed(101 * v + b)
        past_len, seq = (3, 5) if v == 0 else (2 * (v - 1), 6 + v)
        mask = torch.ones(b, past_len + seq, dtype=torch.int64)
        for i in range(1, b):  # left padding of different lengths
            mask[i, : min(i * 2, past_len + seq - 1)] = 0
        pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, past_len:]
        ids = torch.arange(b) % A
        past = {n: torch.randn(b, c.num_kv_heads, past_len, c.head_dim, generator=g) for n in cache.past}
        return {C.INPUTS_EMBEDS: torch.randn(b, seq, c.hidden_size, generator=g), C.ATTENTION_MASK: mask,
                C.POSITION_IDS: pos, C.ADAPTER_IDS: ids, **past}

    kv_dims = (C.BATCH, c.num_kv_heads, C.PAST_LEN, c.head_dim)
    ins = (TensorSpec(C.INPUTS_EMBEDS, "float32", (C.BATCH, C.SEQ_LEN, c.hidden_size)),
           TensorSpec(C.ATTENTION_MASK, "int64", (C.BATCH, C.TOTAL_LEN), (0, 1)),
           TensorSpec(C.POSITION_IDS, "int64", (C.BATCH, C.SEQ_LEN), (0, c.max_position_embeddings - 1)),
           TensorSpec(C.ADAPTER_IDS, "int64", (C.BATCH,), (0, A - 1)),
           *(TensorSpec(n, "float32", kv_dims) for n in cache.past))
    present_dims = (C.BATCH, c.num_kv_heads, C.TOTAL_LEN, c.head_dim)
    outs = (TensorSpec(C.LOGITS, "float32", (C.BATCH, C.SEQ_LEN, c.vocab_size)),
            TensorSpec(C.LAST_HIDDEN_STATE, "float32", (C.BATCH, C.SEQ_LEN, c.hidden_size)),
            *(TensorSpec(n, "float32", present_dims) for n in cache.present))
    return ComponentSpec(component_name(Kind.DECODER), Kind.DECODER, None, DecoderModule(model), ins, outs, example,
                         args=(*C.DECODER_INPUTS, cache.past), cache=cache, rebuild=decoder_spec)


def component_specs(model: AllSpark) -> list[ComponentSpec]:
    """Every component of `model`, in export order."""
    specs: list[ComponentSpec] = []
    for m in model.modalities:
        s = modality_spec(m)
        if s.has_encoder:
            enc = encoder_spec(model, m)
            _, n, w = enc.outputs[0].dims
            specs += [enc, bridge_spec(model, m, int(n), int(w))]
        if not s.head.generates:
            specs.append(head_spec(model, m))
    return specs + [embed_spec(model), decoder_spec(model)]


def routes(model: AllSpark, specs: list[ComponentSpec]) -> dict[str, dict[str, str | None]]:
    """Per modality, the components its requests go through (the manifest's `routes`)."""
    have = {(s.kind, s.modality): s.name for s in specs}
    return {m: {k.value: have.get((k, m)) for k in (Kind.ENCODER, Kind.BRIDGE, Kind.HEAD)} for m in model.modalities}
