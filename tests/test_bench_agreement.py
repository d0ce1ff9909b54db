"""`allspark bench agreement`: the comparison itself (a flipped label, a moved value, a moved
distribution are seen), and the fp32 build against the PyTorch reference agreeing exactly, which is
what makes `--reference-backend torch` stand in for an fp32 build at sizes too slow to export."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from allspark.bench import agreement
from allspark.errors import ConfigError


def test_compare_sees_what_moved():
    ref = {"label": np.array(["a", "b", "a", "b"]), "scores": np.array([[0.9, 0.1]] * 4)}
    cand = {"label": np.array(["a", "b", "b", "b"]), "scores": np.array([[0.9, 0.1]] * 3 + [[0.4, 0.6]])}
    got = agreement.compare(ref, cand)
    assert got["top1_agreement"] == 0.75 and got["max_probability_change"] == pytest.approx(0.5)
    v = np.array([[1.0, -2.0], [4.0, 0.5]])
    got = agreement.compare({"values": v}, {"values": v + [[0.0, 0.4], [0.0, 0.0]]})
    assert got["max_relative_error"] == pytest.approx(0.1) and got["mean_relative_error"] == pytest.approx(0.1)
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    same = agreement.compare({"logits": logits}, {"logits": logits})
    assert same["first_token_agreement"] == 1 and same["kl_max"] < 1e-12
    moved = agreement.compare({"logits": logits}, {"logits": logits[:, ::-1].copy()})
    assert moved["first_token_agreement"] == 0.5 and moved["kl_max"] > 0.5


def _args(tmp_path, **kw) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    agreement.add_arguments(p)
    a = p.parse_args(["--candidate", "-", "--out", str(tmp_path / "agree.json"), "--n", "4", "--batch", "2"])
    return argparse.Namespace(**{**vars(a), **kw})


def test_fp32_build_agrees_with_its_pytorch_reference(build, ckpt, tmp_path):
    args = _args(tmp_path, candidate=str(build), reference_backend="torch", checkpoint=str(ckpt),
                 modalities="rgb,table,language")
    assert agreement.run(args) == 0
    r = json.loads((tmp_path / "agree.json").read_text())
    assert r["reference"]["backend"] == "torch" and r["reference"]["precision"] == "fp32 (PyTorch)"
    got = r["modalities"]
    assert got["rgb"]["top1_agreement"] == 1.0 and got["rgb"]["max_probability_change"] < 1e-4
    assert got["table"]["max_relative_error"] < 1e-4
    assert got["language"]["first_token_agreement"] == 1.0 and got["language"]["kl_max"] < 1e-6
    assert "the PyTorch modules of" in (tmp_path / "agree.md").read_text()


def test_reference_is_required_without_torch(build, tmp_path):
    with pytest.raises(ConfigError, match="--reference"):
        agreement.run(_args(tmp_path, candidate=str(build), reference=None))
    with pytest.raises(ConfigError, match=r"not in both builds"):
        agreement.run(_args(tmp_path, candidate=str(build), reference=str(build), modalities="nope"))


def test_answers_are_kept_and_reused(build, tmp_path, monkeypatch):
    from allspark.runtime import Runtime

    first = agreement.answers(build, ["rgb", "language"], 2, 2, 0, cache=tmp_path / "c")
    assert len(list((tmp_path / "c").glob("onnxruntime-*-n2-b2-s0-*.npz"))) == 2

    def refuse(*a, **k):
        raise AssertionError("answers were cached: no runtime should load")

    monkeypatch.setattr(Runtime, "load", refuse)
    again = agreement.answers(build, ["rgb", "language"], 2, 2, 0, cache=tmp_path / "c")
    assert (again["rgb"]["label"] == first["rgb"]["label"]).all()
    np.testing.assert_array_equal(again["language"]["logits"], first["language"]["logits"])
    with pytest.raises(AssertionError, match="cached"):  # another seed is not in the cache
        agreement.answers(build, ["rgb"], 2, 2, 1, cache=tmp_path / "c")
