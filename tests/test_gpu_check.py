"""`make gpu-check`'s CPU-side parts: wheels it would install, the device folder, the summary and
its targets from benchmark JSON (the GPU stages themselves run only on a CUDA machine)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

from allspark.bench import gpu_check as g


def test_missing_wheels_skips_what_is_installed(tmp_path):
    import numpy

    have = tmp_path / f"numpy-{numpy.__version__}-cp311-cp311-manylinux_2_17_x86_64.whl"
    other = tmp_path / "numpy-0.0.1-cp311-cp311-manylinux_2_17_x86_64.whl"
    absent = tmp_path / "onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl"
    assert g.wheel_dist(absent) == ("onnxruntime-gpu", "1.31.1")
    assert g.missing_wheels([have, other, absent]) == [other, absent]
    assert g.install_wheels(tmp_path / "none", tmp_path / "site") == []


def test_device_slug():
    assert g.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert g.device_slug("NVIDIA H200") == "nvidia-h200"
    assert g.device_slug("") == "unknown-device"


def test_summary_reads_targets_from_the_benchmarks(tmp_path):
    out = tmp_path / "dev"
    out.mkdir()
    (out / "stage-env.json").write_text(json.dumps({"stage": "env", "rc": 0, "seconds": 1.0, "facts": {
        "gpu": "NVIDIA H100 80GB HBM3", "nvidia_smi": "NVIDIA H100 80GB HBM3, 580.1, 81559 MiB", "torch": "2.11"}}))
    (out / "stage-tests.json").write_text(json.dumps({"stage": "tests", "rc": 1, "seconds": 30.0}))
    cases = [{"name": "bridge_xattn_n577", "dispatch": "triton",
              "results": {"triton": {"ms": 0.5}, "sdpa": {"ms": 0.6}, "auto": {"ms": 1.2}}},
             {"name": "eva_self_attn", "dispatch": "sdpa",
              "results": {"triton": {"ms": 2.0}, "sdpa": {"ms": 1.0}, "auto": {"ms": 1.02}}},
             {"name": "decoder_decode_n2048", "dispatch": "triton",
              "results": {"triton": {"ms": 0.1, "frac_peak_bw": 0.8}, "sdpa": {"ms": 0.2}, "auto": {"ms": 0.1}}}]
    adapters = [{"preset": "paper", "H": 4096, "r": 2048, "rows": 1, "sets_used": 1, "min_programs": 264,
                 "results": {"default": {"ms": 0.05, "tbps": 0.7}, "narrow": {"ms": 0.02, "tbps": 1.75}},
                 "narrow_speedup": 2.5}]
    (out / "kernels.json").write_text(json.dumps({"gpu_cases": cases, "adapter_cases": adapters}))
    rows = {"1": {"ratios": {"graphs_vs_static_eager": 4.0}}, "8": {"ratios": {"graphs_vs_static_eager": 3.5,
                                                                               "ort_device_vs_host": 1.2,
                                                                               "ort_static_vs_host": 1.5}}}
    (out / "decode.json").write_text(json.dumps({"presets": {"demo": {"1": rows["1"]}, "base": rows}}))
    stream = {"modality": "language", "streams": 8, "tokens": 64, "served_tokens_per_s": 930.0,
              "in_process_tokens_per_s": 1000.0}
    (out / "server_check.json").write_text(json.dumps({
        "modalities": {"rgb": {"p50_ms": 3.0, "same_answer_as_in_process": True}},
        "build": {"preset": "base", "precision": "fp16", "synthetic_weights": True},
        "streams": {**stream, "ratio": 0.93, "every_token": False},
        "streams_token_by_token": {**stream, "served_tokens_per_s": 800.0, "ratio": 0.8, "every_token": True}}))
    js, md = g.write_summary(out)
    t = json.loads(js.read_text())["targets"]
    # by dispatch where the kernel runs (0.6 / 1.2); the shape that runs SDPA counts as noise, not a loss
    assert t["kernel_vs_sdpa"]["measured"] == 0.5 and t["kernel_vs_sdpa"]["met"] is False
    assert "1 shapes run SDPA by dispatch (0.980-0.980" in t["kernel_vs_sdpa"]["by"]
    assert "kernel alone min 0.5" in t["kernel_vs_sdpa"]["by"]
    assert t["decode_hbm_fraction"]["met"] is True
    assert t["graphs_vs_eager"]["measured"] == 3.5 and t["graphs_vs_eager"]["met"] is True
    assert t["ort_device_vs_host"]["measured"] == 1.5 and t["ort_device_vs_host"]["met"] is False
    assert t["ort_device_vs_host"]["by"] == "static cache"  # the better of the growing and static loops
    assert t["served_streams_vs_device_loop"]["measured"] == 0.93 and t["served_streams_vs_device_loop"]["met"] is True
    assert t["served_streams_vs_device_loop"]["by"] == "base build, synthetic weights"
    text = md.read_text()
    assert "NVIDIA H100 80GB HBM3" in text and "FAILED (rc 1)" in text and "| build | not run |" in text
    assert "| 1.5 (static cache) | NO |" in text
    assert "8 served language streams of 64 tokens, the final response only: 930.0 tokens/s" in text
    assert "serving the base build (fp16, synthetic weights: timing only)" in text
    assert "| paper | 4096, 2048 | 1 | 1 | 0.0500 (0.70) | 0.0200 (1.75) | 2.50 |" in text
    assert "a response per token: 800.0 tokens/s against 1000.0 in process (0.8x)" in text


def test_without_a_gpu_it_says_so(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit, match="no CUDA GPU"):
        g.run_stages(["env"], tmp_path, Path("."), None, 10)


def test_pth_puts_the_private_site_first(tmp_path, monkeypatch):
    import site

    monkeypatch.setattr(site, "getsitepackages", lambda: [str(tmp_path)])
    pth = g.put_first_on_path(tmp_path / "private")
    text = pth.read_text()
    assert pth.parent == tmp_path and text.startswith("import sys; sys.path[0:0] = [")
    assert str(tmp_path / "private") in text and str(g.REPO) in text


@pytest.mark.server
def test_server_check_answers_like_the_runtime(build):
    """The gpu-check server stage on this machine's CPU: a real tritonserver, every modality."""
    pytest.importorskip("tritonclient.grpc")
    from allspark.bench.server_check import check

    res = check(build, [], repeats=2, max_new_tokens=3, streams=4, stream_tokens=6, stream_repeats=1)
    assert res["all_same"], res["modalities"]
    assert len(res["modalities"]) == 10 and all(r["p50_ms"] > 0 for r in res["modalities"].values())
    s = res["streams"]  # issue 27's GPU target, rehearsed: 4 served streams against a 4-row batch
    assert s["modality"] == "language" and not s["errors"] and s["ratio"] > 0
    assert s["served_tokens_per_s"] > 0 and s["in_process_tokens_per_s"] > 0
    t = res["streams_token_by_token"]  # the same, a response per token
    assert t["every_token"] and not t["errors"] and t["ratio"] > 0 and not s["every_token"]
    assert res["build"] == {"preset": "tiny", "precision": "fp32", "synthetic_weights": False}


