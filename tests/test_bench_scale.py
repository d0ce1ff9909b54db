"""`allspark bench scale` pieces that need no multi-GB model: tree memory, checkpoint facts, report."""

from __future__ import annotations

import json
import sys

import pytest

from allspark.bench.memory import measure
from allspark.bench.scale import checkpoint_facts, render


def test_measure_counts_forked_children():
    # the parent holds ~100 MB, then forks a child that touches another 150 MB of its own
    code = ("import os, time, numpy as np; a = np.ones(100 << 17); pid = os.fork()\n"
            "if pid == 0:\n    b = np.ones(150 << 17); time.sleep(0.5); os._exit(0)\n"
            "os.waitpid(pid, 0)")
    m = measure([sys.executable, "-c", code])
    assert m.returncode == 0 and m.seconds > 0.4
    assert 240 < m.peak_pss_mb < 400  # both processes' own pages, shared ones once (RSS would count them twice)


def test_measure_names_a_failing_command():
    with pytest.raises(RuntimeError, match="status 3: .*boom"):
        measure([sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"])


def test_checkpoint_facts_count_every_tensor(ckpt, tiny_model):
    facts = checkpoint_facts(ckpt)
    assert facts["parameters"] == sum(t.numel() for t in tiny_model.state_dict().values())
    assert facts["bytes"] > 4 * facts["parameters"]  # fp32, plus headers


def _preset(params, **over):
    gen = {"onnxruntime": {"ttft_ms": 2.0, "decode_step_ms": 1.0, "tokens_per_s": 1000.0, "achieved_gbs": 3.0}}
    x = {"preset": "p", "modalities": ["language"], "dtype": "fp32", "precision": "fp32", "parameters": params,
         "bytes": 4 * params, "new": {"seconds": 1.0, "peak_mb": 100.0},
         "export": {"seconds": 2.0, "peak_mb": 200.0, "largest_component": "decoder",
                    "largest_component_bytes": 4 * params, "peak_over_largest": 1.3,
                    "parity": {"decoder": {"passed": True, "reference": "PyTorch in fp32", "max_abs": 1e-6}}},
         "build_bytes": 4 * params, "decoder_bytes": 4 * params,
         "latency": {"language": {"1": {"torch": {"total": 3.0}, "onnxruntime": {"total": 1.0}}}}, "generation": gen}
    x.update(over)
    return x


def test_report_from_json(tmp_path):
    bw = {"buffer_mb": 512, "read_gbs": 30.0, "copy_gbs": 25.0}
    machine = {"cpu": "cpu", "cores": 2, "gpu": "not available", "torch": "t", "onnxruntime": "o", "load_average": [1, 1, 1]}
    r = {"kind": "allspark-bench-scale", "started": "now", "machine": machine, "bandwidth": bw, "bandwidth_after": bw,
         "presets": {"tiny": _preset(10_000), "base": _preset(2_000_000_000, latency={}, generation={})},
         "failed": {"paper": "allspark export ... exited with status -9"}}
    files = render(tmp_path / "scale.json", r)
    md = (tmp_path / "scale.md").read_text()
    assert json.loads((tmp_path / "scale.json").read_text()) == r and (tmp_path / "scale.png").stat().st_size > 0
    assert "| tiny | language | 0.0M | 0.0 MB | 0.0 MB |" in md  # sizes below 1 GB in MB
    assert "| base | language | 2,000.0M | 8.00 GB" in md and "passed (max abs 1.0e-06)" in md
    assert "| tiny | onnxruntime | 0.0 MB | 2.0 | 1.00 | 1000.0 | 3.0 | 10% |" in md  # 3 GB/s of a 30 GB/s read
    assert "| base | onnxruntime |" not in md  # no latency run: no decoder row
    assert "**paper**: allspark export" in md and len(files) == 3


def test_paper_request_files_read_back_through_allspark_run(tiny_model, tmp_path):
    """The paper rows run `allspark run --input FILE` per modality: each file the bench writes is one
    that modality's reader takes, and reads back to the request it came from."""
    import numpy as np

    from allspark.bench.paper import write_request_file
    from allspark.model.readers import read_input
    from allspark.model.registry import random_inputs

    rng = np.random.default_rng(1)
    for mc in tiny_model.config.modalities:
        mod = mc.modality
        inputs = random_inputs(mc, rng)
        back = read_input(mod, write_request_file(mod, inputs, tmp_path), mc)
        assert set(back) >= set(inputs) - {"prompt"}, mod
        for k, v in inputs.items():
            if isinstance(v, str):
                assert back[k] == v, mod
            else:
                np.testing.assert_array_equal(np.asarray(back[k]), np.asarray(v), err_msg=f"{mod}.{k}")
