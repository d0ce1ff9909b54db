"""`allspark map`: whole scenes through a build, against the scenes' truth; resumption after a kill;
Ray Data against one process; the torch backend against onnxruntime; bad scenes and directories."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")

from allspark.demo import DEFAULT_CHECKPOINT
from allspark.mapping import Execution, MapError, MapSettings, run_map
from allspark.mapping.demo_scene import make_demo_scene
from allspark.mapping.plan import _starts, plan_scene
from allspark.mapping.scene import SceneInfo, write_scene

QUIET = Execution(progress=False)
OUTPUTS = ("classes.tif", "confidence.tif", "tiles.geojson", "preview.png")


@pytest.fixture(scope="module")
def demo_build(tmp_path_factory):
    """The trained demo checkpoint's rgb and hsi routes (maps can be checked against the truth)."""
    from allspark.export.build import export_build

    if not (DEFAULT_CHECKPOINT / "manifest.json").is_file():
        pytest.skip("the trained demo checkpoint is not in this checkout")
    out = tmp_path_factory.mktemp("mapbuild") / "b"
    # fp32: the backends are compared at 1e-4 (the checkpoint is fp16; export would follow it)
    export_build(DEFAULT_CHECKPOINT, out, modalities=["rgb", "hsi"], precision="fp32", progress=False)
    return out


@pytest.fixture(scope="module")
def rgb_scene(demo_build, tmp_path_factory):
    path, truth = make_demo_scene("rgb", tmp_path_factory.mktemp("scenes") / "mosaic.tif", demo_build, 6, 8, seed=3)
    return path, truth


def _info(w: int, h: int, transform=(10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0)) -> SceneInfo:
    return SceneInfo("x.tif", "x", w, h, 3, "uint8", None, transform, None, (1, 2, 3), 0, 0)


# ---- plans --------------------------------------------------------------------------------------

def test_windows_cover_the_scene_whole_and_cells_sit_at_their_centres():
    assert _starts(9, 4, 2) == [0, 2, 4, 5]  # the last window moved in to end at the edge
    assert _starts(8, 4, 4) == [0, 4] and _starts(4, 4, 4) == [0]
    p = plan_scene(_info(130, 100), "tile", 56, 28, batch=5)
    assert max(w.row for c in p.chunks for w in c) == 2 and max(w.col for c in p.chunks for w in c) == 3
    wins = [w for c in p.chunks for w in c]
    assert len(wins) == 12 and all(len(c) <= 5 for c in p.chunks)
    assert all(w.x + w.w <= 130 and w.y + w.h <= 100 for w in wins)
    assert max(w.x + w.w for w in wins) == 130 and max(w.y + w.h for w in wins) == 100
    # cells: stride-sized, offset by (tile - stride) // 2 from the scene's origin, clipped to the scene;
    # the raster: on the scene's grid at gcd(28, 14, 130, 100) = 2 px, from the scene's origin
    assert p.transform == (20.0, 0.0, 500000.0, 0.0, -20.0, 5000000.0) and (p.rows, p.cols) == (50, 65)
    assert p.cell_box(wins[0]) == (14, 14, 42, 42) and p.cell_box(wins[-1]) == (98, 70, 126, 98)
    assert plan_scene(_info(130, 100), "tile", 56, 28, batch=5, per_pixel=True).transform == _info(130, 100).transform

    q = plan_scene(_info(70, 45), "pixel", 32, 32, batch=8)
    covered = np.zeros((45, 70), int)
    for (w,) in q.chunks:
        covered[w.y:w.y + w.h, w.x:w.x + w.w] += 1
    assert (covered == 1).all() and q.transform == _info(70, 45).transform and (q.rows, q.cols) == (45, 70)


def test_settings_say_what_is_wrong():
    from allspark.errors import ConfigError

    for kw, words in ((dict(tile=8, stride=9), "stride"), (dict(bands=(0,)), "1-based"), (dict(batch=0), "--batch"),
                      (dict(scale=float("nan")), "--scale")):
        with pytest.raises(ConfigError, match=words):
            MapSettings("rgb", **kw)


