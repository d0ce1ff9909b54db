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
