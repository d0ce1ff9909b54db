"""The LLM as the decoder every runtime path steps: pure `forward`s over an explicit KV cache.

    DecoderModule             the growing cache: past (B, kv, P, hd) in, present (B, kv, P+T, hd) out
    StaticDecoderModule       a fixed-length cache (B, kv, S, hd) written at `cache_position`
                              (`inplace`: into the given buffers, the torch backend's decode loop)
    StaticCacheDecoderModule  the same buffers only read; returns this call's keys/values (B, kv, T, hd)
                              (the `onnx-static-cache` graph; the runtime writes them in place)

Each returns (logits, last_hidden_state, *cache) with the cache as one flat list
``[key_0, value_0, key_1, ...]``. The export traces them (`allspark.export.specs`,
`allspark.export.static_cache`) and the torch backend runs them, so the graphs and the torch
decode loop are the same code.

The static-cache graph splits attention so the buffers are only read: scores against the buffer's
slots written by earlier calls and against this call's own keys are concatenated (a (B, kv, g*T, S+T)
tensor: the scores, not the cache), softmaxed together, and the two value products summed. A
functional scatter (`StaticKV(inplace=False)`) would copy every layer's buffer every step, as the
growing graph's concatenation does; and binding `present` onto `past` (onnxruntime-genai's shared
buffer) corrupted onnxruntime's CPU heap when tried (glibc "corrupted double-linked list").
"""

from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .model import AllSpark

class DecoderModule(nn.Module):
    """The LLM for prefill (empty past) and decode, all adapter sets in one graph.

    Past key/values come as one flat list ``[key_0, value_0, key_1, ...]`` (a list keeps
    `dynamic_shapes` working where ``*past`` does not); every one is named in the ONNX graph.
    """

    def __init__(self, model: "AllSpark"):
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


class StaticKV:
    """A KV cache of fixed length for transformers' attention: each call's keys/values are written at
    `write_at` (one slot per new token) and attention reads the whole buffer under a mask, so shapes
    never change between steps (CUDA graphs). `inplace` writes into the given buffers (the torch
    decode loop); otherwise the updated buffers are new tensors (a copy of every buffer per call: the
    exported static-cache graph reads its buffers instead: `StaticCacheDecoderModule`)."""

    is_compileable = True

    def __init__(self, past: list[torch.Tensor], write_at: torch.Tensor, inplace: bool):
        self.past, self.write_at, self.inplace = past, write_at, inplace
        self.present: list[torch.Tensor] = list(past)

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        k, v = self.past[2 * layer_idx], self.past[2 * layer_idx + 1]
        key_states, value_states = key_states.to(k.dtype), value_states.to(v.dtype)
        if self.inplace:
            k.index_copy_(2, self.write_at, key_states)
            v.index_copy_(2, self.write_at, value_states)
        else:
            k, v = k.index_copy(2, self.write_at, key_states), v.index_copy(2, self.write_at, value_states)
        self.present[2 * layer_idx], self.present[2 * layer_idx + 1] = k, v
        return k, v

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.past[0].shape[2])


def static_mask(attention_mask: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, max_len) bool: query t sees the valid slots up to its own (`cache_position[t]`), and
    always itself, so a left-padding query never has an empty row (its output is unused)."""
    slots = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    upto = slots[None, :] <= cache_position[:, None]  # (T, max_len)
    own = slots[None, :] == cache_position[:, None]
    return (attention_mask.bool()[:, None, None, :] & upto[None, None]) | own[None, None]


class StaticDecoderModule(nn.Module):
    """The decoder over a fixed-length KV cache (`StaticKV`): `attention_mask` (B, max_len) marks the
    valid slots after this call's writes, `cache_position` (T,) the slots this call writes. Same
    logits as `DecoderModule` for the same tokens; the past comes back updated (same length)."""

    def __init__(self, model: "AllSpark", inplace: bool = False):
        super().__init__()
        self.llm = model.llm
        self.adapters = model.adapters
        self.num_layers = model.config.llm.num_layers
        self.inplace = inplace

    def forward(self, inputs_embeds, attention_mask, position_ids, adapter_ids, cache_position,
                past: list[torch.Tensor]):
        h, present = self.hidden(inputs_embeds, attention_mask, position_ids, adapter_ids, cache_position, past)
        return (self.llm.lm_head(h), h, *present)

    def hidden(self, inputs_embeds, attention_mask, position_ids, adapter_ids, cache_position,
               past: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The last hidden states and the updated cache, without the LM head (a prefill needs its
        logits at the last position only)."""
        cache = StaticKV(past, cache_position, self.inplace)
        h = self.llm.model(inputs_embeds=inputs_embeds, attention_mask=static_mask(attention_mask, cache_position),
                           position_ids=position_ids, past_key_values=cache, cache_position=cache_position,
                           use_cache=True, adapter_ids=adapter_ids).last_hidden_state
        return h, cache.present


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

    def __init__(self, model: "AllSpark"):
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
