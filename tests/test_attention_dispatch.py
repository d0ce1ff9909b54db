"""The attention dispatch rule (kernel or SDPA on CUDA, by the measured table): the committed
table, its validation, the op's auto path on a mocked CUDA call, and the table writer. CPU only."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from allspark.errors import ConfigError
from allspark.kernels import dispatch, op
from allspark.kernels.dispatch import DispatchTableError, choose, load_table, parse_table, table_from_bench

REPO = Path(__file__).resolve().parents[1]
H100_BENCH = REPO / "docs" / "benchmarks" / "gpu" / "nvidia-h100-80gb-hbm3" / "kernels.json"


def qk(B, H, n_q, n_k, D, dtype=torch.float16):
    # shapes are all the rule reads: empty storage is enough
    return torch.empty(B, H, n_q, D, dtype=dtype), torch.empty(B, H, n_k, D, dtype=dtype)


@pytest.fixture(autouse=True)
def _committed_table(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_TABLE, raising=False)
    dispatch.reset_cache()
    yield
    dispatch.reset_cache()


# ---- the rule on the committed (H100) table ------------------------------------------------------


def test_committed_table_loads_and_names_its_device():
    table = load_table()
    assert table.device == "NVIDIA H100 80GB HBM3"
    assert table.threshold == 1.0 and len(table.entries) >= 20
    assert Path(table.path) == dispatch.TABLE_PATH


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_eva_shape_goes_to_sdpa(dtype):
    """EVA's self-attention (8x16 heads, 901x901, head dim 88): the kernel measured 2.5x SDPA's time."""
    assert choose(*qk(8, 16, 901, 901, 88, dtype), None, False) == "sdpa"
    assert choose(*qk(1, 16, 901, 901, 88, dtype), torch.ones(1, 901, dtype=torch.bool), False) == "sdpa"
    d = load_table().decide(str(dtype).removeprefix("torch."), 88, 901, 901, False)
    assert d.reason == "exact" and d.entries[0].ratio > 2.0


@pytest.mark.parametrize("shape,causal", [
    ((8, 8, 32, 901, 64), False),  # the paper bridge's cross-attention over EVA's tokens
    ((8, 8, 32, 197, 64), False),
    ((8, 32, 96, 96, 128), True),  # the paper decoder's prefill
    ((8, 4, 17, 17, 16), False),  # the demo EVA
])
def test_measured_wins_go_to_triton(shape, causal):
    assert choose(*qk(*shape), None, causal) == "triton"
    assert choose(*qk(*shape, dtype=torch.bfloat16), None, causal) == "triton"


def test_decode_shapes_go_to_sdpa():
    """One query over the cache: the kernel tied or lost (1.01-1.27x SDPA's time)."""
    for D, n_k in ((128, 512), (128, 2048), (32, 512), (128, 700)):
        assert choose(*qk(8, 32, 1, n_k, D), None, False) == "sdpa"


def test_near_and_default_rules():
    table = load_table()
    near = table.decide("float16", 64, 32, 300, False)  # bridge over 300 tokens: between 197 and 577
    assert near.impl == "triton" and near.reason == "near"
    assert table.decide("float16", 128, 200, 200, True).impl == "triton"  # prefill of 200
    assert table.decide("float16", 96, 64, 64, False) == dispatch.Decision("sdpa", "default: shape not measured")
    assert table.decide("float16", 64, 4096, 4096, False).impl == "sdpa"  # far from anything measured
    assert table.decide("float32", 64, 32, 901, False).impl == "sdpa"  # fp32: never timed
    assert table.decide("float16", 128, 96, 96, False).impl == "sdpa"  # not causal: not measured


def test_same_class_takes_the_worst_ratio():
    t = parse_table(dict(format=dispatch.FORMAT, device="X", entries=[
        dict(head_dim=64, n_q=32, n_k=600, causal=False, dtype="float16", ratio=0.8),
        dict(head_dim=64, n_q=32, n_k=900, causal=False, dtype="float16", ratio=1.1)]))
    assert t.decide("float16", 64, 32, 700, False).impl == "sdpa"


# ---- the table file validates -------------------------------------------------------------------


def _good():
    return json.loads(dispatch.TABLE_PATH.read_text())


@pytest.mark.parametrize("mutate,fragment", [
    (lambda d: d.update(format="v0"), "format"),
    (lambda d: d.pop("device"), "device"),
    (lambda d: d.update(threshold=-1), "threshold"),
    (lambda d: d.update(entries={}), "entries: expected a list"),
    (lambda d: d["entries"].append(3), "entries[28]: expected an object"),
    (lambda d: d["entries"][0].pop("ratio"), "entries[0].ratio"),
    (lambda d: d["entries"][1].update(head_dim="88"), "entries[1].head_dim"),
    (lambda d: d["entries"][2].update(causal=1), "entries[2].causal"),
    (lambda d: d["entries"][3].update(dtype="fp8"), "entries[3].dtype"),
    (lambda d: d["entries"][4].update(ratio=0), "entries[4].ratio"),
    (lambda d: d["entries"][5].update(n_k=0), "entries[5]"),
])
def test_malformed_table_names_the_file(tmp_path, mutate, fragment):
    data = _good()
    assert len(data["entries"]) == 28
    mutate(data)
    path = tmp_path / "bad_dispatch.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DispatchTableError) as e:
        load_table(path)
    assert str(path) in str(e.value) and fragment in str(e.value)


def test_unreadable_table_names_the_file(tmp_path):
    bad = tmp_path / "t.json"
    bad.write_text("{not json")
    with pytest.raises(DispatchTableError, match="t.json: not valid JSON"):
        load_table(bad)
    with pytest.raises(DispatchTableError, match="missing.json: cannot read"):
        load_table(tmp_path / "missing.json")


def test_env_table_overrides_the_committed_one(tmp_path, monkeypatch):
    data = _good()
    for e in data["entries"]:
        e["ratio"] = 0.5  # a device where the kernel wins everywhere measured
    path = tmp_path / "h200.json"
    path.write_text(json.dumps(data))
    monkeypatch.setenv(dispatch.ENV_TABLE, str(path))
    dispatch.reset_cache()
    assert choose(*qk(8, 16, 901, 901, 88), None, False) == "triton"
    monkeypatch.setenv(dispatch.ENV_TABLE, str(tmp_path / "nope.json"))
    dispatch.reset_cache()
    with pytest.raises(DispatchTableError, match="nope.json"):
        choose(*qk(8, 16, 901, 901, 88), None, False)


# ---- the op's auto path on CUDA routes per the rule (implementations mocked, no GPU) --------------


@pytest.fixture
def calls(monkeypatch):
    seen: list[str] = []

    def fake(name):
        def impl(q, k, v, key_padding_mask, causal, scale):
            seen.append(name)
            return torch.zeros_like(q)
        return impl

    monkeypatch.setattr(op, "_triton_attention", fake("triton"))
    monkeypatch.setattr(op, "sdpa_attention", fake("sdpa"))
    monkeypatch.setattr(op, "_HAS_TRITON", True)
    return seen


@pytest.mark.parametrize("shape,causal,want", [
    ((2, 16, 901, 901, 88), False, "sdpa"),  # EVA (batch does not enter the rule)
    ((2, 8, 32, 901, 64), False, "triton"),  # bridge
    ((1, 32, 96, 96, 128), True, "triton"),  # prefill
    ((1, 32, 1, 2048, 128), False, "sdpa"),  # decode
    ((1, 2, 50, 50, 96), False, "sdpa"),  # not measured
])
def test_cuda_auto_path_routes_per_the_rule(calls, shape, causal, want):
    q, k = qk(*shape)
    mask = torch.ones(shape[0], shape[3], dtype=torch.bool)
    out = op._attention_cuda(q, k, k, mask, causal, None)  # the op's registered CUDA kernel
    assert calls == [want] and out.shape == q.shape


def test_cuda_auto_path_without_triton_uses_sdpa(calls, monkeypatch):
    monkeypatch.setattr(op, "_HAS_TRITON", False)
    q, k = qk(2, 8, 32, 901, 64)
    op._attention_cuda(q, k, k, None, False, None)
    assert calls == ["sdpa"]


def test_cpu_auto_path_and_explicit_backends_ignore_the_rule(calls):
    q, k = qk(1, 2, 32, 901, 64, torch.float32)
    v = k
    op.attention(q, k, v, backend="triton")
    op.attention(q, k, v, backend="sdpa")
    assert calls == ["triton", "sdpa"]  # explicit overrides stand


# ---- writing the table from a GPU bench ----------------------------------------------------------


def _fake_gpu_result(device="NVIDIA H200"):
    def case(name, D, n_q, n_k, causal, t, s, dtype="float16"):
        return dict(name=name, B=8, H=4, Nq=n_q, Nk=n_k, D=D, causal=causal, dtype=dtype, dispatch="sdpa",
                    results=dict(triton=dict(ms=t, tbps=1.0, tflops=1.0), sdpa=dict(ms=s, tbps=1.0, tflops=1.0),
                                 unfused=dict(ms=9.0, tbps=1.0, tflops=1.0)))
    return dict(device=device, gpu=device, torch="2.x", triton="3.x", gpu_cases=[
        case("eva_self_attn", 88, 901, 901, False, 0.20, 0.13),
        case("bridge_xattn_n901", 64, 32, 901, False, 0.01, 0.015),
        dict(name="no_triton", B=1, H=1, Nq=1, Nk=1, D=64, causal=False, dtype="float16",
             results=dict(sdpa=dict(ms=1.0, tbps=1.0, tflops=1.0)))])


def test_table_from_bench_writes_the_format(tmp_path):
    table = table_from_bench(_fake_gpu_result(), source="run/kernels.json")
    path = dispatch.write_table(table, tmp_path / "attention_dispatch.json")
    loaded = load_table(path)
    assert loaded.device == "NVIDIA H200" and len(loaded.entries) == 2  # the case without triton: none
    assert loaded.decide("float16", 88, 901, 901, False).impl == "sdpa"
    assert loaded.decide("float16", 64, 32, 901, False).impl == "triton"
    e = json.loads(path.read_text())["entries"][0]
    assert e["ratio"] == round(0.20 / 0.13, 4) and e["kernel_ms"] == 0.2 and e["masked"] is False
    with pytest.raises(DispatchTableError, match="no GPU case"):
        table_from_bench(dict(device="cpu", cpu_cases=[]))


def test_committed_table_is_what_the_writer_makes_of_the_h100_run():
    made = table_from_bench(json.loads(H100_BENCH.read_text()), source=str(H100_BENCH.relative_to(REPO)))
    committed = _good()
    assert made["entries"] == committed["entries"] and made["device"] == committed["device"]


def test_write_dispatch_needs_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from allspark.bench.kernels import run_kernel_bench

    with pytest.raises(ConfigError, match="write-dispatch"):
        run_kernel_bench(tmp_path / "k.json", ("tiny",), 1, write_dispatch=tmp_path / "t.json")


def test_report_says_when_the_table_is_from_another_device():
    from allspark.bench.kernels import dispatch_table_info, format_table

    result = _fake_gpu_result()
    result["dispatch_table"] = dispatch_table_info("NVIDIA H200")
    text = format_table(result)
    assert "auto->sdpa" in text
    assert "NOTE: dispatch table measured on NVIDIA H100 80GB HBM3, applied on NVIDIA H200" in text
    same = dispatch_table_info("NVIDIA H100 80GB HBM3")
    assert same["same_device"] and "note" not in same


def test_a_gpu_with_its_own_table_uses_it():
    """The H200 measured the kernel slower at the bridge's head dim 64 over EVA-g's 901 tokens, where
    the H100 measured it faster: each GPU decides by its own table; others by the default."""
    assert dispatch.device_table_path("NVIDIA H200").name == "attention_dispatch.nvidia-h200.json"
    assert dispatch.device_table_path("NVIDIA A100-SXM4-80GB") == dispatch.TABLE_PATH
    assert dispatch.device_table_path(None) == dispatch.TABLE_PATH
    h200 = dispatch.load_table(dispatch.device_table_path("NVIDIA H200"))
    h100 = dispatch.load_table(dispatch.TABLE_PATH)
    assert h200.device == "NVIDIA H200" and h100.device.startswith("NVIDIA H100")
    for dt in ("float16", "bfloat16"):
        assert h200.decide(dt, 64, 32, 901, False).impl == "sdpa"
        assert h100.decide(dt, 64, 32, 901, False).impl == "triton"
        assert h200.decide(dt, 88, 901, 901, False).impl == "sdpa"  # EVA-g's head dim 88 on both
        assert h100.decide(dt, 88, 901, 901, False).impl == "sdpa"
