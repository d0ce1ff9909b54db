"""allspark.kernels: fused attention kernels (OpenAI Triton)."""
