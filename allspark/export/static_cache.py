"""The decoder over a static KV cache, as an ONNX graph: the buffers are read, never copied.

    decoder (static cache)   inputs_embeds (B, T, H), attention_mask (B, S), position_ids (B, T),
                             adapter_ids (B,), cache_position (T,), past_* (B, kv, S, hd)
                          -> logits, last_hidden_state, new_* (B, kv, T, hd)

`past_*` are the generation's buffers at their full length S (allocated once); `attention_mask`
marks the valid slots including this call's, which are `cache_position` (contiguous). The graph
returns only this call's keys/values (`new_*`); the runtime writes them into the buffers at
`cache_position` (`allspark.runtime.decoding.StaticCache`), so the cache is updated in place and a
step's shapes never change (CUDA graphs, TensorRT profiles).

Attention is split so the buffers are only read: scores against the buffer's slots written by
earlier calls and against this call's own keys are concatenated (a (B, kv, g*T, S+T) tensor: the
scores, not the cache), softmaxed together, and the two value products summed. A functional
scatter (`StaticKV(inplace=False)`) would copy every layer's buffer every step, as the growing
graph's concatenation does; and binding `present` onto `past` (onnxruntime-genai's shared buffer)
corrupted onnxruntime's CPU heap when tried (glibc "corrupted double-linked list").

It is an extra artifact of the `decoder` component (`onnx-static-cache`, `allspark export
--static-cache`): the growing graph stays the contract for Triton, TensorRT and the host path.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch import nn

from ..contract import tensors as C
from ..contract.manifest import CacheIO
from ..contract.tensors import Kind, TensorSpec
from ..model.model import AllSpark
from .specs import ComponentSpec

ATTENTION = "allspark_static_split"  # transformers attention-interface name, registered on first use
_switch = threading.Lock()


def split_mask(attention_mask: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, S + T) bool: query t sees the buffer's valid slots written before this call, then
    this call's tokens t' <= t that are valid, and always itself (a left-padding query never gets an
    empty row; its output is unused)."""
    S, T = attention_mask.shape[1], cache_position.shape[0]
    valid = attention_mask.bool()
    slots = torch.arange(S, device=valid.device)
    earlier = (valid & (slots < cache_position[:1])[None, :])[:, None, None, :]  # (B, 1, 1, S)
    t = torch.arange(T, device=valid.device)
    causal = t[None, :] <= t[:, None]  # (T, T): query, key
    own = (t[None, :] == t[:, None])[None, None]
    new = (valid.index_select(1, cache_position)[:, None, None, :] & causal[None, None]) | own  # (B, 1, T, T)
    return torch.cat([earlier.expand(-1, -1, T, -1), new], dim=-1)


def split_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor, scaling: float, dropout: float = 0.0, **kwargs):
    """transformers' attention-function contract (-> (B, T, heads, hd), None), with this layer's
    buffers from `allspark_buffers`. Grouped heads share a key head without `repeat_kv`'s copy: the
    queries of one key head are folded into its rows."""
    buffers = kwargs["allspark_buffers"]
    kb, vb = buffers[2 * module.layer_idx], buffers[2 * module.layer_idx + 1]
    B, heads, T, d = query.shape
    kv, S = kb.shape[1], kb.shape[2]
    g = heads // kv
    q = query.reshape(B, kv, g * T, d)
    scores = torch.cat([q @ kb.transpose(-1, -2), q @ key.transpose(-1, -2)], dim=-1) * scaling
    mask = attention_mask[:, :, None].expand(-1, -1, g, -1, -1).reshape(B, 1, g * T, S + T)
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    p = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    out = p[..., :S] @ vb + p[..., S:] @ value  # (B, kv, g*T, d)
    return out.reshape(B, heads, T, d).transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def _split_attention(config):
    from transformers import AttentionInterface

    with _switch:  # the config is the model's: one switch at a time
        if ATTENTION not in AttentionInterface._global_mapping:
            AttentionInterface.register(ATTENTION, split_attention)
        old = config._attn_implementation
        config._attn_implementation = ATTENTION
        try:
            yield
        finally:
            config._attn_implementation = old


class _NewKV:
    """The cache object transformers' layers write to: it keeps each layer's new keys/values (in the
    buffers' dtype) and hands them back unchanged; the buffers are read by `split_attention`."""

    is_compileable = True

    def __init__(self, past: list[torch.Tensor]):
        self.past = past
        self.new: list[torch.Tensor] = list(past)

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        dtype = self.past[2 * layer_idx].dtype
        k, v = key_states.to(dtype), value_states.to(dtype)
        self.new[2 * layer_idx], self.new[2 * layer_idx + 1] = k, v
        return k, v

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.past[0].shape[2])


class StaticCacheDecoderModule(nn.Module):
    """The decoder stepping a static cache it only reads; returns this call's keys/values."""

    def __init__(self, model: AllSpark):
        super().__init__()
        self.llm = model.llm
        self.adapters = model.adapters
        self.num_layers = model.config.llm.num_layers

    def forward(self, inputs_embeds, attention_mask, position_ids, adapter_ids, cache_position,
                past: list[torch.Tensor]):
        cache = _NewKV(past)
        with _split_attention(self.llm.config):
            h = self.llm.model(inputs_embeds=inputs_embeds, attention_mask=split_mask(attention_mask, cache_position),
                               position_ids=position_ids, past_key_values=cache, cache_position=cache_position,
                               use_cache=True, adapter_ids=adapter_ids, allspark_buffers=past).last_hidden_state
        return (self.llm.lm_head(h), h, *cache.new)


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
