"""Weight files in and out, a tensor at a time: nothing here holds a whole model.

    load_state_dict_file(path)     safetensors, or a torch file loaded with weights_only=True
    WeightDir(path)                a transformers directory: config.json + one file or shards
                                   (`model-0000k-of-0000n.safetensors` + index, or pytorch_model*.bin)
    ShardWriter(dir, "model")      writes tensors into shards of at most `shard_bytes`, then names
                                   them as transformers does (one file: model.safetensors)

Torch pickles are never unpickled in full: `torch.load(weights_only=True)` only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..errors import CheckpointError

DEFAULT_SHARD_BYTES = 1 << 30  # 1 GiB: what a conversion holds in memory at a time, besides one tensor
TRAINING_PREFIXES = ("module.", "model.")  # DDP and Lynx's own save wrappers


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """safetensors, or a torch pickle loaded with weights_only=True (never a full unpickle);
    `{"model": state_dict}` is unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        if path.suffix == ".safetensors":
            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be read as safetensors or a weights-only torch file ({e})") from None
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor) or {{'model': state dict}}")
    return sd


def strip_prefixes(sd: dict[str, torch.Tensor], prefixes: tuple[str, ...] = TRAINING_PREFIXES
                   ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Keys without leading `module.` / `model.` wrappers, each removed as a whole prefix (Lynx's
    loader uses `str.lstrip("model.")`, which eats any of those characters). Returns the new dict
    and how many keys lost each prefix."""
    out: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for k, v in sd.items():
        name = k
        while (p := next((p for p in prefixes if name.startswith(p)), None)) is not None:
            name = name[len(p):]
            counts[p] = counts.get(p, 0) + 1
        if name in out:
            raise CheckpointError(f"{k!r} and another key both mean {name!r} once the {list(prefixes)} "
                                  "wrappers are removed")
        out[name] = v
    return out, counts


class WeightDir:
    """A transformers model directory, read one tensor at a time."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        cfg_path = self.path / "config.json"
        if not cfg_path.is_file():
            raise CheckpointError(f"{self.path}: not a transformers model directory (no config.json)")
        try:
            self.config: dict[str, Any] = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
        self.files = self._files()

    def _files(self) -> list[Path]:
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (self.path / index).is_file():
                try:
                    names = sorted(set(json.loads((self.path / index).read_text())["weight_map"].values()))
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise CheckpointError(f"{self.path / index}: malformed shard index ({e!r})") from None
                missing = [n for n in names if not (self.path / n).is_file()]
                if missing:
                    raise CheckpointError(f"{self.path}: shards named in {index} are missing: {missing}")
                return [self.path / n for n in names]
        files = sorted(self.path.glob("*.safetensors")) or sorted(self.path.glob("pytorch_model*.bin"))
        if not files:
            raise CheckpointError(f"{self.path}: no *.safetensors or pytorch_model*.bin weights")
        return files

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) of every weight, one at a time."""
        for lazy in self.lazy():
            yield lazy.name, lazy.read()

    def lazy(self) -> Iterator[LazyTensor]:
        """Every weight, described before it is read: a consumer can make room first. Safetensors are
        read without a memory map, so only the tensor in hand is resident."""
        for f in self.files:
            if f.suffix == ".safetensors":
                yield from read_safetensors(f)
            else:
                for name, t in load_state_dict_file(f).items():
                    yield LazyTensor(name, tuple(t.shape), t.dtype, lambda t=t: t)

    def index(self) -> dict[str, TensorFile]:
        """Name -> the safetensors file holding it, for reading tensors by name (one at a time)."""
        out: dict[str, TensorFile] = {}
        for f in self.files:
            if f.suffix != ".safetensors":
                raise CheckpointError(f"{f}: reading tensors one by one needs safetensors (convert the directory "
                                      "with `allspark convert`)")
            tf = TensorFile(f)
            out.update(dict.fromkeys(tf.entries, tf))
        return out

    def shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) without reading the data of safetensors files."""
        out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for f in self.files:
            if f.suffix == ".safetensors":
                with safe_open(str(f), framework="pt") as sf:
                    for name in sf.keys():
                        s = sf.get_slice(name)
                        out[name] = (tuple(s.get_shape()), _DTYPES[s.get_dtype()])
            else:
                out.update({k: (tuple(v.shape), v.dtype) for k, v in load_state_dict_file(f).items()})
        return out


