"""An eleventh modality from outside the package (`tests/plugins/dem_plugin.py`, a digital elevation
model): checkpoint, export with parity, verify, both runtime backends against the reference model,
a batch mixed with built-in modalities, `allspark run` on a file, the demo generator, and Triton
repositories that validate — with no file under `allspark/` knowing it. Also: the same plug-in found
through the `allspark.modalities` entry-point group of an installed distribution."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from allspark.errors import ConfigError
from allspark.model import registry

PLUGINS = Path(__file__).parent / "plugins"
MODALITIES = ["dem", "rgb", "language"]


@pytest.fixture(scope="module")
def dem():
    sys.path.insert(0, str(PLUGINS))
    import dem_plugin

    registry.register_modality(dem_plugin.SPEC)
    yield dem_plugin
    registry.unregister_modality("dem")
    sys.path.remove(str(PLUGINS))


@pytest.fixture(scope="module")
def dem_model(dem):
    from allspark.model.factory import build_model

    torch.manual_seed(0)
    return build_model("tiny", seed=0, modalities=MODALITIES)


@pytest.fixture(scope="module")
def dem_build(dem_model, tmp_path_factory):
    from allspark.export.build import export_build
    from allspark.model.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("dem")
    ckpt = save_checkpoint(dem_model, root / "ckpt")
    export_build(ckpt, root / "build", progress=False)
    return root / "build"


def _inputs(model, n, seed=5):
    """`n` requests from the plug-in's sample factory, at three sizes."""
    from allspark.model.registry import random_inputs

    rng = np.random.default_rng(seed)
    return [random_inputs(model.config.modality("dem"), rng, v % 3) for v in range(n)]


def test_registered_like_a_builtin(dem):
    from allspark.model.presets import get_preset

    assert registry.modality_names()[-1] == "dem" and registry.spec("DEM") is dem.SPEC
    assert get_preset("tiny").modality("dem").labels == dem.TERRAIN  # it joins the presets it defines
    with pytest.raises(ConfigError, match="already registered"):
        registry.register_modality(dataclasses.replace(dem.SPEC))


def test_checkpoint_and_reference_model(dem, dem_model, tmp_path):
    from allspark.model.checkpoint import load_checkpoint, save_checkpoint

    assert dem_model.modalities == tuple(MODALITIES)
    loaded = load_checkpoint(save_checkpoint(dem_model, tmp_path / "ck"))
    x = _inputs(dem_model, 1)[0]
    ra, rb = dem_model.prepare("dem", x), loaded.prepare("dem", x)
    assert torch.equal(dem_model([ra])[0], loaded([rb])[0])
    p = dem_model.postprocess(ra, dem_model([ra])[0])
    assert p.label in dem.TERRAIN and abs(sum(p.scores.values()) - 1) < 1e-5


def test_export_parity_and_verify(dem_build):
    from allspark.contract import read_manifest
    from allspark.export.verify import verify_build

    m = read_manifest(dem_build)
    assert m["routes"]["dem"] == {"encoder": "dem_encoder", "bridge": "dem_bridge", "head": "dem_head"}
    for name in ("dem_encoder", "dem_bridge", "dem_head"):
        parity = m["components"][name]["parity"]
        assert parity["passed"] and all(e["max_abs"] <= 1e-4 for e in parity["outputs"].values()), name
    assert verify_build(dem_build) == []


def test_both_backends_match_the_reference_model(dem, dem_model, dem_build):
    from allspark.runtime import Runtime

    ort_rt, torch_rt = Runtime.load(dem_build), Runtime.load(dem_build, backend="torch")
    for x in _inputs(dem_model, 3):
        row = dem_model.prepare("dem", x)
        ref = dem_model.postprocess(row, dem_model([row])[0])
        for rt in (ort_rt, torch_rt):
            p = rt.predict("dem", x)
            assert p.label == ref.label
            assert max(abs(p.scores[k] - ref.scores[k]) for k in ref.scores) < 1e-4


def test_mixed_batch_with_builtin_modalities(dem, dem_build):
    from allspark.model.registry import random_inputs
    from allspark.runtime import GenerationConfig, Request, Runtime

    rt = Runtime.load(dem_build)
    rng = np.random.default_rng(11)
    reqs = [Request(m, random_inputs(rt.config.modality(m), rng)) for m in ("rgb", "dem", "language", "dem")]
    gen = GenerationConfig(max_new_tokens=6)
    batched = rt.predict_batch(reqs, gen)
    for r, b in zip(reqs, batched):
        alone = rt.predict(r.modality, r.inputs, generation=gen)
        assert b.label == alone.label and b.tokens == alone.tokens, r.modality
        if alone.scores:
            assert max(abs(b.scores[k] - alone.scores[k]) for k in alone.scores) < 1e-4


def test_run_cli_reads_a_dem_file(dem, dem_build, tmp_path, capsys):
    from allspark.cli import main
    from allspark.runtime import Runtime

    heights = dem._terrain(np.random.default_rng(3), 2, 20)[..., 0]  # (H, W): the reader adds the channel
    np.save(tmp_path / "tile.npy", heights)
    assert main(["run", str(dem_build), "--modality", "dem", "--input", str(tmp_path / "tile.npy"), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["label"] == Runtime.load(dem_build).predict("dem", {"heights": heights[..., None]}).label
    assert main(["run", str(dem_build), "--modality", "dem", "--input", str(tmp_path / "tile.npy"),
                 "--prompt", "which terrain is this?"]) == 0
    bad = np.zeros((20, 20, 2), np.float32)
    np.save(tmp_path / "two.npy", bad)
    assert main(["run", str(dem_build), "--modality", "dem", "--input", str(tmp_path / "two.npy")]) == 2
    assert "dem: input 'heights': expected shape" in capsys.readouterr().err


def test_demo_generator_and_quality_bar(dem, dem_model):
    from allspark.demo.data import generate
    from allspark.demo.evaluate import evaluate, quality_bar

    samples = generate("dem", 5, 0, dem_model.config)
    assert [s.target for s in samples] == [s.target for s in generate("dem", 5, 0, dem_model.config)]
    res = evaluate(dem_model, 8, 0, ["dem"], verbose=False)["dem"]
    assert 0.0 <= res["top-1"] <= 100.0 and quality_bar("dem", res)[0].startswith("accuracy >= 90%")


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_triton_repository_validates(dem, dem_build, tmp_path, target):
    from allspark.serving.model_config import read_config
    from allspark.serving.options import RepositoryOptions
    from allspark.serving.repository import write_repository

    info = write_repository(dem_build, tmp_path / "repo", RepositoryOptions(target=target, layout="components"))
    assert info["models"]["dem"] == "ensemble" and info["models"]["dem_encoder"] == "component"
    entry = read_config(tmp_path / "repo" / "dem" / "config.pbtxt")
    assert [t.name for t in entry.input] == ["heights", "prompt"] and list(entry.input[0].dims) == [-1, -1, 1]
    assert [t.name for t in entry.output] == ["label", "scores"] and list(entry.output[1].dims) == [4]


def test_entry_point_plugin_is_loaded(tmp_path, monkeypatch):
    """An installed distribution declaring `allspark.modalities` gets its modality registered."""
    dist = tmp_path / "dem_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: dem-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[allspark.modalities]\ndem = dem_plugin:register\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(PLUGINS))
    registry.unregister_modality("dem")
    monkeypatch.setattr(registry, "_loaded", False)  # as in a fresh process
    try:
        assert "dem" in registry.modality_names()
        assert registry.spec("dem").task == "terrain classification from elevation"
    finally:
        registry.unregister_modality("dem")
