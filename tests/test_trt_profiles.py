"""TensorRT optimization profiles from a build's manifest (no TensorRT needed to derive or check them)."""

from __future__ import annotations

import json

import pytest

from allspark.contract.manifest import read_manifest
from allspark.errors import ConfigError
from allspark.export.trt_profiles import parse_overrides, profiles


@pytest.fixture(scope="module")
def manifest(build):
    return read_manifest(build)


def _at(p, i):
    """{input: shape} at min (0), opt (1) or max (2)."""
    return {n: s[i] for n, s in p.shapes.items()}


def test_every_component_has_profiles_covering_every_input_within_the_build(manifest):
    dims = manifest["dims"]
    for name, comp in manifest["components"].items():
        for p in profiles(manifest, name):
            assert set(p.shapes) == {t["name"] for t in comp["inputs"]}
            for t in comp["inputs"]:
                lo, opt, hi = p.shapes[t["name"]]
                assert len(lo) == len(t["dims"]) and all(a <= b <= c for a, b, c in zip(lo, opt, hi))
                for d, x in zip(t["dims"], hi):
                    assert x <= (dims[d]["max"] if isinstance(d, str) else d)


def test_decoder_profiles_keep_total_equal_past_plus_seq(manifest):
    prefill, decode = profiles(manifest, "decoder")
    assert (prefill.name, decode.name) == ("prefill", "decode")
    for p in (prefill, decode):
        for i in range(3):
            s = _at(p, i)
            seq, total, past = s["inputs_embeds"][1], s["attention_mask"][1], s["past_key.0"][2]
            assert total == past + seq, (p.name, i)
            assert s["position_ids"][1] == seq
    assert {_at(prefill, i)["past_key.0"][2] for i in range(3)} == {0}  # no cache in a prefill
    assert {_at(decode, i)["inputs_embeds"][1] for i in range(3)} == {1}  # one token per decode step
    assert _at(decode, 2)["attention_mask"][1] == manifest["dims"]["total_len"]["max"]


def test_overrides_and_bad_overrides(manifest):
    (p,) = profiles(manifest, "rgb_encoder", parse_overrides(["batch=1:4:16"]))
    assert {s[0][0] for s in p.shapes.values()} == {1} and {s[2][0] for s in p.shapes.values()} == {16}
    opts = p.ort_trt_options()
    assert opts["trt_profile_max_shapes"].startswith(f"{next(iter(p.shapes))}:16x")
    for bad, match in ((["batch=4"], "DIM=MIN:OPT:MAX"), (["batch=8:4:16"], "MIN <= OPT"),
                       (["colour=1:2:3"], "unknown dims"), ([f"batch=1:8:{10**6}"], "exceeds the build")):
        with pytest.raises(ConfigError, match=match):
            profiles(manifest, "decoder", parse_overrides(bad))
    with pytest.raises(ConfigError, match="no component"):
        profiles(manifest, "nope")


def test_cli_prints_and_writes_profiles(build, tmp_path, capsys):
    from allspark.cli import main

    assert main(["trt-profiles", str(build), "--profile", "seq_len=1:16:64", "--json", str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    assert "decoder" in out and "prefill" in out and "decode" in out
    got = json.loads((tmp_path / "p.json").read_text())
    assert [p["name"] for p in got["decoder"]] == ["prefill", "decode"]
    assert got["decoder"][0]["shapes"]["inputs_embeds"][2][1] == 64
    assert main(["trt-profiles", str(build), "--profile", "seq_len=oops"]) == 2
