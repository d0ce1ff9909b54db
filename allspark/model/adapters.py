"""Lynx's bottleneck adapters, one set per modality, stacked so a batch can mix modalities.

One adapter: ``out = h + scaling * up(silu(down(LayerNorm(h))))`` after the MLP residual of every
`adapter_freq`-th decoder layer. All modalities' adapters for one layer live in one
`StackedAdapter` with a leading "set" axis; each batch row picks its set with ``adapter_ids``,
which is what lets the exported decoder serve every modality from one graph.

How the rows meet their sets — the cost must follow the distinct sets in a batch, not its rows:

    grouped (PyTorch)   rows sorted by set; one matmul pair per segment on that set's weights (a
                        view, never copied); on CUDA the OpenAI Triton segmented kernel (`sgmv`)
    moe (ONNX)          ONNX Runtime's com.microsoft.MoE with one-hot routing: a grouped GEMM
    gather (both)       each row gathers its set's weights (B copies of 2 x H x r): the old way,
                        kept for comparison (`allspark export --adapter-impl gather`)

The LayerNorm affine and `scaling` are per-row gathers of (A, H) vectors: cheap in every form.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading

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


EXPORT_IMPLS = ("moe", "gather")  # how an exported decoder computes its adapters
EAGER_IMPLS = ("grouped", "gather")  # how PyTorch does
FIXED_GRID_TOKENS = 256  # SGMV on CUDA: up to this many tokens, the host-free fixed grid (decode steps)
_GRAPH_WORK = threading.local()  # set by `for_cuda_graphs` in the thread that warms up and captures


@contextlib.contextmanager
def for_cuda_graphs():
    """Within (this thread): adapters take the path a CUDA graph can capture at any size, so a
    graph's eager warm-up compiles the very kernels its capture launches."""
    before = getattr(_GRAPH_WORK, "on", False)
    _GRAPH_WORK.on = True
    try:
        yield
    finally:
        _GRAPH_WORK.on = before
# Read only under ONNX export (a ContextVar read would break torch.compile graphs).
_EXPORT_IMPL = contextvars.ContextVar("allspark_adapter_impl", default="moe")


@contextlib.contextmanager
def exported_adapters(impl: str):
    """Within: exported decoders compute their adapters as `impl` (see the module docstring)."""
    if impl not in EXPORT_IMPLS:
        raise AllSparkError(f"adapter implementation: expected one of {list(EXPORT_IMPLS)}, got {impl!r}")
    token = _EXPORT_IMPL.set(impl)
    try:
        yield
    finally:
        _EXPORT_IMPL.reset(token)


class StackedAdapter(nn.Module):
    impl = "grouped"  # the eager implementation; benchmarks set "gather" on an instance to compare

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
        if torch.onnx.is_in_onnx_export():
            u = self._moe(x, ids) if _EXPORT_IMPL.get() == "moe" else self._gather(x, ids)
        elif self.impl == "gather":
            u = self._gather(x, ids)
        else:
            u = self._grouped(x, ids)
        return h + self.scaling[ids][:, None, None] * u

    def _gather(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Every row gathers its set's weights: B x (r x H + H x r) copied."""
        d = torch.einsum("bth,brh->btr", x, self.down_weight[ids]) + self.down_bias[ids][:, None]
        return torch.einsum("btr,bhr->bth", F.silu(d), self.up_weight[ids]) + self.up_bias[ids][:, None]

    def _grouped(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Rows sorted by set, one segment per distinct set, each set's weights read once."""
        B, T, H = x.shape
        if x.is_cuda and torch.compiler.is_compiling():
            return self._gather(x, ids)  # a compiled graph: the kernel is no registered op
        if x.is_cuda and not torch.is_grad_enabled():
            from ..kernels.sgmv import segmented_adapter

            # A CUDA graph cannot size segments on the host: a fixed grid there and in its warm-up (each set
            # still read once), and for decode-sized batches (no host sync a step). Set indices are
            # checked except inside a capture.
            capturing = torch.cuda.is_current_stream_capturing()
            fixed = capturing or getattr(_GRAPH_WORK, "on", False) or B * T <= FIXED_GRID_TOKENS
            return segmented_adapter(x.reshape(B * T, H), ids[:, None].expand(B, T).reshape(-1), self.down_weight,
                                     self.down_bias, self.up_weight, self.up_bias, capturable=fixed,
                                     check_sets=not capturing).reshape(B, T, H)
        order = torch.argsort(ids, stable=True)  # rows grouped by set
        sets, counts = torch.unique_consecutive(ids[order], return_counts=True)
        parts = []
        for seg, a in zip(x.index_select(0, order).split(counts.tolist()), sets.tolist()):
            d = F.silu(F.linear(seg, self.down_weight[a], self.down_bias[a]))  # (n_a, T, r)
            parts.append(F.linear(d, self.up_weight[a], self.up_bias[a]))  # (n_a, T, H)
        return torch.cat(parts).index_select(0, torch.argsort(order))  # back to the rows' order

    def _moe(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """ONNX Runtime's com.microsoft.MoE, top-1 with one-hot routing: a grouped GEMM over the
        tokens of each set (fc1 = down (A, r, H), fc2 = up (A, H, r), SiLU between)."""
        B, T, H = x.shape
        A = self.down_weight.shape[0]
        route = F.one_hot(ids, A).to(x.dtype)[:, None, :].expand(B, T, A).reshape(B * T, A)
        flat = x.reshape(B * T, H)
        y = torch.onnx.ops.symbolic(
            "com.microsoft::MoE", (flat, route, self.down_weight, self.down_bias, self.up_weight, self.up_bias),
            {"activation_type": "silu", "k": 1, "normalize_routing_weights": 1},
            dtype=flat.dtype, shape=flat.shape, version=1)
        return y.reshape(B, T, H)

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
