"""The per-modality encoders of AllSpark (paper Sec. III), each mapping a batch to tokens.

Every encoder's ``forward`` takes the tensors its registry entry's preprocessing produces (fixed
shapes, batch first) and returns media tokens ``(B, n, width)`` for the bridge. Normalisation that
belongs to the model (CLIP mean/std, column statistics) is done here so it lands in the exported
graph; data-dependent reshaping (resize, resampling a point cloud) is preprocessing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import (
    GraphConfig,
    HSIConfig,
    PointCloudConfig,
    SARConfig,
    TableConfig,
    TrajectoryConfig,
    ViTConfig,
)
from .layers import Blocks


@dataclass(frozen=True)
class InputStatistics:
    """Buffers of an encoder that standardise one raw input; a trainer fits them from data."""

    input: str  # the forward argument they apply to
    mean: str  # buffer names
    std: str
    per_column: bool  # one statistic per last-axis column, or one for the whole tensor


class ViTEncoder(nn.Module):
    """EVA-style ViT as in Lynx (RGB), or with a C-channel patch embedding (MSI). No final norm:
    Lynx's bridge reads the last block's tokens, class token included."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(cfg.channels, cfg.width, cfg.patch_size, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.width))
        self.blocks = Blocks.make(cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio)
        # Config-derived constants, not weights: non-persistent keeps Lynx's key layout exact.
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, -1, 1, 1), persistent=False)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = (image - self.mean) / self.std  # (B, C, S, S), values in [0, 1] for RGB
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B, P, W)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.blocks(x)  # (B, P + 1, W)


class TableEncoder(nn.Module):
    """TabFormer-style: one embedding table per discrete column, a learned 1->W map per continuous
    column (standardised with stored statistics), a column embedding, then a transformer."""

    input_statistics = InputStatistics("continuous", "cont_mean", "cont_std", per_column=True)

    def __init__(self, cfg: TableConfig):
        super().__init__()
        n_cols = len(cfg.cardinalities) + cfg.num_continuous
        self.discrete = nn.ModuleList(nn.Embedding(c, cfg.width) for c in cfg.cardinalities)
        self.cont_weight = nn.Parameter(torch.randn(cfg.num_continuous, cfg.width) * 0.02)
        self.cont_bias = nn.Parameter(torch.zeros(cfg.num_continuous, cfg.width))
        self.column_embed = nn.Parameter(torch.randn(n_cols, cfg.width) * 0.02)
        self.register_buffer("cont_mean", torch.zeros(cfg.num_continuous))
        self.register_buffer("cont_std", torch.ones(cfg.num_continuous))
        self.blocks = Blocks.make(cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio)

    def forward(self, discrete: torch.Tensor, continuous: torch.Tensor) -> torch.Tensor:
        # discrete (B, n_disc) int64, continuous (B, n_cont) float
        d = torch.stack([emb(discrete[:, i]) for i, emb in enumerate(self.discrete)], dim=1)
        z = (continuous - self.cont_mean) / self.cont_std
        c = z.unsqueeze(-1) * self.cont_weight + self.cont_bias  # (B, n_cont, W)
        return self.blocks(torch.cat([d, c], dim=1) + self.column_embed)  # (B, n_cols, W)


class HSIEncoder(nn.Module):
    """One pixel's spectrum: each band value -> W by a shared linear map, plus a band embedding."""

    input_statistics = InputStatistics("spectrum", "band_mean", "band_std", per_column=True)

    def __init__(self, cfg: HSIConfig):
        super().__init__()
        self.value_proj = nn.Linear(1, cfg.width)
        self.band_embed = nn.Parameter(torch.randn(cfg.bands, cfg.width) * 0.02)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.register_buffer("band_mean", torch.zeros(cfg.bands))
        self.register_buffer("band_std", torch.ones(cfg.bands))
        self.blocks = Blocks.make(cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio)

    def forward(self, spectrum: torch.Tensor) -> torch.Tensor:
        z = (spectrum - self.band_mean) / self.band_std  # (B, C)
        x = self.value_proj(z.unsqueeze(-1)) + self.band_embed  # (B, C, W)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.blocks(x)  # (B, C + 1, W)


class SAREncoder(nn.Module):
    """Three strided convolutions over log-amplitude; each output pixel is a token."""

    def __init__(self, cfg: SARConfig):
        super().__init__()
        c1, c2 = cfg.conv_channels
        self.conv1 = nn.Conv2d(cfg.channels, c1, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(c2, cfg.width, 3, stride=2, padding=1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = torch.log1p(image.abs())  # speckle is multiplicative: log makes it additive
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x))
        x = self.conv3(x)  # (B, W, S/8, S/8)
        return x.flatten(2).transpose(1, 2)


