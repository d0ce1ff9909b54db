"""Memory that never surprises: each command that loads weights estimates its peak first and, when it
does not fit (ALLSPARK_MEMORY_AVAILABLE pretends a small machine), refuses at once with one line that
names the size, what is available and the options that fit -- before reading any weight."""

from __future__ import annotations

import pytest

from allspark.cli import main
from allspark.memory import InsufficientMemory, Need, available_bytes, check, parse_bytes


def test_check_names_size_available_and_what_fits():
    need = Need("allspark export", 28e9, (("decoder", 27e9),), (("--precision int4", 5e9), ("--parity twin", 30e9)))
    with pytest.raises(InsufficientMemory) as e:
        check(need, available=20e9)
    msg = str(e.value)
    assert "28.0 GB" in msg and "20.0 GB is available" in msg and "decoder 27.0 GB" in msg
    assert "`--precision int4` (~5.0 GB)" in msg and "--parity twin" not in msg  # only what fits is offered
    check(need, available=40e9)  # fits: nothing raised
    check(Need("x", 10e9), available=0)  # unknown memory: never refuses


def test_environment_overrides(monkeypatch):
    monkeypatch.setenv("ALLSPARK_MEMORY_AVAILABLE", "1.5GiB")
    assert available_bytes() == int(1.5 * (1 << 30))
    with pytest.raises(InsufficientMemory):
        check(Need("x", 2e9))
    monkeypatch.setenv("ALLSPARK_MEMORY_CHECK", "off")
    check(Need("x", 2e9))
    assert parse_bytes("512MB") == 512_000_000
    with pytest.raises(Exception, match="8GB"):
        parse_bytes("lots")


def test_export_refuses_before_reading_weights(ckpt, tmp_path, monkeypatch, capsys):
    from allspark.model import skeleton

    monkeypatch.setenv("ALLSPARK_MEMORY_AVAILABLE", "200MB")
    reads = []
    real = skeleton.CheckpointTensors.read
    monkeypatch.setattr(skeleton.CheckpointTensors, "read", lambda self, n: reads.append(n) or real(self, n))
    assert main(["export", str(ckpt), "--out", str(tmp_path / "b"), "--precision", "int4"]) == 2
    assert reads and all(n.endswith(("_mean", "_std")) for n in reads)  # normalisation buffers, no weight
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: allspark export needs about") and "0.2 GB is available" in err[0]
    assert not (tmp_path / "b").exists()


def test_new_refuses_and_offers_fp16(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ALLSPARK_MEMORY_AVAILABLE", "5GB")
    assert main(["new", "--preset", "paper", "--modalities", "rgb", "--dtype", "fp32", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "the rgb pack in fp32" in err and "it fits with `--dtype fp16`" in err
    assert not (tmp_path / "c").exists()


def test_runtime_load_and_verify_refuse(build, monkeypatch, capsys):
    from allspark.runtime import Runtime

    monkeypatch.setenv("ALLSPARK_MEMORY_AVAILABLE", "300MB")
    with pytest.raises(InsufficientMemory, match="loading .* on onnxruntime needs about"):
        Runtime.load(build)
    assert main(["verify", str(build)]) == 2
    assert "it fits with `--hashes-only`" in capsys.readouterr().err


def test_estimates_track_the_model():
    """The export estimate of the paper's int4 build is bounded by its largest fp32 parity module, the
    fp32 one by its 27 GB decoder -- the numbers the refusal quotes (docs/benchmarks/scale.md)."""
    from allspark.model.memory_plan import new_need

    paper = new_need("paper", None, "fp16")
    assert 3.3e9 < paper.bytes < 4.5e9  # the RGB pack (EVA-g + bridge + adapters: 3.35 GB) + process
    base = new_need("base", ["language"], "fp32")
    assert base.bytes < 2e9  # a shard, not the 4.4 GB LLM
