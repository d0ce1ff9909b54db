"""Lynx's bottleneck adapters, one set per modality, stacked so a batch can mix modalities.

One adapter: ``out = h + scaling * up(silu(down(LayerNorm(h))))`` after the MLP residual of every
`adapter_freq`-th decoder layer. All modalities' adapters for one layer live in one
`StackedAdapter` with a leading "set" axis; each batch row picks its set with ``adapter_ids`` (a
Gather), which is what lets the exported decoder serve every modality from one graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AllSparkError, CheckpointError

# Lynx's state-dict names of one adapter, in our stacked parameter order.
LYNX_ADAPTER_KEYS = {
    "norm_weight": "adapter_norm_before.weight", "norm_bias": "adapter_norm_before.bias",
    "down_weight": "adapter_down.weight", "down_bias": "adapter_down.bias",
    "up_weight": "adapter_up.weight", "up_bias": "adapter_up.bias", "scaling": "scaling",
}


class StackedAdapter(nn.Module):
    def __init__(self, num_sets: int, hidden: int, bottleneck: int):
        super().__init__()
        A, H, r = num_sets, hidden, bottleneck
        self.norm_weight = nn.Parameter(torch.ones(A, H))
        self.norm_bias = nn.Parameter(torch.zeros(A, H))
        self.down_weight = nn.Parameter(torch.randn(A, r, H) * H ** -0.5)
        self.down_bias = nn.Parameter(torch.zeros(A, r))
        # Zero `up` makes a fresh adapter the identity, as in Lynx.
        self.up_weight = nn.Parameter(torch.zeros(A, H, r))
        self.up_bias = nn.Parameter(torch.zeros(A, H))
        self.scaling = nn.Parameter(torch.ones(A))
        self.eps = 1e-5

    def forward(self, h: torch.Tensor, adapter_ids: torch.Tensor) -> torch.Tensor:
        ids = adapter_ids  # (B,) int64, one adapter set per row
        x = F.layer_norm(h, h.shape[-1:], eps=self.eps)  # (B, T, H), affine per row below
        x = x * self.norm_weight[ids][:, None] + self.norm_bias[ids][:, None]
        d = torch.einsum("bth,brh->btr", x, self.down_weight[ids]) + self.down_bias[ids][:, None]
        u = torch.einsum("btr,bhr->bth", F.silu(d), self.up_weight[ids]) + self.up_bias[ids][:, None]
        return h + self.scaling[ids][:, None, None] * u

    def lynx_state(self, index: int) -> dict[str, torch.Tensor]:
        """Set `index` under Lynx's names (`adapter_down.weight`, ...)."""
        return {lynx: getattr(self, ours)[index] for ours, lynx in LYNX_ADAPTER_KEYS.items()}

    @torch.no_grad()
    def load_lynx_state(self, index: int, state: dict[str, torch.Tensor]) -> None:
        for ours, lynx in LYNX_ADAPTER_KEYS.items():
            param = getattr(self, ours)[index]
            t = state[lynx].reshape(param.shape) if lynx == "scaling" else state[lynx]
            if t.shape != param.shape:
                raise CheckpointError(f"{lynx}: expected shape {tuple(param.shape)}, got {tuple(t.shape)}")
            param.copy_(t)


class MissingAdapterIds(AllSparkError, ValueError):
    pass


def attach_adapters(decoder_layers: nn.ModuleList, adapters: nn.ModuleList, layer_ids: tuple[int, ...]) -> list:
    """Apply adapters[k] to the output of decoder layer layer_ids[k] via forward hooks.

    transformers passes extra forward kwargs down to every decoder layer, so ``adapter_ids`` given to
    ``LlamaForCausalLM.forward`` reaches the hook and the LLaMA key layout stays untouched.
    """
    handles = []
    for k, i in enumerate(layer_ids):
        adapter = adapters[k]

        def hook(module, args, kwargs, output, adapter=adapter):
            ids = kwargs.get("adapter_ids")
            if ids is None:
                raise MissingAdapterIds("the LLM was called without adapter_ids (one int64 per row)")
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = adapter(hidden, ids)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        handles.append(decoder_layers[i].register_forward_hook(hook, with_kwargs=True))
    return handles
