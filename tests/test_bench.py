"""`allspark bench` runs on `tiny` in seconds and writes a well-formed report (no timing asserted)."""

from __future__ import annotations

import json

import pytest

from allspark.bench.report import (
    PLOTS,
    ReportSchemaError,
    validate_results,
    write_report,
)
from allspark.bench.runner import BenchConfig, run_bench


@pytest.fixture(scope="module")
def results(build):
    cfg = BenchConfig(backends=("torch", "onnxruntime"), modalities=("rgb", "language"), batches=(1, 2),
                      repeat=2, warmup=1, gen_tokens=3, decode_tokens=4)
    return run_bench(build, cfg, progress=False)


def test_report_is_well_formed(results, tmp_path):
    files = write_report(results, tmp_path)
    assert {f.name for f in files} == {"bench.json", "REPORT.md", *PLOTS}
    r = json.loads((tmp_path / "bench.json").read_text())
    validate_results(r)
    assert set(r["latency"]) == {"rgb", "language"}
    for m in r["latency"]:
        for b in ("1", "2"):
            for n in ("torch", "onnxruntime"):
                st = r["latency"][m][b][n]
                assert st["total"]["n"] == 2 and st["total"]["median_ms"] > 0
                assert st["decoder"]["median_ms"] > 0
    assert r["latency"]["rgb"]["1"]["onnxruntime"]["encoder"]["median_ms"] > 0
    assert r["latency"]["language"]["1"]["torch"]["generate"]["median_ms"] > 0
    assert r["flops"]["rgb"]["1"]["decoder"] > 0 and r["flops"]["rgb"]["2"]["decoder"] > r["flops"]["rgb"]["1"]["decoder"]
    assert 0 < r["efficiency"]["rgb"]["1"]["onnxruntime"]["decoder"]["fraction_of_peak"]
    assert r["machine"]["matmul"]["peak_gflops"] > 0 and r["machine"]["gpu"]
    assert set(r["generation"]) == {"torch", "onnxruntime"} and r["generation"]["onnxruntime"]["tokens_per_s"] > 0
    assert set(r["targets"]) == {"e2e_onnxruntime_vs_torch", "decode_step_vs_torch"}
    md = (tmp_path / "REPORT.md").read_text()
    assert "## Targets" in md and "No GPU was available" in md and "![speedup.png](speedup.png)" in md


def test_schema_check_rejects_broken_results(results):
    bad = json.loads(json.dumps(results))
    bad["latency"]["rgb"]["1"]["torch"]["total"] = {"median_ms": 5.0, "p90_ms": 1.0}
    with pytest.raises(ReportSchemaError, match="malformed"):
        validate_results(bad)
    with pytest.raises(ReportSchemaError, match="'throughput'"):
        validate_results({k: v for k, v in results.items() if k != "throughput"})


def test_bad_bench_config():
    with pytest.raises(ValueError, match="unknown"):
        BenchConfig(backends=("tensorflow",))


def test_cli_routes_bench_build(build, tmp_path, capsys):
    from allspark.cli import main

    assert main(["bench", str(build), "--backends", "onnxruntime", "--modalities", "sar", "--batch", "1",
                 "--repeat", "1", "--warmup", "0", "--out", str(tmp_path / "r"), "--quiet"]) == 0
    assert (tmp_path / "r" / "REPORT.md").is_file()


def test_adapter_bench_writes_rows_ideals_and_goals(tmp_path):
    """`allspark bench adapters` on a toy size: every case, the ideal and the split alternative
    are there (no timing is asserted)."""
    from allspark.bench.adapters import Dims, markdown, run_bench

    toy = Dims("toy", hidden=32, heads=2, intermediate=48, layers=2, adapter_size=8, sets=4, vocab=64, past=8, prefill=4)
    r = run_bench({"toy": toy}, batches=(1, 4), set_counts=(1, 4), repeat=1, progress=False)
    rows = r["sizes"]["toy"]["rows"]
    assert {(x["phase"], x["batch"], x["sets"]) for x in rows} == {
        (p, b, s) for p in ("decode", "prefill") for b, s in ((1, 1), (4, 1), (4, 4))}
    for x in rows:
        assert all(x[k] > 0 for k in ("none", "shared", "gather", "moe", "split_decoders"))
        assert ("ideal" in x) == (x["phase"] == "decode")
    assert r["bandwidth_gbs"] > 0 and "toy: moe vs memory-bound ideal, batch >= 8" not in r["targets"]
    assert "| 4 | 4 |" in markdown(r)


