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



def test_layouts_are_registered_objects():
    from allspark.errors import ConfigError
    from allspark.serving.layouts import LAYOUTS, Layout, RuntimeLayout, serving_layout
    from allspark.serving.memory_plan import copies
    from allspark.serving.options import RepositoryOptions, TensorRTOptions

    assert {x.value for x in Layout} <= set(LAYOUTS)
    assert isinstance(serving_layout(Layout.RUNTIME), RuntimeLayout)
    assert RepositoryOptions(target="cpu").serving_layout is LAYOUTS["runtime"]
    assert RepositoryOptions(target="gpu").layout == Layout.COMPONENTS == "components"
    assert RepositoryOptions(target="cpu", layout=Layout.COMPONENTS).to_json()["layout"] == "components"
    assert copies({}, RepositoryOptions(target="cpu", layout="components", instances=3)) == 3
    assert copies({}, RepositoryOptions(target="cpu", instances=3, entry_instances=8)) == 1
    with pytest.raises(ConfigError, match="not one of"):
        RepositoryOptions(layout="nonesuch")
    with pytest.raises(ConfigError, match="use --layout components"):  # the runtime layout's own rule
        RepositoryOptions(target="gpu", layout="runtime", tensorrt=TensorRTOptions(enabled=True))
    with pytest.raises(ConfigError, match="--target gpu --layout components"):
        RepositoryOptions(target="gpu", layout="runtime", artifact="tensorrt")


def test_a_third_layout_is_one_class(build, tmp_path):
    """A layout defined here, and nowhere else: single-pass modalities through component models over
    BLS, generation in one process holding only the graphs generation needs. Registered, it is a
    `--layout` choice, `write_repository` writes it (every config checked against the others), and
    the memory preflight and option rules are its own."""
    pytest.importorskip("tritonclient")
    import argparse

    from allspark.errors import ConfigError
    from allspark.serving import cli
    from allspark.serving.layouts import (
        ENTRY_MODEL,
        RUNTIME_MODEL,
        Reach,
        ServingLayout,
        entry_model,
        register,
        runtime_model,
        unregister,
    )
    from allspark.serving.memory_plan import copies
    from allspark.serving.model_config import read_config
    from allspark.serving.options import RepositoryOptions
    from allspark.serving.repository import read_repository, write_repository

    @register
    class SplitLayout(ServingLayout):
        name = "test_split"
        help = "test_split: single-pass over components, generation in one process"
        component_models = True

        def shared_models(self, options):
            return [entry_model(Reach.BLS), runtime_model("generation", options.warmup)]

        def behind(self, stream):
            return RUNTIME_MODEL if stream else ENTRY_MODEL

        def copies(self, options):
            return options.instances + 1

        def validate(self, options):
            if options.instances > 4:
                raise ConfigError("test_split: at most 4 instances")

    try:
        parser = argparse.ArgumentParser()
        cli._add_repository_flags(parser)
        assert parser.parse_args(["--layout", "test_split"]).layout == "test_split"
        with pytest.raises(ConfigError, match="at most 4"):
            RepositoryOptions(target="cpu", layout="test_split", instances=5)
        options = RepositoryOptions(target="cpu", layout="test_split", instances=2)
        assert copies({}, options) == 3

        repo = tmp_path / "split"
        info = write_repository(build, repo, options)
        manifest = json.loads((build / "manifest.json").read_text())
        roles = info["models"]
        assert info["options"]["layout"] == "test_split" == read_repository(repo)["options"]["layout"]
        assert {n for n, r in roles.items() if r == "component"} == set(manifest["components"])
        assert roles[ENTRY_MODEL] == "entry" and roles[RUNTIME_MODEL] == "runtime" and "allspark_stream" not in roles

        runtime = read_config(repo / RUNTIME_MODEL / "config.pbtxt")
        generation = json.loads(runtime.parameters["modalities"].string_value)
        assert generation and runtime.parameters["layout"].string_value == Reach.IN_PROCESS.value
        assert read_config(repo / ENTRY_MODEL / "config.pbtxt").parameters["layout"].string_value == Reach.BLS.value
        for m in manifest["modalities"]:
            step = read_config(repo / m / "config.pbtxt").ensemble_scheduling.step[0].model_name
            assert step == (RUNTIME_MODEL if m in generation else ENTRY_MODEL), m
        # allspark_runtime holds the graphs generation routes through, and is warmed per modality
        held = json.loads((repo / RUNTIME_MODEL / "1" / "manifest.json").read_text())
        assert held["modalities"] == generation and set(held["components"]) < set(manifest["components"])
        assert all((repo / RUNTIME_MODEL / "1" / c["artifacts"]["onnx"]["file"]).is_file()
                   for c in held["components"].values())
        assert [w.name for w in runtime.model_warmup] == generation
        assert not (repo / ENTRY_MODEL / "warmup").exists()
    finally:
        unregister("test_split")
    with pytest.raises(ConfigError, match="not one of"):
        RepositoryOptions(layout="test_split")


@pytest.mark.parametrize("layout", ["runtime", "components"])
def test_each_shared_model_reaches_the_graphs_as_its_layout_parameter_says(build, tmp_path, monkeypatch, layout):
    """What the python models do in `initialize` (`EntryContext.load`), outside Triton: the `layout`
    parameter of each shared model's config (`Reach`) gives an in-process runtime over the graphs in
    its version directory, or one over BLS to the component models."""
    pytest.importorskip("tritonclient")
    import types

    from google.protobuf import json_format

    from allspark.serving.layouts import Reach
    from allspark.serving.model_config import read_config
    from allspark.serving.models.triton import parameters
    from allspark.serving.options import RepositoryOptions
    from allspark.serving.repository import write_repository

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", types.SimpleNamespace())  # no stub here
    info = write_repository(build, tmp_path / "r", RepositoryOptions(target="cpu", layout=layout, warmup=False))
    loaded = {}
    for name, role in info["models"].items():
        if role not in ("entry", "stream", "runtime"):
            continue
        cfg = json_format.MessageToDict(read_config(tmp_path / "r" / name / "config.pbtxt"),
                                        preserving_proto_field_name=True)
        params = parameters(cfg)
        version = tmp_path / "r" / name / "1"
        manifest = json.loads((version / "manifest.json").read_text())
        rt = Reach(params["layout"]).load(version, manifest, params, role != "entry")
        loaded[name] = (params["layout"], type(rt.backend).__name__)
        assert set(json.loads(params["modalities"])) <= set(rt.modalities)
    want = ({"allspark_runtime": ("runtime", "OrtBackend")} if layout == "runtime" else
            {"allspark_entry": ("components", "BlsBackend"), "allspark_stream": ("components", "BlsBackend")})
    assert loaded == want

if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(write_all(Path(sys.argv[1]), Path(tmp)), indent=1, sort_keys=True))
