"""Graph skeletons for benchmarks on other machines: an exported graph without its weights, and the
weights made up again (seeded noise of the same shapes and dtypes) where it runs.

A benchmark's timing does not depend on weight values, but a 1.1B-parameter decoder is 4.4 GB and
an exporter may exist only on the machine that made it (the GPU machines' torch cannot export the
decoder; a transfer there carries 64 MiB). The skeleton keeps every node and every small constant
and drops only large floating-point and quantized (uint8/int8) initializers (weights), marked so
`fill` can recreate them: an int4 decoder (MatMulNBits) travels as its graph too.
Never use a filled graph for anything but timing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

MARK = "allspark:synthetic-weight"
MIN_ELEMENTS = 4096  # smaller tensors are shape constants, norms and biases: kept as they are
_FLOAT_TYPES = {1: np.float32, 10: np.float16}  # onnx.TensorProto.FLOAT, FLOAT16
# UINT8, INT8: quantized weights (MatMulNBits' packed int4 blocks, QMoE's, int8 matrices), refilled
# with random bytes (random int4/int8 values; their float scales are refilled as weights are)
_INT_TYPES = {2: np.uint8, 3: np.int8}


def strip(src: str | Path, dst: str | Path) -> dict:
    """`src`'s graph without its large float initializers, to `dst` (one self-contained file)."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_tensor

    model = onnx.load(str(src), load_external_data=False)
    dropped, kept_bytes = 0, 0
    for init in model.graph.initializer:
        n = int(np.prod(init.dims)) if init.dims else 1
        if (init.data_type in _FLOAT_TYPES or init.data_type in _INT_TYPES) and n >= MIN_ELEMENTS:
            init.ClearField("raw_data")
            init.ClearField("float_data")
            init.ClearField("int32_data")  # where onnx keeps fp16 values not stored raw
            del init.external_data[:]
            init.data_location = onnx.TensorProto.DEFAULT
            init.doc_string = MARK
            dropped += n
        else:
            if init.data_location == onnx.TensorProto.EXTERNAL:  # a small one kept: bring its bytes inline
                load_external_data_for_tensor(init, str(Path(src).parent))
                del init.external_data[:]
                init.data_location = onnx.TensorProto.DEFAULT
            kept_bytes += init.ByteSize()
    onnx.save(model, str(dst))
    return {"dropped_elements": dropped, "kept_bytes": kept_bytes, "bytes": Path(dst).stat().st_size}


def weight_bytes(path: str | Path) -> int:
    """Bytes of a graph's initializers as stored (a skeleton's dropped ones counted at their size):
    what one run of it reads in weights."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    model = onnx.load(str(path), load_external_data=False)
    return sum(int(np.prod(i.dims, dtype=np.int64)) * tensor_dtype_to_np_dtype(i.data_type).itemsize
               for i in model.graph.initializer)


def is_skeleton(path: str | Path) -> bool:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return any(i.doc_string == MARK and i.data_location != onnx.TensorProto.EXTERNAL for i in model.graph.initializer)


def fill(src: str | Path, dst: str | Path, seed: int = 0, scale: float = 0.02) -> Path:
    """A runnable graph at `dst` (weights in `dst`.data): every marked initializer becomes seeded
    noise of its shape and dtype."""
    import onnx

    dst = Path(dst)
    model = onnx.load(str(src), load_external_data=False)
    rng = np.random.default_rng(seed)
    data = dst.with_suffix(dst.suffix + ".data")
    offset = 0
    with open(data, "wb") as f:
        for init in model.graph.initializer:
            if init.doc_string != MARK:
                continue
            if init.data_type in _INT_TYPES:
                arr = rng.integers(0, 256, tuple(init.dims), dtype=np.uint8).view(_INT_TYPES[init.data_type])
            else:
                arr = (rng.standard_normal(tuple(init.dims), dtype=np.float32) * scale).astype(_FLOAT_TYPES[init.data_type])
            raw = arr.tobytes()
            f.write(raw)
            init.data_location = onnx.TensorProto.EXTERNAL
            del init.external_data[:]
            for k, v in (("location", data.name), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = init.external_data.add()
                entry.key, entry.value = k, v
            offset += len(raw)
            pad = (-offset) % 4096  # aligned, as onnx writes external data for mmap
            f.write(b"\0" * pad)
            offset += pad
    onnx.save(model, str(dst))
    return dst
