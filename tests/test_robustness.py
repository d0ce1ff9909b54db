"""Damaged builds, hostile files and extreme values: refused clearly, never answered wrongly.

One test per kind of failure: tampered or swapped weights and paths leaving the build (refused at
load), `allspark verify` on every kind of damage (each reported, never a crash), tracebacks (none
reach a user from a table of bad invocations), the demo cache (heals), extreme and non-finite values
(refused or named by stage), decompression bombs (refused at the header, in bounded memory), flags,
bands first or last, one bad row in a batch (fails alone), and the onnxruntime path (no torch)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from allspark.cli import main
from allspark.contract.integrity import BuildIntegrityError
from allspark.errors import InputError, NumericsError
from allspark.runtime import Request, Runtime


@pytest.fixture
def damaged(build, tmp_path):
    """A private copy of the session's build to damage."""
    out = tmp_path / "b"
    shutil.copytree(build, out)
    return out


def _manifest(b: Path) -> dict:
    return json.loads((b / "manifest.json").read_text())


def _write_manifest(b: Path, m: dict) -> None:
    (b / "manifest.json").write_text(json.dumps(m))


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


# ---- a build is checked before it is trusted ---------------------------------------------------------


def test_tampered_swapped_or_escaping_builds_are_refused(damaged, tmp_path):
    _flip(damaged / "sar_head.onnx")
    with pytest.raises(BuildIntegrityError, match="'sar_head'.*sar_head.onnx.*sha256"):
        Runtime.load(damaged)
    shutil.copy(damaged / "rgb_head.onnx", damaged / "sar_head.onnx")  # heads swapped between modalities
    with pytest.raises(BuildIntegrityError, match="sar_head"):
        Runtime.load(damaged)
    m = _manifest(damaged)
    outside = tmp_path / "elsewhere.onnx"
    shutil.copy(damaged / "rgb_head.onnx", outside)
    for bad in ("../../elsewhere.onnx", str(outside)):
        m["components"]["rgb_head"]["artifacts"]["onnx"]["file"] = bad
        m["components"]["rgb_head"]["artifacts"]["onnx"]["sha256"] = {bad: "0" * 64}
        _write_manifest(damaged, m)
        with pytest.raises(BuildIntegrityError, match="outside the build"):
            Runtime.load(damaged, verify=False)  # paths are checked even without hashing


def _open_another_head(b: Path) -> None:
    """rgb_head's manifest opens msi_head.onnx while its sha256 still covers rgb_head.onnx (both intact)."""
    m = _manifest(b)
    m["components"]["rgb_head"]["artifacts"]["onnx"]["file"] = "msi_head.onnx"
    _write_manifest(b, m)


_MISMATCH = "'rgb_head'.*msi_head.onnx.*not among the files its sha256 covers.*rgb_head.onnx"


def test_a_file_its_hashes_do_not_cover_is_refused_at_load(damaged):
    _open_another_head(damaged)
    for verify in (True, False):  # a structural check: no hashing needed
        with pytest.raises(BuildIntegrityError, match=_MISMATCH):
            Runtime.load(damaged, verify=verify)


def test_verify_names_a_file_its_hashes_do_not_cover(damaged, capsys):
    _open_another_head(damaged)
    assert main(["verify", str(damaged)]) == 1
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "not among the files its sha256 covers" in x)
    assert "msi_head.onnx" in line and "rgb_head.onnx" in line
    assert "FAIL  rgb_head" in out and "parity drifted" not in out  # refused before parity runs


def test_serve_refuses_a_file_its_hashes_do_not_cover(damaged, tmp_path):
    from allspark.serving.options import RepositoryOptions, Target
    from allspark.serving.repository import write_repository

    _open_another_head(damaged)
    with pytest.raises(BuildIntegrityError, match=_MISMATCH):
        write_repository(damaged, tmp_path / "repo", RepositoryOptions(target=Target.CPU, layout="components"))
    assert not (tmp_path / "repo").exists()


def test_a_verified_build_loads_without_rehashing(build):
    from allspark.contract import integrity

    Runtime.load(build)  # hashes are cached per file version
    calls = []
    real = integrity.sha256_file
    integrity.sha256_file = lambda p, *a: calls.append(p) or real(p, *a)
    try:
        Runtime.load(build)
    finally:
        integrity.sha256_file = real
    assert calls == []


