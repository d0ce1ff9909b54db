"""`allspark verify`: re-check a build without its checkpoint — every file's sha256, and each
graph's parity against the PyTorch outputs stored at export (`validation/<component>.npz`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..contract.manifest import artifact, component_files, read_manifest
from ..contract.tensors import ONNX, TensorSpec
from ..fsutil import sha256_file
from .validate import compare, load_cases


@dataclass(frozen=True)
class StoredSpec:
    """The part of an export spec that `compare` needs, rebuilt from the manifest."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    tolerance: dict[str, float]


def verify_build(build: str | Path, parity: bool = True) -> list[str]:
    """Problems, one line per component that fails; empty means the build is intact."""
    build = Path(build)
    m = read_manifest(build)
    problems = []
    for name, c in m["components"].items():
        bad = [f for f, h in component_files(c).items() if not (build / f).is_file() or sha256_file(build / f) != h]
        if bad:
            problems.append(f"{name}: {', '.join(bad)} altered or missing (sha256 mismatch)")
            continue
        if parity:
            spec = StoredSpec(name, tuple(TensorSpec.from_json(t) for t in c["inputs"]),
                              tuple(TensorSpec.from_json(t) for t in c["outputs"]),
                              {c["precision"]: c["parity"]["tolerance_abs"]})
            r = compare(spec, build / artifact(c, ONNX.name, name)["file"], load_cases(build / c["validation"]),
                        c["precision"])
            if not r["passed"]:
                worst = {o: r["outputs"][o]["max_abs"] for o in r["failed"]}
                problems.append(f"{name}: parity drifted beyond {r['tolerance_abs']:g}: {worst}")
    return problems
