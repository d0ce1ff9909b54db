"""AllSpark in PyTorch: the reference every exported component and backend is checked against.

    M(m, p) = Head_m( LLM_{adapters m}( Bridge_m(Enc_m(m)) ; Embed(Tokenize(p)) ) )

One frozen base LLM (transformers' LlamaForCausalLM, key layout untouched) is shared by all
modality packs (encoder, bridge, adapter set, head). A batch may mix modalities: rows are
left-padded, positions come from the mask (cumsum - 1) and each row's `adapter_ids` entry selects
its adapter set, so a row gives the same answer alone or inside any batch. Requests become rows and
head outputs become predictions through `allspark.model.pipeline`, as in the runtime.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from ..errors import UnknownLabelSetError, UnknownModalityError
from .adapters import StackedAdapter, attach_adapters
from .bridge import PerceiverResampler
from .config import AllSparkConfig, LLMConfig, ModalityConfig
from .generation import GenerationConfig, beam_width, generate
from .heads import make_head
from .pipeline import Prediction, Row, padding, prepare_row, stack, to_prediction
from .registry import resolve_modality, spec


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
        self.encoder = s.encoder_class(mc.encoder) if s.has_encoder else None
        self.bridge = (PerceiverResampler(cfg.bridge, cfg.llm.hidden_size, mc.encoder.width)
                       if s.has_encoder else None)
        self.head = make_head(s.head, cfg.llm.hidden_size, s.out_dim(mc))


@dataclass
class Batch:
    inputs_embeds: torch.Tensor  # (B, T, H), left-padded with zeros
    attention_mask: torch.Tensor  # (B, T) int64, 0 on padding
    position_ids: torch.Tensor  # (B, T) int64, cumsum(mask) - 1
    adapter_ids: torch.Tensor  # (B,) int64


def left_pad(seqs: Sequence[torch.Tensor], adapter_ids: Sequence[int]) -> Batch:
    """Stack (L_i, H) sequences into a left-padded batch (differentiable: training uses it)."""
    mask, pos = padding([s.shape[0] for s in seqs])
    T, H = mask.shape[1], seqs[0].shape[1]
    emb = seqs[0].new_zeros(len(seqs), T, H)
    for i, s in enumerate(seqs):
        emb[i, T - s.shape[0]:] = s
    dev = emb.device
    return Batch(emb, torch.from_numpy(mask).to(dev), torch.from_numpy(pos).to(dev),
                 torch.tensor(list(adapter_ids), dtype=torch.int64, device=dev))


class AllSpark(nn.Module):
    def __init__(self, config: AllSparkConfig, modalities: Sequence[str] | None = None, tokenizer=None,
                 llm_device: str | None = None):
        """`llm_device="meta"` builds the LLM without weights (`allspark new` streams them to disk)."""
        super().__init__()
        self.config = config
        mods = [resolve_modality(m) for m in (modalities or [mc.modality for mc in config.modalities])]
        self.modalities: tuple[str, ...] = tuple(mods)  # order = adapter set index
        for m in mods:
            config.modality(m)  # raises if the preset lacks it
        self.tokenizer = tokenizer
        with torch.device(llm_device) if llm_device else contextlib.nullcontext():
            self.llm = LlamaForCausalLM(llama_config(config.llm))
        self.adapters = nn.ModuleList(
            StackedAdapter(len(mods), config.llm.hidden_size, config.llm.adapter_size)
            for _ in config.llm.adapter_layers)
        self.packs = nn.ModuleDict({m: ModalityPack(config.modality(m), config) for m in mods})
        self._hooks = attach_adapters(self.llm.model.layers, self.adapters, config.llm.adapter_layers)
        self.llm.requires_grad_(False)  # the base LLM is frozen and shared
        self.eval()

    # ---- lookup ---------------------------------------------------------------------------------
    def adapter_index(self, m: str) -> int:
        name = resolve_modality(m)
        if name not in self.modalities:
            raise UnknownModalityError(name, self.modalities)
        return self.modalities.index(name)

    def pack(self, m: str) -> ModalityPack:
        return self.packs[self.modalities[self.adapter_index(m)]]

    def labels(self, m: str, label_set: str | None = None) -> tuple[str, ...]:
        mc = self.config.modality(m)
        if label_set is not None and label_set != mc.label_set:
            raise UnknownLabelSetError(mc.modality, label_set, mc.label_set or "(none)")
        return mc.labels

    # ---- requests -> rows -> predictions (the shared pipeline) --------------------------------------
    def prepare(self, m: str, inputs: dict[str, Any], prompt: str | None = None) -> Row:
        """Validate, preprocess and tokenize one request (raises InputError on bad input)."""
        name = self.modalities[self.adapter_index(m)]
        return prepare_row(spec(name), self.config.modality(name), self.tokenizer, inputs, prompt,
                           self.config.max_prompt_tokens)

    def postprocess(self, row: Row, y: torch.Tensor) -> Prediction:
        """A head output of `forward` -> label and scores, or values in real units."""
        return to_prediction(spec(row.modality), self.config.modality(row.modality), y.float().cpu().numpy(),
                             row.context)

    # ---- forward --------------------------------------------------------------------------------
    def tensors(self, rows: Sequence[Row]) -> dict[str, torch.Tensor]:
        """Rows of one modality as one batch of tensors on the model's device, floats in its dtype."""
        dev, dt = self.llm.device, self.llm.dtype
        return {k: torch.from_numpy(v).to(dev, dt if v.dtype.kind == "f" else None) for k, v in stack(rows).items()}

    def media_tokens(self, m: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        p = self.pack(m)
        return p.bridge(p.encoder(**tensors))  # (B, num_latents, H)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llm.get_input_embeddings()(ids)

    def build_batch(self, rows: Sequence[Row]) -> Batch:
        """Encoders and bridges run batched per modality; then [bridge ; prompt] per row."""
        device = self.llm.device
        bridged: dict[int, torch.Tensor] = {}
        for m in dict.fromkeys(r.modality for r in rows):
            if not spec(m).has_encoder:
                continue
            idx = [i for i, r in enumerate(rows) if r.modality == m]
            for i, t in zip(idx, self.media_tokens(m, self.tensors([rows[i] for i in idx]))):
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

    @torch.no_grad()
    def generate(self, rows: Sequence[Row], max_new_tokens: int = 64, stop_at_eos: bool = True,
                 config: GenerationConfig | None = None) -> list[list[int]]:
        """New token ids per row, through the shared decode loop with transformers' KV cache.
        `stop_at_eos=False` gives exactly `max_new_tokens` per row; `config` sets the strategy."""
        from transformers import DynamicCache

        cfg = config or GenerationConfig(max_new_tokens=max_new_tokens, ignore_eos=not stop_at_eos)
        K = beam_width(cfg)
        sel = torch.arange(len(rows)).repeat_interleave(K)  # rows x beams
        b = self.build_batch(rows)
        b = Batch(b.inputs_embeds[sel], b.attention_mask[sel], b.position_ids[sel], b.adapter_ids[sel])
        cache = DynamicCache()
        h = self.decode(b, cache, use_cache=True).last_hidden_state[:, -1]
        state = {"mask": b.attention_mask, "pos": b.position_ids[:, -1:]}

        def step(tokens: np.ndarray, reorder: np.ndarray | None) -> np.ndarray:
            if reorder is not None:  # beam search: follow each beam's parent
                cache.reorder_cache(torch.from_numpy(reorder).to(h.device))
            state["mask"] = torch.cat([state["mask"], state["mask"].new_ones(len(tokens), 1)], dim=1)
            state["pos"] = state["pos"] + 1
            ids = torch.from_numpy(tokens).to(h.device)
            out = self.decode(Batch(self.embed(ids)[:, None], state["mask"], state["pos"], b.adapter_ids),
                              cache, use_cache=True).last_hidden_state[:, -1]
            return self.llm.lm_head(out).float().cpu().numpy()

        eos = self.tokenizer.eos_token_id if self.tokenizer is not None and not cfg.ignore_eos else None
        first = self.llm.lm_head(h).float().cpu().numpy()
        return generate(first, step, cfg, eos, prompts=[rows[i].prompt_ids for i in sel.tolist()])
