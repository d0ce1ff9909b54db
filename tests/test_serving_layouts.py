"""The serving layouts as objects (`allspark.serving.layouts`): the repositories they write are pinned
(files and configs, recorded before the layouts became classes), and a third layout is one class.

Regenerate the pinned listing (only when a change to the repository is intended):

    python tests/test_serving_layouts.py BUILD > tests/data/serving_layouts.json
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

import pytest

GOLDEN = Path(__file__).parent / "data" / "serving_layouts.json"

# (name, RepositoryOptions kwargs): both layouts on both targets, the defaults, and the switches that
# change what a layout writes (warmup files, batching, providers)
VARIANTS = {
    "cpu_default": dict(target="cpu"),
    "cpu_components": dict(target="cpu", layout="components"),
    "cpu_runtime_plain": dict(target="cpu", layout="runtime", warmup=False, providers=("cuda",),
                              batching=dict(enabled=False), entry_instances=3, max_new_tokens=7),
    "gpu_default": dict(target="gpu"),
    "gpu_trt": dict(target="gpu", layout="components", tensorrt=dict(enabled=True), instances=2, gpus=(0,)),
}

_HEX64 = re.compile(r"\b[0-9a-f]{64}\b")


def options_of(kwargs: dict):
    from allspark.serving.options import BatchingOptions, RepositoryOptions, TensorRTOptions

    kw = dict(kwargs)
    if "batching" in kw:
        kw["batching"] = BatchingOptions(**kw["batching"])
    if "tensorrt" in kw:
        kw["tensorrt"] = TensorRTOptions(**kw["tensorrt"])
    return RepositoryOptions(**kw)


def snapshot(repo: Path) -> dict:
    """What a written repository is, independent of when and from which export of the build: every
    file's path; configs, shims and warmup data by content (sha256 digests inside configs masked,
    the build's own files by name only); the marker's models and options."""
    files = {}
    for f in sorted(p for p in repo.rglob("*") if p.is_file()):
        rel = f.relative_to(repo).as_posix()
        if rel == "allspark_repository.json":
            continue
        if f.name == "config.pbtxt":
            files[rel] = hashlib.sha256(_HEX64.sub("<sha256>", f.read_text()).encode()).hexdigest()[:16]
        elif f.name == "model.py" or "/warmup/" in f"/{rel}":
            files[rel] = hashlib.sha256(f.read_bytes()).hexdigest()[:16]
        else:  # graphs, tokenizer, manifest: copies of the build
            files[rel] = "build"
    marker = json.loads((repo / "allspark_repository.json").read_text())
    return {"files": files, "models": marker["models"], "options": marker["options"]}


def write_all(build: Path, root: Path) -> dict:
    from allspark.serving.repository import write_repository

    out = {}
    for name, kw in VARIANTS.items():
        write_repository(build, root / name, options_of(kw))
        out[name] = snapshot(root / name)
    return out


def test_repositories_are_the_pinned_ones(build, tmp_path):
    """Both layouts write exactly the files and configs they wrote before they were classes."""
    pytest.importorskip("tritonclient")
    got = write_all(build, tmp_path)
    want = json.loads(GOLDEN.read_text())
    for name in VARIANTS:
        assert sorted(got[name]["files"]) == sorted(want[name]["files"]), name
        assert got[name] == want[name], name


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(write_all(Path(sys.argv[1]), Path(tmp)), indent=1, sort_keys=True))