@pytest.mark.server
def test_a_skeleton_build_is_filled_there_and_served(build, tmp_path):
    """What the next GPU session carries for issue 27's base target: a build without weights
    (`--build SKELETON`), filled with seeded weights before the server stage, which names it."""
    pytest.importorskip("tritonclient.grpc")
    from allspark.bench.skeleton import strip_build

    skel = tmp_path / "skeleton"
    strip_build(build, skel)
    out = tmp_path / "dry"
    assert g.main(["--dry-run", "--stages", "server", "--build", str(skel), "--out", str(out)]) == 0
    res = json.loads((out / "server_check.json").read_text())
    assert res["all_same"] and res["build"]["synthetic_weights"] and res["streams"]["ratio"] > 0
    summary = json.loads((out / "summary.json").read_text())["targets"]["served_streams_vs_device_loop"]
    assert summary["by"] == "tiny build, synthetic weights" and summary["measured"] == res["streams"]["ratio"]


def test_plan_lists_each_stage_with_its_time_box(capsys):
    assert g.main(["--plan", "--stages", "env", "paper", "kernels"]) == 0
    out = capsys.readouterr().out
    for stage in ("env", "paper", "kernels"):
        exp, box = g.STAGE_SECONDS[stage]
        assert any(line.startswith(stage) and f"{exp} s" in line and f"{box} s" in line for line in out.splitlines())
    assert "allspark.bench.gpu_paper" in out and "total" in out and "tests" not in out


