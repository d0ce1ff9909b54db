"""Task heads: they read the LLM's last hidden state at the last position (B, H).

Classification and per-pixel classification are one linear layer; regression is one linear layer
followed by an unscale with stored statistics (buffers, not parameters). Generation (language,
code) has no head module: it is the LLM's own lm_head.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import HeadKind


class ClassificationHead(nn.Module):
    def __init__(self, hidden: int, num_classes: int):
        super().__init__()
        self.proj = nn.Linear(hidden, num_classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h)  # (B, num_classes) logits


class RegressionHead(nn.Module):
    def __init__(self, hidden: int, out_dim: int):
        super().__init__()
        self.proj = nn.Linear(hidden, out_dim)
        self.register_buffer("target_mean", torch.zeros(out_dim))
        self.register_buffer("target_std", torch.ones(out_dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h) * self.target_std + self.target_mean  # (B, out_dim), real units

    @torch.no_grad()
    def set_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.target_mean.copy_(mean)
        self.target_std.copy_(std)


def make_head(kind: HeadKind, hidden: int, out_dim: int) -> nn.Module | None:
    """The head module of a head kind; None for generation (the LLM's lm_head answers)."""
    if kind.classifies:
        return ClassificationHead(hidden, out_dim)
    if kind.regresses:
        return RegressionHead(hidden, out_dim)
    return None