class TrajectoryEncoder(nn.Module):
    """TUTR-style: linear expansion of each observed (x, y), time embedding, 2-layer transformer.
    Inputs are centred on the last observed point by preprocessing."""

    def __init__(self, cfg: TrajectoryConfig):
        super().__init__()
        self.in_proj = nn.Linear(2, cfg.width)
        self.time_embed = nn.Parameter(torch.randn(cfg.obs_len, cfg.width) * 0.02)
        self.blocks = Blocks.make(cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio)

    def forward(self, observed: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.in_proj(observed) + self.time_embed)  # (B, obs_len, W)


class GraphEncoder(nn.Module):
    """STAEformer-style input embedding, nodes as tokens: [linear(history) ; node ; time-of-day ;
    day-of-week] concatenated to W, then a transformer over the nodes."""

    input_statistics = InputStatistics("series", "series_mean", "series_std", per_column=False)

    def __init__(self, cfg: GraphConfig):
        super().__init__()
        part = cfg.width // 4
        self.input_proj = nn.Linear(cfg.in_steps * cfg.features, part)
        self.node_embed = nn.Parameter(torch.randn(cfg.num_nodes, part) * 0.02)
        self.tod_embed = nn.Embedding(cfg.steps_per_day, part)
        self.dow_embed = nn.Embedding(7, part)
        self.register_buffer("series_mean", torch.zeros(()))
        self.register_buffer("series_std", torch.ones(()))
        self.blocks = Blocks.make(cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio)

    def forward(self, series: torch.Tensor, time_of_day: torch.Tensor,
                day_of_week: torch.Tensor) -> torch.Tensor:
        B, N = series.shape[:2]  # series (B, N, T, C); time_of_day, day_of_week (B,) int64
        h = self.input_proj(((series - self.series_mean) / self.series_std).flatten(2))
        parts = [h, self.node_embed.expand(B, -1, -1),
                 self.tod_embed(time_of_day)[:, None].expand(-1, N, -1),
                 self.dow_embed(day_of_week)[:, None].expand(-1, N, -1)]
        return self.blocks(torch.cat(parts, dim=-1))  # (B, N, W)


def farthest_point_sample(xyz: torch.Tensor, n: int) -> torch.Tensor:
    """Indices (B, n) of farthest point sampling, starting at point 0 (deterministic)."""
    B = xyz.shape[0]
    dist = torch.full(xyz.shape[:2], float("inf"), dtype=xyz.dtype, device=xyz.device)
    farthest = torch.zeros(B, dtype=torch.long, device=xyz.device)
    picked = []
    for _ in range(n):  # unrolled at export: n = num_groups is small
        picked.append(farthest)
        centre = torch.gather(xyz, 1, farthest.view(B, 1, 1).expand(B, 1, 3))  # (B, 1, 3)
        dist = torch.minimum(dist, ((xyz - centre) ** 2).sum(-1))
        farthest = dist.argmax(-1)
    return torch.stack(picked, dim=1)


class PointCloudEncoder(nn.Module):
    """PointBERT-style: FPS centres, k nearest neighbours per centre, a mini-PointNet (Conv1d) per
    group, a centre position embedding, then a transformer over the groups."""

    def __init__(self, cfg: PointCloudConfig):
        super().__init__()
        self.cfg = cfg
        c_in = 3 + cfg.extra_features
        self.first_conv = nn.Sequential(nn.Conv1d(c_in, 64, 1), nn.GELU(), nn.Conv1d(64, 128, 1))
        self.second_conv = nn.Sequential(nn.Conv1d(256, 256, 1), nn.GELU(), nn.Conv1d(256, cfg.width, 1))
        self.pos_embed = nn.Sequential(nn.Linear(3, 64), nn.GELU(), nn.Linear(64, cfg.width))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.blocks = Blocks.make(cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        B, P, F_ = points.shape  # (B, num_points, 3 + d), centred and scaled by preprocessing
        G, M = self.cfg.num_groups, self.cfg.group_size
        xyz = points[..., :3]
        centres_idx = farthest_point_sample(xyz, G)  # (B, G)
        centres = torch.gather(xyz, 1, centres_idx[..., None].expand(B, G, 3))  # (B, G, 3)
        d2 = ((centres[:, :, None, :] - xyz[:, None, :, :]) ** 2).sum(-1)  # (B, G, P)
        knn = d2.topk(M, dim=-1, largest=False).indices  # (B, G, M)
        groups = torch.gather(points[:, None].expand(B, G, P, F_), 2, knn[..., None].expand(B, G, M, F_))
        local = torch.cat([groups[..., :3] - centres[:, :, None], groups[..., 3:]], dim=-1)
        x = local.reshape(B * G, M, F_).transpose(1, 2)  # (BG, F, M)
        f = self.first_conv(x)  # (BG, 128, M)
        g = f.max(dim=-1, keepdim=True).values.expand(-1, -1, M)
        f = self.second_conv(torch.cat([g, f], dim=1)).max(dim=-1).values  # (BG, W)
        tokens = f.view(B, G, -1) + self.pos_embed(centres)
        return self.blocks(torch.cat([self.cls_token.expand(B, -1, -1), tokens], dim=1))  # (B, G+1, W)
