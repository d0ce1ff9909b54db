"""`allspark run` reads every supported input format and answers as `Runtime.predict` does."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from allspark.cli import main
from allspark.model.readers import read_input
from allspark.runtime import GenerationConfig, Runtime


@pytest.fixture(scope="module")
def rt(build):
    return Runtime.load(build)


def _write_ply(path, pts, binary):
    header = ["ply", f"format {'binary_little_endian' if binary else 'ascii'} 1.0", f"element vertex {len(pts)}",
              "property float x", "property float y", "property float z", "element face 0",
              "property list uchar int vertex_indices", "end_header"]
    with open(path, "wb") as f:
        f.write(("\n".join(header) + "\n").encode())
        if binary:
            f.write(pts.astype("<f4").tobytes())
        else:
            f.write("\n".join(" ".join(f"{v:.6f}" for v in p) for p in pts).encode() + b"\n")


def _cases(tmp_path, rng):
    import tifffile

    img = rng.integers(0, 256, (30, 33, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "scene.png")
    Image.fromarray(img).save(tmp_path / "scene.jpg", quality=95)
    msi = rng.uniform(0, 0.4, (13, 20, 20)).astype(np.float32)  # bands first, as GeoTIFFs often are
    tifffile.imwrite(tmp_path / "msi.tif", msi)
    sar = rng.gamma(1.0, 1.0, (32, 32, 2)).astype(np.float32)
    np.save(tmp_path / "sar.npy", sar)
    tifffile.imwrite(tmp_path / "sar1.tiff", sar[..., 0])
    spec = rng.uniform(0, 1, (1, 1, 103)).astype(np.float32)
    tifffile.imwrite(tmp_path / "hsi.tif", spec)
    np.save(tmp_path / "hsi.npy", spec[0, 0])
    (tmp_path / "table.csv").write_text("hour,month,station," + ",".join(f"c{i}" for i in range(9)) + "\n"
                                        + "3,7,11," + ",".join(f"{v:.4f}" for v in rng.normal(size=9)) + "\n")
    traj = np.cumsum(rng.normal(0.4, 0.1, (8, 2)), 0)
    (tmp_path / "traj.csv").write_text("x,y\n" + "\n".join(f"{a:.5f},{b:.5f}" for a, b in traj) + "\n")
    pts = rng.normal(size=(90, 3)).astype(np.float32)
    np.save(tmp_path / "pc.npy", pts)
    _write_ply(tmp_path / "pc.ply", pts, binary=False)
    _write_ply(tmp_path / "pcb.ply", pts, binary=True)
    np.savetxt(tmp_path / "pc.xyz", pts, fmt="%.6f")
    np.savetxt(tmp_path / "pc.txt", pts, fmt="%.6f")
    np.savez(tmp_path / "graph.npz", series=rng.uniform(0, 70, (12, 12, 1)).astype(np.float32),
             time_of_day=np.int64(100), day_of_week=np.int64(3))
    (tmp_path / "review.txt").write_text("the acting was wonderful and the plot was great")
    (tmp_path / "snippet.py").write_text("def add(a, b):\n    return a + b\n")
    return {
        ("rgb", "scene.png"): {"image": img}, ("rgb", "scene.jpg"): None,
        ("msi", "msi.tif"): {"image": np.moveaxis(msi, 0, -1)},
        ("sar", "sar.npy"): {"image": sar}, ("sar", "sar1.tiff"): {"image": sar[..., :1]},
        ("hsi", "hsi.tif"): {"spectrum": spec.ravel()}, ("hsi", "hsi.npy"): {"spectrum": spec.ravel()},
        ("table", "table.csv"): None, ("trajectory", "traj.csv"): {"observed": traj},
        ("point_cloud", "pc.npy"): {"points": pts}, ("point_cloud", "pc.ply"): {"points": pts},
        ("point_cloud", "pcb.ply"): {"points": pts}, ("point_cloud", "pc.xyz"): {"points": pts},
        ("point_cloud", "pc.txt"): {"points": pts}, ("graph", "graph.npz"): None,
        ("language", "review.txt"): {"text": "the acting was wonderful and the plot was great"},
        ("code", "snippet.py"): {"text": "def add(a, b):\n    return a + b\n"},
    }


def test_every_input_format(rt, build, tmp_path, capsys):
    cases = _cases(tmp_path, np.random.default_rng(3))
    assert {m for m, _ in cases} == set(rt.modalities)
    for (m, name), expected in cases.items():
        inputs = read_input(m, tmp_path / name, rt.config.modality(m))
        if expected is not None:  # the reader reproduces the array (to text precision)
            for k, v in expected.items():
                if isinstance(v, str):
                    assert inputs[k] == v
                else:
                    np.testing.assert_allclose(np.asarray(inputs[k], np.float64), np.asarray(v, np.float64), atol=1e-5, err_msg=name)
        assert main(["run", str(build), "--modality", m, "--input", str(tmp_path / name), "--json",
                     "--max-new-tokens", "8"]) == 0, name
        got = json.loads(capsys.readouterr().out)
        want = rt.predict(m, inputs, generation=GenerationConfig(max_new_tokens=8)).to_json()
        for key in ("label", "text", "tokens"):
            assert got.get(key) == want.get(key), (name, key)
        if "values" in want:
            np.testing.assert_allclose(got["values"], want["values"], rtol=1e-5, err_msg=name)


def test_bad_files_are_input_errors(rt, build, tmp_path, capsys):
    (tmp_path / "x.bmp").write_bytes(b"BM")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "two.csv").write_text("1,2,3\n4,5,6\n")
    for m, f, fragment in [("rgb", "x.bmp", "the file types rgb takes"), ("rgb", "broken.png", "readable .png"),
                           ("table", "two.csv", "one data row"), ("rgb", "missing.png", "an existing file")]:
        assert main(["run", str(build), "--modality", m, "--input", str(tmp_path / f)]) == 2
        assert fragment in capsys.readouterr().err, f
