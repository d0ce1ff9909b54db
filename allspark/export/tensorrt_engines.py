"""TensorRT engines from a build's ONNX graphs: `allspark export --trt` (right after the export) or
`allspark trt-engines BUILD` (a build exported elsewhere, e.g. where the GPU machine's torch cannot
export).

One engine per component, built with the `tensorrt` Python API: the component's ONNX graph parsed
(external data included), optimization profiles from the manifest's dimension ranges
(`allspark.export.trt_profiles`, `--profile DIM=MIN:OPT:MAX` overrides; the decoder gets a prefill
and a decode profile), fp16/bf16/fp32, a workspace limit, and a timing cache shared by all
components and kept in the build (`trt_timing.cache`) so a rebuild skips the kernel timing it did.
Engines are written under a temporary name and renamed once all are built; then the manifest
records each as the component's `tensorrt` artifact (file, sha256, precision, profiles, TensorRT
version, device), written atomically.

TensorRT is imported lazily and only here and in the `tensorrt` backend: it cannot be installed on
the CPU machines (its PyPI packages fetch from NVIDIA), and without it this fails with a clear
message. Engines are specific to a GPU model, driver and TensorRT version: build them where they run.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..contract.manifest import artifact, read_manifest, validate_manifest
from ..contract.tensors import DECODER_COMPONENT, ONNX, TENSORRT
from ..errors import AllSparkError, ConfigError
from ..fsutil import sha256_file
from .trt_profiles import Profile, parse_overrides, profiles

PRECISIONS = ("fp32", "fp16", "bf16")
TIMING_CACHE = "trt_timing.cache"


class TensorRTUnavailable(AllSparkError, ImportError):
    pass


class EngineBuildError(AllSparkError, RuntimeError):
    pass


def import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError as e:
        raise TensorRTUnavailable(
            f"TensorRT is not installed ({e}). It runs on NVIDIA GPUs only: on a CUDA machine, `pip install "
            "tensorrt-cu13` (or NVIDIA's container). The CPU machines cannot install it; use the onnxruntime "
            "backend there.") from None
    return tensorrt


@dataclass(frozen=True)
class EngineOptions:
    precision: str = "fp16"
    workspace_bytes: int = 8 << 30
    profile_overrides: tuple[str, ...] = ()  # "DIM=MIN:OPT:MAX"
    components: tuple[str, ...] = ()  # (): every component
    timing_cache: str | None = None  # None: <build>/trt_timing.cache

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--trt-precision: expected one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.workspace_bytes < 1 << 20:
            raise ConfigError(f"--trt-workspace: expected >= 1 MiB, got {self.workspace_bytes}")


def plan(build: Path, manifest: dict, options: EngineOptions) -> dict[str, list[Profile]]:
    """What would be built: component -> its profiles. Checks everything that needs no TensorRT."""
    overrides = parse_overrides(options.profile_overrides)
    names = list(options.components or manifest["components"])
    unknown = sorted(set(names) - set(manifest["components"]))
    if unknown:
        raise ConfigError(f"--components: unknown {unknown}; the build has {sorted(manifest['components'])}")
    dec = manifest["components"].get(DECODER_COMPONENT, {})
    if DECODER_COMPONENT in names and dec.get("adapters", {}).get("impl") == "moe":
        raise ConfigError("the decoder groups its adapters with com.microsoft.MoE, an ONNX Runtime contrib op "
                          "TensorRT's ONNX parser lacks: export with --adapter-impl gather for TensorRT")
    if manifest.get("precision") in ("int8", "int4"):
        raise ConfigError(f"an {manifest['precision']} build holds ONNX Runtime's MatMulNBits/QMoE ops; build engines "
                          "from an fp32 or fp16 export (TensorRT sets its own precision: --trt-precision)")
    for name in names:
        artifact(manifest["components"][name], ONNX.name, name)
    return {name: profiles(manifest, name, overrides) for name in names}


def build_engines(build: str | Path, options: EngineOptions = EngineOptions(), progress: bool = True) -> dict:
    """Build the engines into `build` and record them in its manifest; returns the manifest."""
    build = Path(build)
    manifest = read_manifest(build)
    todo = plan(build, manifest, options)
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    cache_path = Path(options.timing_cache) if options.timing_cache else build / TIMING_CACHE
    timing = cache_path.read_bytes() if cache_path.is_file() else b""
    device = _device_name()
    stage = Path(tempfile.mkdtemp(prefix=".trt.tmp-", dir=build))
    built: dict[str, dict] = {}
    try:
        for name, profs in tqdm(todo.items(), desc="tensorrt", unit="engine", disable=not progress):
            t0 = time.perf_counter()
            src = build / artifact(manifest["components"][name], ONNX.name, name)["file"]
            engine, timing = _build_one(trt, builder, logger, name, src, profs, options, timing)
            out = stage / f"{name}{TENSORRT.suffix}"
            out.write_bytes(engine)
            built[name] = {"file": out.name, "bytes": out.stat().st_size, "sha256": {out.name: sha256_file(out)},
                           "precision": options.precision, "workspace_bytes": options.workspace_bytes,
                           "profiles": [{"name": p.name, "shapes": {k: [list(s) for s in v] for k, v in p.shapes.items()}}
                                        for p in profs],
                           "tensorrt": trt.__version__, "device": device,
                           "build_seconds": round(time.perf_counter() - t0, 1)}
        for name, entry in built.items():
            manifest["components"][name]["artifacts"][TENSORRT.name] = entry
        validate_manifest(manifest, build)  # before anything in the build changes
        for entry in built.values():  # all built and recorded: now they replace what was there
            os.replace(stage / entry["file"], build / entry["file"])
        if timing:
            _atomic_write(cache_path, timing)
        _write_manifest_atomically(build, manifest)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return manifest


def _build_one(trt: Any, builder: Any, logger: Any, name: str, src: Path, profs: Sequence[Profile],
               options: EngineOptions, timing: bytes) -> tuple[bytes, bytes]:
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(src)):  # from the file: external data next to it is found
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"{name}: TensorRT cannot parse {src.name}: {errors or 'no detail'}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
    if options.precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif options.precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    cache = config.create_timing_cache(timing)
    config.set_timing_cache(cache, ignore_mismatch=False)
    inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    for p in profs:
        missing = set(p.shapes) - inputs
        if missing:
            raise EngineBuildError(f"{name}: profile {p.name} names inputs the graph lacks: {sorted(missing)}")
        prof = builder.create_optimization_profile()
        for tensor, (lo, opt, hi) in p.shapes.items():
            prof.set_shape(tensor, lo, opt, hi)
        config.add_optimization_profile(prof)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise EngineBuildError(f"{name}: TensorRT failed to build the engine (its log above says why)")
    return bytes(engine), bytes(cache.serialize())


def _device_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "unknown"
    except Exception:  # the engine is built anyway; the record just lacks the name
        return "unknown"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_manifest_atomically(build: Path, manifest: dict) -> None:
    validate_manifest(manifest, build)
    _atomic_write(build / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode())