class LazyTensor(NamedTuple):
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[], torch.Tensor]  # valid until the iterator that yielded it moves on

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def read_safetensors(path: Path) -> Iterator[LazyTensor]:
    """The tensors of a safetensors file in stored order; `read()` reads one with a single
    `readinto` into its own buffer. (`safe_open` maps the file, and every page it touches counts as
    resident memory until it is closed: a whole shard.)"""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                begin, end = info["data_offsets"]

                def read(begin=begin, end=end, info=info, name=name) -> torch.Tensor:
                    buf = bytearray(end - begin)
                    f.seek(8 + n + begin)
                    if f.readinto(buf) != len(buf):
                        raise CheckpointError(f"{path}: {name}: the file ends inside its data")
                    dtype = _DTYPES[info["dtype"]]
                    t = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
                    return t.reshape(info["shape"])

                yield LazyTensor(name, tuple(info["shape"]), _DTYPES[info["dtype"]], read)
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None


class TensorFile:
    """One safetensors file, read a tensor at a time by name (header parsed once; each `read` is one
    `readinto` into the tensor's own buffer, no memory map: only the tensor in hand is resident)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
        except (OSError, ValueError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
        header.pop("__metadata__", None)
        self._base = 8 + n
        try:
            self.entries = {k: (_DTYPES[v["dtype"]], tuple(v["shape"]), tuple(v["data_offsets"]))
                            for k, v in header.items()}
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{self.path}: malformed safetensors header ({type(e).__name__}: {e})") from None

    def read(self, name: str) -> torch.Tensor:
        if name not in self.entries:
            raise CheckpointError(f"{self.path}: no tensor {name!r}")
        dtype, shape, (begin, end) = self.entries[name]
        buf = bytearray(end - begin)
        with open(self.path, "rb") as f:
            f.seek(self._base + begin)
            if f.readinto(buf) != len(buf):
                raise CheckpointError(f"{self.path}: {name}: the file ends inside its data")
        t = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
        return t.reshape(shape)


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """A safetensors file written a tensor at a time from the tensors' own memory (`save_file`
    first copies every tensor into a bytes object: twice the shard in memory)."""
    header: dict[str, Any] = {}
    offset = 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header with spaces to 8-byte alignment
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for t in tensors.values():
            if t.numel():
                f.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_CODES = {v: k for k, v in _DTYPES.items()}


class ShardWriter:
    """Collects tensors and writes them in shards of at most `shard_bytes` (a tensor larger than
    that gets a shard of its own); `close()` names them `<stem>-0000k-of-0000n.safetensors` with
    a `<stem>.safetensors.index.json`, or `<stem>.safetensors` when one shard is enough."""

    def __init__(self, directory: Path, stem: str = "model", shard_bytes: int = DEFAULT_SHARD_BYTES,
                 metadata: dict[str, str] | None = None):
        self.directory, self.stem, self.shard_bytes = Path(directory), stem, shard_bytes
        self.metadata = metadata or {}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0
        self.largest_shard_bytes = 0
        self.dtypes: set[str] = set()  # of every tensor written, e.g. {"float16"}

    def add(self, name: str, tensor: torch.Tensor | Callable[[], torch.Tensor], size: int | None = None) -> None:
        """Queue a tensor, or a function that reads it given its `size` in bytes: the shard in
        progress is written out first if the tensor would not fit, so at most one shard plus one
        tensor are ever held."""
        if name in self._pending or any(name in keys for _, keys in self._written):
            raise CheckpointError(f"tensor {name!r} written twice")
        if size is None:
            tensor = tensor() if callable(tensor) else tensor
            size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.shard_bytes:
            self._flush()
        t = (tensor() if callable(tensor) else tensor).contiguous()
        self.dtypes.add(str(t.dtype).replace("torch.", ""))
        self._pending[name] = t
        self._pending_bytes += t.numel() * t.element_size()

    def _flush(self) -> None:
        if not self._pending:
            return
        path = self.directory / f".{self.stem}-part{len(self._written) + 1:05d}.safetensors"
        write_safetensors(path, self._pending, metadata={"format": "pt", **self.metadata})
        self._written.append((path, list(self._pending)))
        self.total_bytes += self._pending_bytes
        self.largest_shard_bytes = max(self.largest_shard_bytes, self._pending_bytes)
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[Path]:
        self._flush()
        n = len(self._written)
        if n == 0:
            raise CheckpointError(f"{self.directory}: no tensors to write for {self.stem}")
        if n == 1:
            final = self.directory / f"{self.stem}.safetensors"
            self._written[0][0].rename(final)
            return [final]
        files, weight_map = [], {}
        for k, (path, keys) in enumerate(self._written, 1):
            final = self.directory / f"{self.stem}-{k:05d}-of-{n:05d}.safetensors"
            path.rename(final)
            files.append(final)
            weight_map.update({key: final.name for key in keys})
        index = self.directory / f"{self.stem}.safetensors.index.json"
        index.write_text(json.dumps({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map},
                                    indent=2) + "\n")
        return [*files, index]
