"""Lynx's Perceiver resampler: the modal bridge from encoder tokens to LLM embeddings.

Parameter names are Lynx's (`latents`, `layers.j.0.{norm_media,norm_latents,to_q,to_kv,to_out}`,
`layers.j.1.{0,1,3}`, `norm`) so a Lynx `bridge.*` state dict loads unchanged. Queries are the
latents (width D = LLM hidden), keys/values the encoder tokens (width d); paper eq. (4).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import BridgeConfig
from .layers import attention


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, media_dim: int, heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.norm_media = nn.LayerNorm(media_dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(media_dim, 2 * inner, bias=False)  # k then v, stacked
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        B, n, _ = media.shape  # media (B, n, d); latents (B, N, D)
        N = latents.shape[1]
        media, latents = self.norm_media(media), self.norm_latents(latents)
        q = self.to_q(latents).view(B, N, self.heads, self.head_dim).transpose(1, 2)  # (B, h, N, hd)
        k, v = self.to_kv(media).view(B, n, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        o = attention(q, k, v)  # (B, h, N, hd)
        return self.to_out(o.transpose(1, 2).reshape(B, N, -1))


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


class PerceiverResampler(nn.Module):
    def __init__(self, cfg: BridgeConfig, dim: int, media_dim: int):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(cfg.num_latents, dim) * 0.02)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, media_dim, cfg.heads, cfg.head_dim),
                           feed_forward(dim, cfg.ff_mult)])
            for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, media: torch.Tensor) -> torch.Tensor:
        latents = self.latents.expand(media.shape[0], -1, -1)  # (B, N, D)
        for attn, ff in self.layers:
            latents = attn(media, latents) + latents
            latents = ff(latents) + latents
        return self.norm(latents)