def test_dry_run_rehearses_the_paper_stage_on_the_cpu(tmp_path):
    """The paper stage's script on the tiny preset (CPU, eager): every section runs and the result
    says it is a rehearsal, not a measurement."""
    out = tmp_path / "dry"
    assert g.main(["--dry-run", "--stages", "env", "paper", "--out", str(out)]) == 0
    stage = json.loads((out / "stage-paper.json").read_text())
    assert stage["rc"] == 0 and stage["time_box"] == g.STAGE_SECONDS["paper"][1], stage.get("tail")
    paper = json.loads((out / "paper.json").read_text())
    assert paper["preset"] == "tiny" and paper["targets"].startswith("not evaluated")
    for section in ("rgb", "decode", "mixed"):
        assert "error" not in paper[section], paper[section]
    assert paper["rgb"]["backend_eager"]["same_label_as_reference"]
    assert paper["mixed"]["decode torch-static"]["mixed_vs_single"] > 0
    assert "Paper size on the device" in (out / "README.md").read_text()


def test_a_stage_past_its_box_cleans_up_and_leaves_nothing_running(tmp_path):
    """The time box ends the stage's whole process group, SIGTERM first: the stage's own cleanup runs
    (server_check removes its copy of the build), and a child it started does not outlive it."""
    import os
    import sys
    import time

    marker, child = tmp_path / "cleaned", tmp_path / "child.pid"
    script = (
        "import signal, subprocess, sys, time, pathlib\n"
        f"p = subprocess.Popen(['sleep', '60']); pathlib.Path({str(child)!r}).write_text(str(p.pid))\n"
        f"signal.signal(signal.SIGTERM, lambda *_: (pathlib.Path({str(marker)!r}).write_text('yes'), sys.exit(124)))\n"
        "print('started', flush=True); time.sleep(60)\n")
    t = time.perf_counter()
    r = g._run("box", [sys.executable, "-c", script], dict(os.environ), timeout=3)
    assert r["rc"] == 124 and "started" in r["tail"] and time.perf_counter() - t < 3 + g.TERM_GRACE_S
    assert marker.read_text() == "yes"
    pid = int(child.read_text())
    for _ in range(50):  # reaped by init once killed: gone from the process table
        if not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z":
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the stage's child outlived the stage")
    ok = g._run("fine", [sys.executable, "-c", "print('done')"], dict(os.environ), timeout=30)
    assert ok["rc"] == 0 and "done" in ok["tail"]


def test_a_failed_int4_way_is_reported_not_a_crash_of_the_summary(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "decode-int4.json").write_text(json.dumps({"presets": {"paper": {"1": {
        "onnxruntime-device": {"error": "RuntimeError: no CUDA provider"}}}}}))
    js, _ = g.write_summary(out)
    t = json.loads(js.read_text())["targets"]["int4_decode_ms"]
    assert t["measured"] is None and t["met"] is None


def test_a_skeleton_that_cannot_be_filled_skips_its_stages_with_the_reason(tmp_path):
    skel = tmp_path / "broken"
    skel.mkdir()
    (skel / "manifest.json").write_text(json.dumps({"skeleton": {"x": 1}}))  # no valid manifest behind the mark
    out = tmp_path / "dry"
    assert g.main(["--dry-run", "--stages", "server", "--build", str(skel), "--out", str(out)]) == 0
    skipped = json.loads((out / "stage-server.json").read_text())["skipped"]
    assert skipped.startswith(f"could not fill the skeleton build {skel}")
    assert not (Path(tempfile.gettempdir()) / "allspark-gpu-filled" / "broken").exists()