# ---- allspark verify -----------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["missing", "empty", "truncated", "flipped", "directory", "bad_sha",
                                    "parity_garbage", "parity_missing"])
def test_verify_names_every_kind_of_damage(damaged, damage, capsys):
    f = damaged / "hsi_bridge.onnx"
    if damage == "missing":
        f.unlink()
    elif damage == "empty":
        f.write_bytes(b"")
    elif damage == "truncated":
        f.write_bytes(f.read_bytes()[:100])
    elif damage == "flipped":
        _flip(f)
    elif damage == "directory":
        f.unlink()
        f.mkdir()
    elif damage == "bad_sha":
        m = _manifest(damaged)
        m["components"]["hsi_bridge"]["artifacts"]["onnx"]["sha256"]["hsi_bridge.onnx"] = "f" * 64
        _write_manifest(damaged, m)
    elif damage == "parity_garbage":
        (damaged / "validation" / "hsi_bridge.npz").write_bytes(b"PK\x03\x04 not a zip")
    elif damage == "parity_missing":
        (damaged / "validation" / "hsi_bridge.npz").unlink()
    assert main(["verify", str(damaged)]) == 1
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    named = "build" if damage.startswith("parity") else "hsi_bridge"
    assert f"FAIL  {named}" in out.out and "failed verification" in out.err
    assert "ok    rgb_encoder" in out.out  # the rest is still checked and reported


def test_verify_refuses_an_incomplete_manifest(damaged, capsys):
    m = _manifest(damaged)
    m["config"] = {}
    _write_manifest(damaged, m)
    assert main(["verify", str(damaged)]) == 2
    assert "incomplete model config" in capsys.readouterr().err
    del m["routes"]
    m["config"] = _manifest(damaged)["config"] or {"name": "x"}
    _write_manifest(damaged, m)
    assert main(["verify", str(damaged)]) == 2


# ---- no traceback reaches a user -----------------------------------------------------------------------


