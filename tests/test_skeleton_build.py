"""A whole build as a skeleton (no weights, for transfer to a GPU machine) and back with seeded
weights: refused until filled, then loaded, verified and run like any build (timing only)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from allspark.bench.skeleton import fill_build, is_skeleton, strip_build
from allspark.contract.manifest import ManifestError
from allspark.errors import ConfigError
from allspark.model.generation import GenerationConfig
from allspark.model.registry import random_inputs
from allspark.runtime import Request, Runtime

GEN = GenerationConfig(max_new_tokens=3, ignore_eos=True)


@pytest.fixture(scope="module")
def skeleton(build, tmp_path_factory):
    out = tmp_path_factory.mktemp("skel") / "skeleton"
    facts = strip_build(build, out)
    return out, facts


def _graphs(manifest):
    return [a["file"] for c in manifest["components"].values() for a in c["artifacts"].values()]


def _answers(rt):
    out = {}
    for m in rt.manifest["modalities"]:
        x = random_inputs(rt.config.modality(m), np.random.default_rng(0))
        p = rt.predict(m, x, generation=GEN)
        out[m] = p.tokens if p.tokens is not None else np.asarray(p.values if p.values is not None else p.label)
    return out


def test_a_skeleton_has_every_graph_without_its_weights_and_is_refused(build, skeleton):
    skel, facts = skeleton
    src = json.loads((build / "manifest.json").read_text())
    m = json.loads((skel / "manifest.json").read_text())
    size = sum(f.stat().st_size for f in build.rglob("*") if f.is_file())
    assert facts["dropped_elements"] > 0 and facts["bytes"] < size / 2
    assert sorted(_graphs(m)) == sorted(a for a in _graphs(src) if a.endswith(".onnx"))
    assert is_skeleton(skel / "decoder.onnx") and not list(skel.glob("*.data"))
    # parity cases cannot hold on seeded weights: not carried
    assert not list(skel.rglob("*.npz")) and not any(f.endswith(".npz") for f in m["sha256"])
    with pytest.raises(ManifestError, match="skeleton build .*allspark.bench.skeleton fill"):
        Runtime.load(skel)
    with pytest.raises(ConfigError, match="skeleton already"):
        strip_build(skel, skel.parent / "again")
    with pytest.raises(ConfigError, match="not a skeleton"):
        fill_build(build, skel.parent / "nope")
    assert not (skel.parent / "again").exists() and not (skel.parent / "nope").exists()
    # the output is replaced whole: never the source, a folder around it, or a directory that is no build
    for dst in (build, build / "inside", build.parent):
        with pytest.raises(ConfigError, match="would replace"):
            strip_build(build, dst)
    other = skel.parent / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a build"):
        fill_build(skel, other)
    assert (other / "keep.txt").read_text() == "mine" and (build / "manifest.json").is_file()


def test_a_filled_skeleton_verifies_and_runs_every_modality(skeleton, tmp_path, caplog):
    skel, _ = skeleton
    a = fill_build(skel, tmp_path / "a", seed=1)
    m = json.loads((a / "manifest.json").read_text())
    assert "skeleton" not in m and m["synthetic_weights"]["seed"] == 1
    with caplog.at_level(logging.WARNING, logger="allspark.runtime.runtime"):
        rt = Runtime.load(a)  # verify=True: the manifest's hashes are the filled files'
    assert "synthetic weights" in caplog.text
    first = _answers(rt)
    assert set(first) == set(rt.manifest["modalities"])
    # seeded: the same seed gives the same weights, so the same answers
    again = _answers(Runtime.load(fill_build(skel, tmp_path / "b", seed=1)))
    for k in first:
        np.testing.assert_array_equal(np.asarray(first[k]), np.asarray(again[k]))
    other = Runtime.load(fill_build(skel, tmp_path / "c", seed=2))
    x = random_inputs(other.config.modality("rgb"), np.random.default_rng(0))
    hidden = [r.prefill([r.prepare(Request("rgb", x))])[1].hidden for r in (rt, other)]
    assert hidden[0].shape == hidden[1].shape and not np.allclose(hidden[0], hidden[1])


@pytest.mark.slow
def test_make_base_skeleton_exports_the_text_modalities_and_keeps_only_the_skeleton(tmp_path):
    """`gpu_check --make-base-skeleton` at the tiny preset: a skeleton of the text modalities with
    the static-cache decoder (what the server stage serves device-resident), the export gone."""
    from allspark.bench import gpu_check

    out = gpu_check.make_base_skeleton(tmp_path / "skel", preset="tiny")
    m = json.loads((out / "manifest.json").read_text())
    assert m["skeleton"] and m["config"]["name"] == "tiny" and m["precision"] == "fp16"
    assert all(c["encoder"] is None for c in m["routes"].values()) and len(m["modalities"]) >= 2
    assert "onnx-static-cache" in m["components"]["decoder"]["artifacts"]
    assert is_skeleton(out / "decoder.onnx") and not list(out.glob("*.data"))
    rt = Runtime.load(fill_build(out, tmp_path / "filled"))
    assert rt.predict(m["modalities"][0], {"text": "hello"}, generation=GEN).tokens