def _serve_report(rgb_rows: dict[str, float]) -> dict:
    """A minimal `allspark bench serve` report: rgb (single-pass) and language (generation)."""
    def levels(rps1, rps32):
        return [{"concurrency": c, "requests": 100, "errors": 0, "first_error": None, "p50_ms": 5.0, "p99_ms": 9.0,
                 "throughput_rps": rps, "entry_mean_batch": None, "decoder_mean_batch": None}
                for c, rps in ((1, rps1), (32, rps32))]

    def pair(local, served):
        return {"in_process": {"p50_ms": local, "p99_ms": local}, "server": {"p50_ms": served, "p99_ms": served},
                "p50_overhead_ms": served - local, "server_ms_per_request_by_model": {}}

    return {"machine": {"cpus": 2, "load_average_at_start": [0.1, 0.1, 0.1]}, "preset": "demo",
            "options": {"protocol": "grpc", "threads": 1, "max_requests": 100, "max_seconds": 4.0,
                        "max_new_tokens": 16},
            "server": {"batching": {"modalities": {"rgb": levels(200, 500), "language": levels(100, 200)},
                                    "paired": {"rgb": pair(3.0, 4.5), "language": pair(10.0, 10.8)}}},
            "in_process_ms_per_row": {"rgb": rgb_rows, "language": {"1": 7.0, "8": 2.4, "32": 2.0}},
            "components": {}}


def test_serve_report_judges_targets_and_names_the_batching_ceiling():
    from allspark.serving.bench import judge, markdown

    r = _serve_report({"1": 3.4, "8": 2.0, "32": 1.7})
    r["targets"] = t = judge(r)
    rgb, lang = t["per_modality"]["rgb"], t["per_modality"]["language"]
    assert rgb["overhead_met"] and rgb["gain_c_max_vs_c1"] == 2.5 and rgb["gain_met"] is False
    assert rgb["in_process_c_max_speedup_per_row"] == 2.0
    assert lang["overhead_met"] and lang["p50_overhead_rel"] == pytest.approx(0.08)
    assert lang["gain_c_max_vs_c1"] == 2.0 and lang["gain_met"] is False and t["generation_gain_met_all"] is False
    md = markdown(r)
    assert "continuous batching): NOT met (language 2.0x)" in md
    assert "* rgb: 3.40 -> 2.00 -> 1.70 (2.0x)" in md
    assert "batching 32 rows makes a single-pass row rgb 2.0x cheaper" in md
    assert "| - |" in md  # no batching-off run: no "Nonex"
    only_gen = _serve_report({"1": 3.4, "8": 2.0, "32": 1.7})
    for part in ("modalities", "paired"):
        del only_gen["server"]["batching"][part]["rgb"]
    only_gen["targets"] = judge(only_gen)
    assert "single-pass" not in markdown(only_gen).split("Errors during the runs")[1]  # nothing judged of none
    assert only_gen["targets"]["overhead_met_all"] is None and only_gen["targets"]["gain_met_all"] is None
    assert lang["floor_rel"] is None and "the floor" not in md  # a report without the floor still renders
    r["floor"] = {"p50_ms": 0.75, "p99_ms": 0.9, "requests": 200}
    t = judge(r)["per_modality"]["language"]
    assert t["floor_rel"] == pytest.approx(0.075) and t["overhead_above_floor_ms"] == pytest.approx(0.05)
    r["targets"] = judge(r)
    assert "p50 0.75 ms, which alone is language 7.5% of the in-process p50; above it: language +0.05 ms" in markdown(r)
    # a report from before batch 32 was measured still renders
    r = _serve_report({"1": 3.4, "8": 2.0})
    r["targets"] = judge(r)
    assert r["targets"]["per_modality"]["rgb"]["in_process_c_max_speedup_per_row"] is None
    assert "* rgb: 3.40 -> 2.00 (1.7x)" in markdown(r)


def test_serve_load_counts_clients_that_cannot_connect_and_returns():
    """`bench serve`'s load generator: clients that fail before the clock starts are counted as
    errors, and the level ends at once (no client waits at the start line for the others)."""
    pytest.importorskip("tritonclient.grpc")
    import socket
    import time

    from allspark.serving.bench import load

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = time.perf_counter()
    r = load(f"127.0.0.1:{port}", "grpc", "rgb", {}, 3, 10, 0.5, 16)
    assert time.perf_counter() - t < 30
    assert r["requests"] == 0 and r["errors"] == 3 and r["throughput_rps"] == 0.0 and r["first_error"]


@pytest.mark.server
def test_serve_floor_times_a_model_that_does_nothing(tmp_path):
    """`bench serve`'s floor: a real server with one do-nothing model answers generation-shaped
    requests over a kept gRPC stream; its round trips are timed."""
    from allspark.serving.floor import measure
    from allspark.serving.server import ServerError, triton_home

    try:
        triton_home()
    except (ImportError, ServerError) as e:
        pytest.skip(f"no Triton server on this machine: {e}")
    f = measure(tmp_path, repeats=20)
    assert f["requests"] == 20 and 0 < f["p50_ms"] <= f["p99_ms"] < 1000
