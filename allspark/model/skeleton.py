"""A model without its weights, and its weights read from the checkpoint one tensor at a time.

    load_skeleton(ckpt, modalities)   AllSpark with every parameter on the meta device (buffers real:
                                      the rotary frequencies, normalisation constants), and the
                                      `CheckpointTensors` that reads any parameter by its name
    CheckpointTensors.read(name)      one parameter of the model (`llm.*`, `packs.<m>.*`,
                                      `adapters.<k>.*` stacked from every pack's set), as stored
    materialized(module, tensors)     within: `module`'s parameters hold their real values, then meta again

What it is for: a paper-size AllSpark is ~14 B parameters (28 GB in fp16), and a quantized export or a
bounded-memory `new` must never hold it. The streamed export traces each component on fake
parameters (shapes only) and writes its weights from here a tensor at a time
(`allspark.export.streamed`); only a component's parity check materializes real weights, and only of
what it checks (a pack's component, or a reduced-depth twin of the decoder).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from .adapters import LYNX_ADAPTER_KEYS
from .config import AllSparkConfig
from .model import AllSpark
from .weights import TensorFile, WeightDir


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Within: every parameter a module registers goes to the meta device as it is registered (its
    initial value is allocated for a moment, one tensor at a time); buffers stay real, so values
    computed in constructors (rotary frequencies, normalisation constants) are right."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


class CheckpointTensors:
    """Reads any parameter of the model built from a checkpoint by its name in `AllSpark`."""

    def __init__(self, ckpt: str | Path, modalities: Sequence[str]):
        self.ckpt = Path(ckpt)
        self.modalities = tuple(modalities)
        self._llm: dict[str, TensorFile] | None = None
        self._packs: dict[str, TensorFile] = {}

    def _pack(self, m: str) -> TensorFile:
        if m not in self._packs:
            self._packs[m] = TensorFile(self.ckpt / "packs" / f"{m}.safetensors")
        return self._packs[m]

    def read(self, name: str) -> torch.Tensor:
        head, _, rest = name.partition(".")
        if head == "llm":
            if self._llm is None:
                self._llm = WeightDir(self.ckpt / "llm").index()
            if rest not in self._llm:
                raise CheckpointError(f"{self.ckpt}/llm: no tensor {rest!r}")
            return self._llm[rest].read(rest)
        if head == "packs":
            m, _, key = rest.partition(".")
            return self._pack(m).read(key)
        if head == "adapters":  # one StackedAdapter parameter: set i is modality i's pack
            k, _, ours = rest.partition(".")
            lynx = LYNX_ADAPTER_KEYS.get(ours)
            if lynx is None:
                raise CheckpointError(f"{name}: not an adapter parameter ({sorted(LYNX_ADAPTER_KEYS)})")
            sets = [self._pack(m).read(f"adapters.{k}.{lynx}") for m in self.modalities]
            return torch.stack([s.reshape(()) if ours == "scaling" else s for s in sets])
        raise CheckpointError(f"{name}: no checkpoint tensor backs this parameter")


def load_skeleton(ckpt: str | Path, modalities: Sequence[str] | None = None,
                  dtype: torch.dtype | None = None, verify: bool = True) -> tuple[AllSpark, CheckpointTensors]:
    """The model of checkpoint `ckpt` with every parameter on the meta device (shapes in the stored
    dtype, or `dtype`) and its persistent buffers loaded (a few KB), plus the reader of its weights.
    Files are checked against the manifest's sha256 as `load_checkpoint` does (unless not `verify`)."""
    from .checkpoint import default_dtype, read_manifest, stored_dtype, verify_files
    from .tokenizer import load_tokenizer

    ckpt = Path(ckpt)
    manifest = read_manifest(ckpt)
    config = AllSparkConfig.from_dict(manifest["config"])
    wanted = verify_files(ckpt, manifest, modalities, verify)
    tok = load_tokenizer(ckpt / "tokenizer") if (ckpt / "tokenizer").is_dir() else None
    with default_dtype(dtype or stored_dtype(manifest)), params_on_meta():
        model = AllSpark(config, wanted, tokenizer=tok)
    tensors = CheckpointTensors(ckpt, model.modalities)
    for m in model.modalities:  # persistent buffers (normalisation statistics) are pack tensors
        state = set(model.packs[m].state_dict())
        for name, buf in model.packs[m].named_buffers():
            if name in state:
                buf.copy_(tensors.read(f"packs.{m}.{name}").to(buf.dtype))
    return model, tensors


def parameter_names(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> its name in `model` (what `CheckpointTensors.read` takes)."""
    return {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}


def _set(module: nn.Module, name: str, value: torch.Tensor) -> None:
    prefix, _, leaf = name.rpartition(".")
    owner = module.get_submodule(prefix) if prefix else module
    # the original meta parameter goes back as itself: its id is how the model names it
    owner._parameters[leaf] = value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False)


@contextlib.contextmanager
def materialized(module: nn.Module, model: AllSpark, tensors: CheckpointTensors,
                 dtype: torch.dtype | None = None, only: set[str] | None = None) -> Iterator[nn.Module]:
    """Within: `module`'s (a part of `model`) meta parameters hold their checkpoint values, in
    `dtype` (default: the model's) -- or only those named in `only` (model names: what a traced graph
    uses; the rest stays meta and must not be touched); afterwards they are meta again."""
    names = parameter_names(model)
    meta = [(n, p) for n, p in module.named_parameters(remove_duplicate=False)
            if p.is_meta and (only is None or names[id(p)] in only)]
    real: dict[int, torch.Tensor] = {}  # a shared parameter is read once
    try:
        for n, p in meta:
            if id(p) not in real:
                t = tensors.read(names[id(p)])
                if tuple(t.shape) != tuple(p.shape):
                    raise CheckpointError(f"{names[id(p)]}: expected shape {tuple(p.shape)}, got {tuple(t.shape)}")
                real[id(p)] = t.to(dtype or p.dtype)
            _set(module, n, real[id(p)])
        yield module
    finally:
        for n, p in meta:
            _set(module, n, p)


@contextlib.contextmanager
def fake_parameters(module: nn.Module, dtype: torch.dtype | None = None) -> Iterator[object]:
    """Within: `module`'s meta parameters are fake tensors (shapes and dtypes, no data; in `dtype`
    if given) so it can be traced or run for shapes; yields the FakeTensorMode to run it under
    (real inputs are allowed). Afterwards they are the meta parameters again."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    meta = [(n, p) for n, p in module.named_parameters(remove_duplicate=False) if p.is_meta]
    fakes: dict[int, torch.Tensor] = {}
    try:
        for n, p in meta:
            if id(p) not in fakes:
                with mode:
                    fakes[id(p)] = torch.empty(p.shape, dtype=dtype or p.dtype, device="cpu")
            _set(module, n, fakes[id(p)])
        yield mode
    finally:
        for n, p in meta:
            _set(module, n, p)
