"""Weight-only int4 / int8: block-wise quantization of MatMul weights for ONNX Runtime's
`com.microsoft.MatMulNBits`, and of the stacked adapter sets for `com.microsoft.QMoE`.

The contract is the one onnxruntime-genai's model builder emits for CPU and CUDA: a weight W of a
linear layer (N outputs x K inputs) is cut into blocks of `block_size` along K; each block keeps one
fp32 scale and its values as `bits`-bit integers around the default zero point 2^(bits-1)
(symmetric), packed low nibble first, as (N, k_blocks, block_size * bits / 8) uint8. The packing
is ONNX Runtime's own C++ routine (`quantize_matmul_{4,8}bits`), so the layout is exactly what its
kernels read. QMoE reads each expert's weight in the same layout, flattened over blocks.

Activations stay fp32 (the graph's inputs and outputs too); `accuracy_level` 4 lets the CPU kernels
quantize activations to int8 per block for integer dot products (the builder's CPU default), 0
keeps fp32 arithmetic on the dequantized weights.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..errors import ConfigError

QUANTIZED_PRECISIONS = {"int4": 4, "int8": 8}
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # unset, fp32, fp16, bf16, int8 (MatMulNBits' own numbering)
# a head's weight is quantized only from this many elements (1 MiB in fp32): below it the graph does
# not shrink measurably and the head's output, the answer itself, would carry the rounding
HEAD_MIN_ELEMENTS = 1 << 18


@dataclass(frozen=True)
class QuantConfig:
    bits: int = 4
    block_size: int = 32
    accuracy_level: int = 4
    adapters: bool = True  # adapter sets as QMoE (False: MoE with fp32 weights, for comparison)
    # components an int4 build keeps at 8 bits (`--int8-components`; default: the encoders whose
    # registry entry has `encoder_min_bits` 8): small ones whose int4 error moves the answer itself
    int8_components: tuple[str, ...] = ()

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ConfigError(f"quantization bits: expected 4 or 8, got {self.bits}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"--block-size: expected a power of two >= 16, got {self.block_size}")
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise ConfigError(f"--accuracy-level: expected one of {ACCURACY_LEVELS} (0 unset, 1 fp32, 2 fp16, "
                              f"3 bf16, 4 int8), got {self.accuracy_level}")

    @classmethod
    def for_precision(cls, precision: str, **options) -> "QuantConfig":
        return cls(bits=QUANTIZED_PRECISIONS[precision], **options)

    def for_component(self, name: str) -> "QuantConfig":
        """The options one component is written with: 8 bits where an int4 build keeps it at int8."""
        return replace(self, bits=8) if self.bits == 4 and name in self.int8_components else self

    def precision_of(self, name: str) -> str:
        bits = self.for_component(name).bits
        return next(p for p, b in QUANTIZED_PRECISIONS.items() if b == bits)

    def to_json(self) -> dict:
        return {"method": "weight-only, block-wise symmetric (MatMulNBits; adapter sets QMoE)", "bits": self.bits,
                "block_size": self.block_size, "accuracy_level": self.accuracy_level,
                "adapters": "QMoE" if self.adapters else "MoE fp32",
                **({"int8_components": list(self.int8_components)} if self.bits == 4 else {})}

    def k_blocks(self, k: int) -> int:
        return -(-k // self.block_size)

    def packed_bytes(self, n: int, k: int) -> int:
        """Bytes of one quantized (N, K) weight: packed values plus fp32 scales."""
        kb = self.k_blocks(k)
        return n * kb * (self.block_size * self.bits // 8) + n * kb * 4


def quantize_rows(w: np.ndarray, q: QuantConfig) -> tuple[np.ndarray, np.ndarray]:
    """A linear layer's weight (N, K) -> packed (N, k_blocks, blob) uint8 and scales (N, k_blocks) fp32."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    n, k = w.shape
    kb, blob = q.k_blocks(k), q.block_size * q.bits // 8
    # ONNX Runtime's routine takes the MatMul operand (K, N), zero-padded to whole blocks along K
    b = np.zeros((kb * q.block_size, n), dtype=np.float32)
    b[:k] = w.T
    packed = np.zeros((n, kb, blob), dtype=np.uint8)
    scales = np.zeros((n, kb), dtype=np.float32)
    zero_points = np.zeros((n, -(-kb * q.bits // 8)), dtype=np.uint8)  # unused when symmetric
    (quantize_matmul_4bits if q.bits == 4 else quantize_matmul_8bits)(
        packed, b, scales, zero_points, q.block_size, n, kb * q.block_size, True)
    return packed, scales


def quantize_experts(w: np.ndarray, q: QuantConfig) -> tuple[np.ndarray, np.ndarray]:
    """Stacked weights (E, N, K) -> QMoE's (E, N, K * bits / 8) uint8 and scales (E, N, K / block)."""
    parts = [quantize_rows(w[e], q) for e in range(w.shape[0])]
    return (np.stack([p.reshape(p.shape[0], -1) for p, _ in parts]), np.stack([s for _, s in parts]))


def dequantize_rows(packed: np.ndarray, scales: np.ndarray, k: int, q: QuantConfig) -> np.ndarray:
    """The inverse of `quantize_rows` (what the kernels compute with): (N, K) fp32. For tests."""
    n, kb, _ = packed.shape
    if q.bits == 4:
        vals = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(n, kb, q.block_size)
    else:
        vals = packed.reshape(n, kb, q.block_size)
    zero = 1 << (q.bits - 1)
    return ((vals.astype(np.float32) - zero) * scales[:, :, None]).reshape(n, kb * q.block_size)[:, :k]
