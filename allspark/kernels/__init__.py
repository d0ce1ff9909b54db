"""allspark.kernels: fused attention for the bridge, EVA and the decoder prefill.

`attention` validates its inputs and runs the OpenAI Triton kernel on CUDA tensors (see
`flash_attention`), torch SDPA with the same masking rules elsewhere. Triton itself is imported only
when the kernel runs, so this package imports without the `kernels` extra.
"""

from .op import AttentionInputError, attention

__all__ = ["attention", "AttentionInputError"]