def test_bad_invocations_give_messages_not_tracebacks(build, damaged, tmp_path, capsys):
    (tmp_path / "notjson").mkdir()
    (tmp_path / "notjson" / "manifest.json").write_text("{")
    (tmp_path / "scene.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "text.txt").write_bytes(b"\xff\xfe\xfa not utf-8")
    (tmp_path / "img.npy").write_bytes(b"\x93NUMPY garbage")
    shutil.rmtree(damaged / "tokenizer")
    (damaged / "tokenizer").mkdir()
    (damaged / "tokenizer" / "tokenizer.json").write_text("{ broken")
    bad_llm = tmp_path / "llm"
    bad_llm.mkdir()
    (bad_llm / "config.json").write_text("not json")
    cases = [
        ["run", str(tmp_path / "nowhere"), "--modality", "rgb", "--input", "x.png"],
        ["run", str(tmp_path / "notjson"), "--modality", "rgb", "--input", "x.png"],
        ["run", str(build), "--modality", "video", "--input", str(tmp_path / "scene.png")],
        ["run", str(build), "--modality", "rgb", "--input", str(tmp_path / "scene.png")],
        ["run", str(build), "--modality", "language", "--input", str(tmp_path / "text.txt")],
        ["run", str(build), "--modality", "sar", "--input", str(tmp_path / "img.npy")],
        ["run", str(build), "--modality", "rgb", "--input", str(tmp_path)],
        ["run", str(damaged), "--modality", "rgb", "--input", str(tmp_path / "scene.png")],
        ["verify", str(tmp_path / "notjson")],
        ["info", str(tmp_path / "notjson")],
        ["export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")],
        ["convert", "--lynx", str(tmp_path / "scene.png"), "--llm", str(bad_llm), "--modality", "rgb",
         "--out", str(tmp_path / "c")],
        ["convert", "--lynx", str(tmp_path / "nowhere.pt"), "--llm", str(bad_llm), "--modality", "rgb",
         "--out", str(tmp_path / "c")],
        ["serve", str(tmp_path / "notjson"), "--repo", str(tmp_path / "r")],
    ]
    for argv in cases:
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc in (1, 2) and err.startswith("error: ") and "Traceback" not in err, (argv, rc, err)
    for argv in (["run", str(build), "--modality", "rgb", "--input", "x", "--threads", "-5"],
                 ["run", str(build), "--modality", "rgb", "--input", "x", "--max-new-tokens", "0"],
                 ["serve", str(build), "--start", "--http-port", "70000"],
                 ["bench", str(build), "--repeat", "0"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and "expected" in capsys.readouterr().err, argv


# ---- the demo cache heals ------------------------------------------------------------------------------


def test_demo_cache_rebuilds_a_damaged_build(tmp_path, monkeypatch):
    from allspark.contract.manifest import SCHEMA_VERSION
    from allspark.demo.run import demo_build
    from allspark.fsutil import sha256_file
    from allspark.model.checkpoint import save_checkpoint
    from allspark.model.factory import build_model

    monkeypatch.setenv("ALLSPARK_CACHE", str(tmp_path / "cache"))
    ckpt = save_checkpoint(build_model("tiny", modalities=["sar"]), tmp_path / "ck")
    half = tmp_path / "cache" / f"build-v{SCHEMA_VERSION}-{sha256_file(ckpt / 'manifest.json')[:16]}"
    half.mkdir(parents=True)
    (half / "manifest.json").write_text("{ half-written")  # a killed writer's leftovers
    out = demo_build(ckpt, progress=False)
    assert out == half and Runtime.load(out)
    _flip(out / "decoder.onnx")  # damaged later
    assert demo_build(ckpt, progress=False) == out and Runtime.load(out)


# ---- extreme and non-finite values ---------------------------------------------------------------------


def test_extreme_values_are_refused_or_handled(build):
    rt = Runtime.load(build)
    rng = np.random.default_rng(0)
    with pytest.raises(InputError, match="rgb: input 'image': expected values within"):
        rt.predict("rgb", {"image": np.full((28, 28, 3), 1e38, np.float32)})
    with pytest.raises(InputError, match=r"float values in \[0, 1\]"):
        rt.predict("rgb", {"image": rng.uniform(0, 255, (28, 28, 3))})  # 8-bit values sent as floats
    with pytest.raises(InputError, match="points.*within"):
        rt.predict("point_cloud", {"points": np.full((50, 3), 1e30, np.float32)})
    far = {"observed": (np.cumsum(rng.normal(0.4, 0.1, (8, 2)), 0) + [4.5e6, 5.2e6]).astype(np.float64)}
    near = {"observed": far["observed"] - [4.5e6, 5.2e6]}
    a, b = rt.predict("trajectory", far).values, rt.predict("trajectory", near).values
    assert np.isfinite(a).all()  # UTM-sized coordinates: centred in float64, shifted back exactly
    np.testing.assert_allclose(a - [4.5e6, 5.2e6], b, atol=1e-3)
    pc = rng.normal(size=(60, 3)) * 10 + 3e8
    assert np.isfinite(rt.predict("point_cloud", {"points": pc}).scores["airplane"])


def test_a_non_finite_stage_fails_its_row_only(build, monkeypatch):
    rt = Runtime.load(build)
    rng = np.random.default_rng(1)
    from allspark.model.registry import random_inputs

    reqs = [Request(m, random_inputs(rt.config.modality(m), rng)) for m in ("sar", "rgb", "sar")]
    real = rt.backend.bridge

    def poisoned(component, media):
        out = real(component, media)
        if component == "sar_bridge":
            out[1] = np.nan  # the second sar row only
        return out

    monkeypatch.setattr(rt.backend, "bridge", poisoned)
    out = rt.predict_batch(reqs)
    assert out[0].label is not None and out[1].label is not None
    assert isinstance(out[2], NumericsError) and out[2].stage == "bridge" and "sar" in str(out[2])


# ---- hostile files --------------------------------------------------------------------------------------


def _bomb(path: Path) -> None:
    """A small GeoTIFF declaring 8192 x 8192 x 13 (zlib tiles of zeros, written tile by tile)."""
    import tifffile

    tile = np.zeros((512, 512, 13), np.uint8)
    tiles = (tile for _ in range((8192 // 512) ** 2))
    tifffile.imwrite(path, tiles, shape=(8192, 8192, 13), dtype=np.uint8, tile=(512, 512), compression="zlib",
                     photometric="minisblack", planarconfig="contig")


def test_decompression_bomb_is_refused_at_the_header(build, tmp_path):
    _bomb(tmp_path / "bomb.tif")
    assert (tmp_path / "bomb.tif").stat().st_size < 20 * 2 ** 20
    # VmHWM: this process's own peak (ru_maxrss would include pytest's, inherited through fork)
    code = ("import sys; from allspark.cli import main; rc = main(sys.argv[1:]); "
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]; "
            "print(int(hwm) // 1024, rc)")
    r = subprocess.run([sys.executable, "-c", code, "run", str(build), "--modality", "msi", "--input",
                        str(tmp_path / "bomb.tif")], capture_output=True, text=True, timeout=120)
    rss_mb, rc = map(int, r.stdout.split())
    assert rc == 2 and "declaring [8192, 8192, 13]" in r.stderr and "Traceback" not in r.stderr
    assert rss_mb < 600, f"{rss_mb} MB resident: the raster was decoded"  # decoded it is 3.3 GB


def test_npy_and_npz_headers_are_checked(tmp_path, monkeypatch):
    from allspark.model.readers import read_fields

    monkeypatch.setenv("ALLSPARK_MAX_INPUT_BYTES", str(1 << 20))
    np.save(tmp_path / "big.npy", np.zeros((600, 600), np.float32))  # 1.4 MB
    np.savez_compressed(tmp_path / "big.npz", series=np.zeros((600, 600), np.float32))
    for f, names in (("big.npy", ("image",)), ("big.npz", ("series",))):
        with pytest.raises(InputError, match=r"declaring \[600, 600\]"):
            read_fields(tmp_path / f, names)


# ---- layouts, flags, rows --------------------------------------------------------------------------------


def test_bands_first_or_last(build):
    rt = Runtime.load(build)
    rng = np.random.default_rng(2)
    msi = rng.uniform(0, 0.4, (16, 16, 13)).astype(np.float32)
    assert rt.predict("msi", {"image": np.moveaxis(msi, -1, 0)}).label == rt.predict("msi", {"image": msi}).label
    sar = rng.gamma(1, 1, (32, 32)).astype(np.float32)
    assert rt.predict("sar", {"image": sar}).label == rt.predict("sar", {"image": sar[..., None]}).label
    spectrum = rng.uniform(0, 1, 103).astype(np.float32)
    assert rt.predict("hsi", {"spectrum": spectrum.reshape(1, 1, 103)}).label == rt.predict("hsi", {"spectrum": spectrum}).label
    with pytest.raises(InputError, match="bands=13"):
        rt.predict("msi", {"image": rng.uniform(0, 0.4, (12, 16, 16)).astype(np.float32)})


def test_one_bad_row_never_fails_its_batch(build):
    rt = Runtime.load(build)
    good = {"text": "the acting was wonderful"}
    out = rt.predict_batch([Request("language", good), Request("language", {"text": "bad \ud800 surrogate"}),
                            Request("language", good, prompt=123), Request(None, good), Request("language", good)])
    assert out[0].text == out[4].text and out[0].text is not None
    assert isinstance(out[1], InputError) and "valid Unicode" in str(out[1])
    assert isinstance(out[2], InputError) and out[2].field == "prompt"
    assert isinstance(out[3], Exception)


# ---- the onnxruntime path ----------------------------------------------------------------------------


def test_onnxruntime_path_imports_neither_torch_nor_transformers(build, tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(tmp_path / "x.png")
    (tmp_path / "r.txt").write_text("a fine film")
    code = ("import sys; from allspark.cli import main\n"
            "for m, f in (('rgb', sys.argv[2]), ('language', sys.argv[3])):\n"
            "    assert main(['run', sys.argv[1], '--modality', m, '--input', f, '--max-new-tokens', '4']) == 0\n"
            "print(sorted(k for k in ('torch', 'transformers') if k in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code, str(build), str(tmp_path / "x.png"), str(tmp_path / "r.txt")],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "ALLSPARK_CACHE": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("layout", ["components", "runtime"])
def test_a_repository_edit_never_alters_the_build(build, tmp_path, layout):
    from allspark.fsutil import sha256_file
    from allspark.serving.options import RepositoryOptions, Target
    from allspark.serving.repository import write_repository

    before = sha256_file(build / "rgb_head.onnx")
    write_repository(build, tmp_path / "repo", RepositoryOptions(target=Target.CPU, layout=layout))
    graph = tmp_path / "repo" / ("rgb_head/1/model.onnx" if layout == "components" else "allspark_runtime/1/rgb_head.onnx")
    assert graph.stat().st_ino != (build / "rgb_head.onnx").stat().st_ino  # a copy, not a hard link
    with open(graph, "r+b") as f:
        f.write(b"\0" * 16)
    assert sha256_file(build / "rgb_head.onnx") == before
