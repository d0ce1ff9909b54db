"""AllSpark in PyTorch: the reference every exported component and backend is checked against.

    M(m, p) = Head_m( LLM_{adapters m}( Bridge_m(Enc_m(m)) ; Embed(Tokenize(p)) ) )

One frozen base LLM (transformers' LlamaForCausalLM, key layout untouched) is shared by all
modality packs (encoder, bridge, adapter set, head). A batch may mix modalities: rows are
left-padded, positions come from the mask (cumsum - 1) and each row's `adapter_ids` entry selects
its adapter set, so a row gives the same answer alone or inside any batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from ..errors import InputError, UnknownLabelSetError
from .adapters import StackedAdapter, attach_adapters
from .bridge import PerceiverResampler
from .config import AllSparkConfig, HeadKind, LLMConfig, Modality, ModalityConfig
from .heads import ClassificationHead, RegressionHead
from .registry import build_question, resolve_modality, spec
from .tokenizer import encode_prompt


def llama_config(c: LLMConfig) -> LlamaConfig:
    cfg = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=None)
    cfg._attn_implementation = "sdpa"
    return cfg


class ModalityPack(nn.Module):
    """Everything one modality owns except its adapter set (which is stacked with the others')."""

    def __init__(self, mc: ModalityConfig, cfg: AllSparkConfig):
        super().__init__()
        s = spec(mc.modality)
        self.encoder = s.encoder(mc.encoder) if s.has_encoder else None
        self.bridge = (PerceiverResampler(cfg.bridge, cfg.llm.hidden_size, mc.encoder.width)
                       if s.has_encoder else None)
        if s.head in (HeadKind.CLASSIFICATION, HeadKind.PIXEL_CLASSIFICATION):
            self.head = ClassificationHead(cfg.llm.hidden_size, s.out_dim(mc))
        elif s.head == HeadKind.REGRESSION:
            self.head = RegressionHead(cfg.llm.hidden_size, s.out_dim(mc))
        else:
            self.head = None  # generation: the LLM's lm_head


@dataclass
class Row:
    """One prepared request: preprocessed tensors (batch of 1) and its prompt's token ids."""

    modality: Modality
    tensors: dict[str, torch.Tensor]
    prompt_ids: list[int]
    context: dict[str, Any] = field(default_factory=dict)


@dataclass
class Batch:
    inputs_embeds: torch.Tensor  # (B, T, H), left-padded with zeros
    attention_mask: torch.Tensor  # (B, T) int64, 0 on padding
    position_ids: torch.Tensor  # (B, T) int64, cumsum(mask) - 1
    adapter_ids: torch.Tensor  # (B,) int64


def left_pad(seqs: Sequence[torch.Tensor], adapter_ids: Sequence[int]) -> Batch:
    """Stack (L_i, H) sequences into a left-padded batch with mask-derived positions."""
    T, H = max(s.shape[0] for s in seqs), seqs[0].shape[1]
    emb = seqs[0].new_zeros(len(seqs), T, H)
    mask = torch.zeros(len(seqs), T, dtype=torch.int64, device=emb.device)
    for i, s in enumerate(seqs):
        emb[i, T - s.shape[0]:] = s
        mask[i, T - s.shape[0]:] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return Batch(emb, mask, pos, torch.tensor(list(adapter_ids), dtype=torch.int64, device=emb.device))


class AllSpark(nn.Module):
    def __init__(self, config: AllSparkConfig, modalities: Sequence[Modality | str] | None = None,
                 tokenizer=None):
        super().__init__()
        self.config = config
        mods = [resolve_modality(m) for m in (modalities or [mc.modality for mc in config.modalities])]
        self.modalities: tuple[Modality, ...] = tuple(mods)  # order = adapter set index
        for m in mods:
            config.modality(m)  # raises if the preset lacks it
        self.tokenizer = tokenizer
        self.llm = LlamaForCausalLM(llama_config(config.llm))
        self.adapters = nn.ModuleList(
            StackedAdapter(len(mods), config.llm.hidden_size, config.llm.adapter_size)
            for _ in config.llm.adapter_layers)
        self.packs = nn.ModuleDict({m.value: ModalityPack(config.modality(m), config) for m in mods})
        self._hooks = attach_adapters(self.llm.model.layers, self.adapters, config.llm.adapter_layers)
        self.llm.requires_grad_(False)  # the base LLM is frozen and shared
        self.eval()

    # ---- lookup ---------------------------------------------------------------------------------
    def adapter_index(self, m: Modality | str) -> int:
        m = resolve_modality(m)
        if m not in self.modalities:
            from ..errors import UnknownModalityError
            raise UnknownModalityError(m.value, tuple(x.value for x in self.modalities))
        return self.modalities.index(m)

    def pack(self, m: Modality | str) -> ModalityPack:
        self.adapter_index(m)
        return self.packs[resolve_modality(m).value]

    def labels(self, m: Modality | str, label_set: str | None = None) -> tuple[str, ...]:
        mc = self.config.modality(m)
        if label_set is not None and label_set != mc.label_set:
            raise UnknownLabelSetError(mc.modality.value, label_set, mc.label_set or "(none)")
        return mc.labels

    # ---- requests -> rows -----------------------------------------------------------------------
    def prepare(self, m: Modality | str, inputs: dict[str, Any], prompt: str | None = None) -> Row:
        """Validate, preprocess and tokenize one request (raises InputError on bad input)."""
        m = resolve_modality(m)
        self.adapter_index(m)
        s, mc = spec(m), self.config.modality(m)
        x = s.schema(mc).validate(m.value, inputs)
        tensors, ctx = s.preprocess(mc, x)
        if self.tokenizer is None:
            raise InputError(m.value, "prompt", "a model with a tokenizer", "none attached")
        ids = encode_prompt(self.tokenizer, build_question(m, mc, prompt, ctx))
        if len(ids) > self.config.max_prompt_tokens:
            raise InputError(m.value, "prompt" if s.has_encoder else "text",
                             f"at most {self.config.max_prompt_tokens} tokens", f"{len(ids)} tokens")
        return Row(m, tensors, ids, ctx)

    # ---- forward --------------------------------------------------------------------------------
    def media_tokens(self, m: Modality, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        p = self.pack(m)
        return p.bridge(p.encoder(**tensors))  # (B, num_latents, H)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llm.get_input_embeddings()(ids)

    def build_batch(self, rows: Sequence[Row]) -> Batch:
        """Encoders and bridges run batched per modality; then [bridge ; prompt] per row."""
        device = self.llm.device
        bridged: dict[int, torch.Tensor] = {}
        for m in dict.fromkeys(r.modality for r in rows):
            idx = [i for i, r in enumerate(rows) if r.modality == m]
            if not spec(m).has_encoder:
                continue
            keys = rows[idx[0]].tensors.keys()
            stacked = {k: torch.cat([rows[i].tensors[k] for i in idx]).to(device) for k in keys}
            for i, t in zip(idx, self.media_tokens(m, stacked)):
                bridged[i] = t
        seqs = []
        for i, r in enumerate(rows):
            prompt = self.embed(torch.tensor(r.prompt_ids, device=device))
            seqs.append(torch.cat([bridged[i], prompt]) if i in bridged else prompt)
        return left_pad(seqs, [self.adapter_index(r.modality) for r in rows])

    def decode(self, b: Batch, past=None, use_cache: bool = False):
        return self.llm.model(inputs_embeds=b.inputs_embeds, attention_mask=b.attention_mask,
                              position_ids=b.position_ids, past_key_values=past, use_cache=use_cache,
                              adapter_ids=b.adapter_ids)

    @torch.no_grad()
    def forward(self, rows: Sequence[Row]) -> list[torch.Tensor]:
        """Per row: class logits, regression values (real units, before postprocess) or, for
        generation modalities, the next-token logits."""
        b = self.build_batch(rows)
        last = self.decode(b).last_hidden_state[:, -1]  # (B, H): left padding puts every row's end here
        out: list[torch.Tensor] = []
        for i, r in enumerate(rows):
            head = self.pack(r.modality).head
            out.append(head(last[i:i + 1])[0] if head is not None else self.llm.lm_head(last[i:i + 1])[0])
        return out

    def postprocess(self, row: Row, y: torch.Tensor) -> dict[str, Any]:
        m = row.modality
        s, mc = spec(m), self.config.modality(m)
        y = y.float().cpu().numpy()
        if s.head in (HeadKind.CLASSIFICATION, HeadKind.PIXEL_CLASSIFICATION):
            probs = np.exp(y - y.max())
            probs /= probs.sum()
            return {"label": mc.labels[int(y.argmax())], "scores": probs}
        return {"values": s.postprocess(mc, y, row.context)}

    @torch.no_grad()
    def generate(self, rows: Sequence[Row], max_new_tokens: int = 64, stop_at_eos: bool = True) -> list[list[int]]:
        """Greedy decoding with the KV cache; stops per row at EOS (unless `stop_at_eos` is
        False: then exactly `max_new_tokens` per row). Returns the new token ids."""
        from transformers import DynamicCache

        b = self.build_batch(rows)
        eos = self.tokenizer.eos_token_id if self.tokenizer is not None and stop_at_eos else None
        cache = DynamicCache()
        h = self.decode(b, cache, use_cache=True).last_hidden_state[:, -1]
        mask, pos = b.attention_mask, b.position_ids[:, -1:]
        done = torch.zeros(len(rows), dtype=torch.bool, device=h.device)
        out: list[list[int]] = [[] for _ in rows]
        for _ in range(max_new_tokens):
            nxt = self.llm.lm_head(h).argmax(-1)  # (B,)
            for i, t in enumerate(nxt.tolist()):
                if not done[i]:
                    out[i].append(t)
            done |= nxt == eos if eos is not None else torch.zeros_like(done)
            if bool(done.all()):
                break
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            pos = pos + 1
            step = Batch(self.embed(nxt)[:, None], mask, pos, b.adapter_ids)
            h = self.decode(step, cache, use_cache=True).last_hidden_state[:, -1]
        return [[t for t in o if t != eos] for o in out]