# ---- maps against the truth ---------------------------------------------------------------------

def test_rgb_scene_maps_to_its_truth_georeferenced(demo_build, rgb_scene, tmp_path):
    from rasterio.warp import transform as reproject

    path, truth = rgb_scene
    s = run_map(demo_build, path, tmp_path / "out", MapSettings("rgb", batch=7), QUIET)
    with rasterio.open(tmp_path / "out" / "mosaic.classes.tif") as ds, rasterio.open(path) as src:
        classes, crs, t = ds.read(1), ds.crs, ds.transform
        assert ds.driver == "GTiff" and ds.colormap(1)[0][:3] == (31, 119, 180)
        assert json.loads(ds.tags()["LABELS"]) == s["labels"]
        assert crs == src.crs and t.a == src.transform.a * 56 and (t.c, t.f) == (src.transform.c, src.transform.f)
    with rasterio.open(tmp_path / "out" / "mosaic.confidence.tif") as ds:
        conf = ds.read(1)
    valid = truth >= 0
    assert classes.shape == truth.shape
    assert (classes[~valid] == 255).all() and (classes[valid] != 255).all()  # nodata exactly where it is
    assert (classes[valid] == truth[valid]).mean() >= 0.9
    assert np.isnan(conf[~valid]).all() and ((conf[valid] > 0) & (conf[valid] <= 1)).all()
    sc = s["scenes"][0]
    assert sc["predicted"] == valid.sum() and sc["nodata"] == (~valid).sum() and sc["failed"] == 0
    assert sum(sc["counts"].values()) == valid.sum()
    assert s["build"]["provenance"] and s["throughput"]["windows"] == truth.size

    features = json.loads((tmp_path / "out" / "mosaic.tiles.geojson").read_text())["features"]
    assert len(features) == valid.sum()
    f = features[0]["properties"]
    assert f["label"] == s["labels"][classes[f["row"], f["col"]]] and f["top"][0]["label"] == f["label"]
    lon, lat = zip(*features[0]["geometry"]["coordinates"][0])
    x, y = reproject("EPSG:4326", crs, list(lon), list(lat))  # back to the scene's CRS: the window's corners
    st = src.transform
    x0, y0 = st.c + st.a * f["window"][0], st.f + st.e * f["window"][1]
    assert abs(min(x) - x0) < 0.05 and abs(max(y) - y0) < 0.05
    assert (tmp_path / "out" / "mosaic.preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("per_pixel", [False, True])
def test_a_map_ends_where_its_scene_ends(demo_build, rgb_scene, tmp_path, per_pixel):
    """420 x 300 px with 56-px tiles (7.5 x 5.4 tiles): the rasters' bounds are the scene's, the GeoJSON
    footprints lie inside it and match the raster, and nodata pixels stay nodata."""
    path, _ = rgb_scene
    with rasterio.open(path) as ds:
        px, valid = np.moveaxis(ds.read(), 0, -1)[:300, :420].copy(), ds.dataset_mask()[:300, :420] > 0
    valid[:, 400:] = False  # the last 20 columns: nodata inside the last (clipped) column of cells
    px[~valid] = 0
    valid = ~(px == 0).all(-1)
    scene = write_scene(tmp_path / "odd.tif", px, 0)
    out = tmp_path / "out"
    run_map(demo_build, scene, out, MapSettings("rgb", per_pixel=per_pixel), QUIET)
    with rasterio.open(scene) as src, rasterio.open(out / "odd.classes.tif") as ds, \
            rasterio.open(out / "odd.confidence.tif") as conf:
        half = abs(src.transform.a) / 2
        for a, b in zip(ds.bounds, src.bounds):
            assert abs(a - b) < half, (ds.bounds, src.bounds)
        assert conf.bounds == ds.bounds and ds.crs == src.crs
        cell = 1 if per_pixel else 4  # gcd(56, 420, 300)
        assert ds.transform.a == src.transform.a * cell and (ds.width, ds.height) == (420 // cell, 300 // cell)
        classes, scores = ds.read(1), conf.read(1)
        empty = ~valid.reshape(300 // cell, cell, 420 // cell, cell).any(axis=(1, 3))
        assert empty[:, 400 // cell:].all() and not empty.all()
        assert ((classes == 255) == empty).all() and (np.isnan(scores) == empty).all()
        # the clipped last column of cells (392..400 px of data) carries its window's label
        feats = json.loads((out / "odd.tiles.geojson").read_text())["features"]
        right = max(f["properties"]["cell"][0] + f["properties"]["cell"][2] for f in feats)
        bottom = max(f["properties"]["cell"][1] + f["properties"]["cell"][3] for f in feats)
        assert (right, bottom) == (420, 300)
        from rasterio.warp import transform as reproject

        for f in feats:  # each footprint, back in the scene's CRS, is its cell: inside the scene, same label
            lon, lat = zip(*f["geometry"]["coordinates"][0])
            x, y = reproject("EPSG:4326", src.crs, list(lon), list(lat))
            assert min(x) > src.bounds.left - 0.05 and max(x) < src.bounds.right + 0.05
            assert min(y) > src.bounds.bottom - 0.05 and max(y) < src.bounds.top + 0.05
            x0, y0, w, h = f["properties"]["cell"]
            painted = classes[y0 // cell:(y0 + h) // cell, x0 // cell:(x0 + w) // cell]
            label = json.loads(ds.tags()["LABELS"]).index(f["properties"]["label"])
            assert set(np.unique(painted)) <= {label, 255} and (painted == label).any()  # only nodata differs


def test_hsi_cube_maps_per_pixel(demo_build, tmp_path):
    path, truth = make_demo_scene("hsi", tmp_path / "cube.tif", demo_build, 20, 27, seed=5)
    s = run_map(demo_build, path, tmp_path / "out", MapSettings("hsi", pixels=16, batch=128), QUIET)
    with rasterio.open(tmp_path / "out" / "cube.classes.tif") as ds:
        classes = ds.read(1)
    valid = truth >= 0
    assert (classes[~valid] == 255).all() and (classes[valid] == truth[valid]).mean() >= 0.85
    assert s["scenes"][0]["windows"] == 4 and s["throughput"]["pixels"] == 20 * 27  # 16 px blocks, edges smaller
    assert not (tmp_path / "out" / "cube.tiles.geojson").exists()


def test_torch_backend_maps_like_onnxruntime(demo_build, rgb_scene, tmp_path):
    path, _ = rgb_scene
    outs = {}
    for backend in ("onnxruntime", "torch"):
        run_map(demo_build, path, tmp_path / backend, MapSettings("rgb"), Execution(backend=backend, progress=False))
        with rasterio.open(tmp_path / backend / "mosaic.classes.tif") as a, \
                rasterio.open(tmp_path / backend / "mosaic.confidence.tif") as b:
            outs[backend] = a.read(1), b.read(1)
    assert (outs["torch"][0] == outs["onnxruntime"][0]).all()
    np.testing.assert_allclose(outs["torch"][1], outs["onnxruntime"][1], atol=1e-4)  # fp32 build


# ---- resumption ---------------------------------------------------------------------------------

def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "allspark", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def test_a_killed_run_resumes_to_the_same_outputs(demo_build, rgb_scene, tmp_path):
    path, _ = rgb_scene
    args = ["map", str(demo_build), "--modality", "rgb", "--input", str(path), "--batch", "5", "--quiet"]
    whole = _cli(*args, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    killed = _cli(*args, "--out", str(tmp_path / "run"), env={"ALLSPARK_MAP_KILL_AFTER": "3"})
    assert killed.returncode == -9  # SIGKILL after its third commit
    parts = tmp_path / "run" / "parts" / "mosaic"
    assert sorted(p.name for p in parts.iterdir()) == ["0000000.npz", "0000001.npz", "0000002.npz"]
    assert not list((tmp_path / "run").glob("mosaic.*"))  # no output before every chunk is in
    (parts / ".0000003.npz.tmp-999999").write_bytes(b"half a part")  # what a kill mid-write leaves
    resumed = _cli(*args, "--out", str(tmp_path / "run"))
    assert resumed.returncode == 0, resumed.stderr
    assert "(resumed)" in resumed.stdout and "resuming" in resumed.stderr
    for name in OUTPUTS:
        assert (tmp_path / "run" / f"mosaic.{name}").read_bytes() == (tmp_path / "whole" / f"mosaic.{name}").read_bytes(), name
    a, b = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("whole", "run"))
    assert a["scenes"] == b["scenes"] and b["throughput"]["chunks_run"] == len(list(parts.glob("0*.npz"))) - 3


def test_a_directory_of_other_settings_is_refused_and_kept(demo_build, rgb_scene, tmp_path):
    path, _ = rgb_scene
    out = tmp_path / "out"
    run_map(demo_build, path, out, MapSettings("rgb"), QUIET)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(MapError, match=r"other settings \(settings.stride: None there, 28 now"):
        run_map(demo_build, path, out, MapSettings("rgb", stride=28), QUIET)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing lost
    s = run_map(demo_build, path, out, MapSettings("rgb", stride=28), QUIET, overwrite=True)
    assert s["scenes"][0]["grid"] == [24, 32] and s["scenes"][0]["cell_px"] == 14  # gcd(28, 14, 448, 336)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(MapError, match="not empty and holds no map run"):
        run_map(demo_build, path, foreign, MapSettings("rgb"), QUIET, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "keep me"


# ---- bad scenes ---------------------------------------------------------------------------------

def test_bad_scenes_get_errors_that_say_what_was_expected(demo_build, rgb_scene, tmp_path, caplog):
    path, truth = rgb_scene
    with rasterio.open(path) as ds:
        px = np.moveaxis(ds.read(), 0, -1)
    four = write_scene(tmp_path / "four.tif", np.concatenate([px, px[..., :1]], -1), 0)
    with pytest.raises(MapError, match=r"rgb takes 3 band\(s\); the scene has 4; choose them with --bands"):
        run_map(demo_build, four, tmp_path / "a", MapSettings("rgb"), QUIET)
    with pytest.raises(MapError, match=r"--bands 5: the scene has bands 1..4"):
        run_map(demo_build, four, tmp_path / "a", MapSettings("rgb", bands=(1, 2, 5)), QUIET)
    s = run_map(demo_build, four, tmp_path / "b", MapSettings("rgb", bands=(1, 2, 3)), QUIET)
    assert s["scenes"][0]["predicted"] == (truth >= 0).sum()
    with pytest.raises(MapError, match=r"a 500 px tile is larger than the scene \(448 x 336 px\)"):
        run_map(demo_build, path, tmp_path / "c", MapSettings("rgb", tile=500), QUIET)
    with pytest.raises(MapError, match="mapped per pixel: --tile and --stride do not apply"):
        run_map(demo_build, path, tmp_path / "c", MapSettings("hsi", tile=8), QUIET)
    with pytest.raises(MapError, match="hsi takes 103 band"):
        run_map(demo_build, path, tmp_path / "c", MapSettings("hsi"), QUIET)
    with pytest.raises(MapError, match="language is not a raster modality; allspark map takes: rgb, msi, hsi, sar"):
        run_map(demo_build, path, tmp_path / "c", MapSettings("language"), QUIET)
    text = tmp_path / "notes.tif"
    text.write_text("not a raster")
    with pytest.raises(MapError, match="not a readable raster"):
        run_map(demo_build, text, tmp_path / "c", MapSettings("rgb"), QUIET)
    data = path.read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: len(data) // 2])  # truncated: the header reads, the pixels do not
    with pytest.raises(MapError, match="cannot read the window"):
        run_map(demo_build, cut, tmp_path / "d", MapSettings("rgb"), QUIET)
    assert (tmp_path / "d" / "run.json").is_file()  # the run can be resumed once the file is whole

    plain = write_scene(tmp_path / "plain.tif", px, 0, crs=None)
    with caplog.at_level("WARNING", logger="allspark"):
        run_map(demo_build, plain, tmp_path / "e", MapSettings("rgb"), QUIET)
    assert "has no CRS" in caplog.text
    meta = json.loads((tmp_path / "e" / "plain.tiles.geojson").read_text())["allspark"]
    assert "pixel" in meta["coordinates"]
    with rasterio.open(tmp_path / "e" / "plain.classes.tif") as ds:
        assert ds.crs is None


def test_nan_nodata_and_partial_windows_are_filled_not_failed(demo_build, rgb_scene, tmp_path):
    path, truth = rgb_scene
    with rasterio.open(path) as ds:
        px = np.moveaxis(ds.read(), 0, -1).astype(np.float32) / 255
    px[truth.repeat(56, 0).repeat(56, 1) < 0] = np.nan  # the nodata corner as NaN, no nodata tag
    px[:10, :10] = np.nan  # part of the first window
    scene = write_scene(tmp_path / "float.tif", px, None)
    s = run_map(demo_build, scene, tmp_path / "out", MapSettings("rgb"), QUIET)
    sc = s["scenes"][0]
    assert sc["nodata"] == (truth < 0).sum() and sc["failed"] == 0 and sc["predicted"] == (truth >= 0).sum()


def test_many_scenes_are_one_job(demo_build, rgb_scene, tmp_path):
    path, _ = rgb_scene
    d = tmp_path / "scenes"
    d.mkdir()
    for name in ("a", "b"):
        (d / f"{name}.tif").write_bytes(path.read_bytes())
    s = run_map(demo_build, d, tmp_path / "out", MapSettings("rgb"), QUIET)
    assert [x["id"] for x in s["scenes"]] == ["a", "b"] and s["scenes"][0]["counts"] == s["scenes"][1]["counts"]
    assert run_map(demo_build, str(d / "*.tif"), tmp_path / "out", MapSettings("rgb"), QUIET)["throughput"]["resumed"]


def test_cli_reports_bad_input_without_a_traceback(demo_build, rgb_scene, tmp_path):
    path, _ = rgb_scene
    r = _cli("map", str(demo_build), "--modality", "rgb", "--input", str(path), "--out", str(tmp_path / "o"),
             "--tile", "999")
    assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr and "--tile <=" in r.stderr
    r = _cli("demo-scene", "sar", str(tmp_path / "sar.tif"), "--rows", "2", "--cols", "3")
    assert r.returncode == 0, r.stderr
    with rasterio.open(tmp_path / "sar.tif") as ds:
        assert ds.count == 2 and ds.crs.to_epsg() == 32633 and ds.width == 3 * 48


# ---- Ray ----------------------------------------------------------------------------------------

def test_ray_data_run_matches_the_single_process_run(demo_build, rgb_scene, tmp_path):
    pytest.importorskip("ray.data")
    path, _ = rgb_scene
    run_map(demo_build, path, tmp_path / "one", MapSettings("rgb", batch=6), QUIET)
    s = run_map(demo_build, path, tmp_path / "ray", MapSettings("rgb", batch=6),
                Execution(ray="", workers=2, progress=False))
    assert s["execution"]["ray"] == {"address": "local", "workers": 2} and s["throughput"]["ray"]["cpus"] == 2
    for name in OUTPUTS:
        assert (tmp_path / "ray" / f"mosaic.{name}").read_bytes() == (tmp_path / "one" / f"mosaic.{name}").read_bytes(), name


def test_a_build_shipped_through_ray_unpacks_once_per_node_and_verifies(build, tmp_path, monkeypatch):
    import tempfile

    from allspark.contract.integrity import verify_files
    from allspark.contract.manifest import read_manifest
    from allspark.mapping.ray_runner import pack_build, unpack_build

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # this "node"'s temp dir
    digest, data = pack_build(build)
    first = unpack_build(digest, data)
    assert first == str(tmp_path / "allspark-builds" / digest)
    verify_files(first, read_manifest(first))  # every hashed file arrived intact
    assert unpack_build(digest, b"not read again") == first  # once per node
