"""The decoder over a static KV cache, as an ONNX graph: the buffers are read, never copied.

    decoder (static cache)   inputs_embeds (B, T, H), attention_mask (B, S), position_ids (B, T),
                             adapter_ids (B,), cache_position (T,), past_* (B, kv, S, hd)
                          -> logits, last_hidden_state, new_* (B, kv, T, hd)

`past_*` are the generation's buffers at their full length S (allocated once); `attention_mask`
marks the valid slots including this call's, which are `cache_position` (contiguous). The graph
returns only this call's keys/values (`new_*`); the runtime writes them into the buffers at
`cache_position` (`allspark.runtime.decoding`), so the cache is updated in place and a step's
shapes never change (CUDA graphs, TensorRT profiles). The module traced is
`allspark.model.decoder.StaticCacheDecoderModule` (split attention: see there).

It is an extra artifact of the `decoder` component (`onnx-static-cache`, `allspark export
--static-cache`): the growing graph stays the contract for Triton, TensorRT and the host path.
"""

from __future__ import annotations

import torch

from ..contract import tensors as C
from ..contract.manifest import CacheIO
from ..contract.tensors import Kind, TensorSpec
from ..model.decoder import StaticCacheDecoderModule
from ..model.model import AllSpark
from .specs import ComponentSpec


def static_cache_spec(model: AllSpark) -> ComponentSpec:
    c = model.config.llm
    L, A = c.num_layers, len(model.modalities)
    past, new = tuple(C.past_names(L)), tuple(C.new_names(L))

    def example(b: int, v: int) -> dict[str, torch.Tensor]:
        """Variant 0: a decode-like call (3 slots written, 2 new, a 12-slot buffer). Others: prefill
        into an empty buffer (v odd) or steps later on, left padding, stale values past the written
        slots (which must not count), mixed adapter sets."""
        g = torch.Generator().manual_seed(211 * v + b)
        S, written, T = (12, 3, 2) if v == 0 else (8 + 4 * v, 0 if v % 2 else 2 + v, 1 + v % 3 + (3 if v % 2 else 0))
        mask = torch.zeros(b, S, dtype=torch.int64)
        mask[:, : written + T] = 1
        for i in range(1, b):  # left padding of different lengths
            mask[i, : min(i, written + T - 1)] = 0
        pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, written: written + T]
        return {C.INPUTS_EMBEDS: torch.randn(b, T, c.hidden_size, generator=g), C.ATTENTION_MASK: mask,
                C.POSITION_IDS: pos, C.ADAPTER_IDS: torch.arange(b) % A,
                C.CACHE_POSITION: torch.arange(written, written + T),
                **{n: torch.randn(b, c.num_kv_heads, S, c.head_dim, generator=g) for n in past}}

    kv = (C.BATCH, c.num_kv_heads, C.TOTAL_LEN, c.head_dim)
    ins = (TensorSpec(C.INPUTS_EMBEDS, "float32", (C.BATCH, C.SEQ_LEN, c.hidden_size)),
           TensorSpec(C.ATTENTION_MASK, "int64", (C.BATCH, C.TOTAL_LEN), (0, 1)),
           TensorSpec(C.POSITION_IDS, "int64", (C.BATCH, C.SEQ_LEN), (0, c.max_position_embeddings - 1)),
           TensorSpec(C.ADAPTER_IDS, "int64", (C.BATCH,), (0, A - 1)),
           TensorSpec(C.CACHE_POSITION, "int64", (C.SEQ_LEN,), (0, c.max_position_embeddings - 1)),
           *(TensorSpec(n, "float32", kv) for n in past))
    outs = (TensorSpec(C.LOGITS, "float32", (C.BATCH, C.SEQ_LEN, c.vocab_size)),
            TensorSpec(C.LAST_HIDDEN_STATE, "float32", (C.BATCH, C.SEQ_LEN, c.hidden_size)),
            *(TensorSpec(n, "float32", (C.BATCH, c.num_kv_heads, C.SEQ_LEN, c.head_dim)) for n in new))
    return ComponentSpec(C.STATIC_DECODER, Kind.DECODER, None, StaticCacheDecoderModule(model), ins, outs, example,
                         args=(*C.DECODER_INPUTS, C.CACHE_POSITION, past), cache=CacheIO(past, new),
                         rebuild=static_cache_spec)
