"""allspark.kernels: fused attention for the bridge, EVA and the decoder prefill.

`attention` validates its inputs and, on CUDA tensors, runs the OpenAI Triton kernel (see
`flash_attention`) or torch SDPA, whichever the measured table in `dispatch` says is faster at the
shape; torch SDPA with the same masking rules elsewhere. Triton itself is imported only
when the kernel runs, so this package imports without the `kernels` extra.
"""

from .op import AttentionInputError, attention

__all__ = ["attention", "AttentionInputError"]
