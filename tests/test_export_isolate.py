"""The exporter in a forked child: same graphs as in process, errors and kills reported by name."""

from __future__ import annotations

import json
import os
import signal

import pytest

from allspark.export.build import export_build
from allspark.export.isolate import can_fork, run_forked
from allspark.export.onnx_export import ExportError

pytestmark = pytest.mark.skipif(not can_fork(), reason="fork isolation is Linux-only (in-process elsewhere)")


def test_forked_export_writes_the_same_graphs(ckpt, build, tmp_path):
    m = export_build(ckpt, tmp_path / "b", modalities=["language", "rgb"], progress=False, isolate=True)
    ref = json.loads((build / "manifest.json").read_text())
    for name, c in m["components"].items():
        assert c["export_process"] == "forked child"
        assert c["parity"]["passed"]
        if name != "decoder":  # (its adapter sets follow the modalities exported)
            # the graph bytes are those of the in-process export of the session's build
            assert c["artifacts"]["onnx"]["sha256"] == ref["components"][name]["artifacts"]["onnx"]["sha256"], name
    assert ref["components"]["decoder"]["export_process"] == "in process"  # tiny: under the auto threshold


def test_child_results_and_errors_come_back():
    assert run_forked(lambda: {"pid": os.getpid()}, "x", ExportError)["pid"] != os.getpid()

    def fails_cleanly():
        raise ExportError("decoder: torch.onnx.export failed: boom")

    with pytest.raises(ExportError, match="^decoder: torch.onnx.export failed: boom$"):
        run_forked(fails_cleanly, "decoder", ExportError)
    with pytest.raises(ExportError, match="ZeroDivisionError"):
        run_forked(lambda: 1 / 0, "decoder", ExportError)


def test_child_runs_parallel_ops_after_the_parent_did():
    """The parent's intra-op pool does not survive fork(): a child entering it hung forever (the paper
    decoder's 4096-wide example cast). Run in a subprocess so a regression times out instead of hanging."""
    import subprocess
    import sys

    code = ("import torch\nfrom allspark.export.isolate import run_forked\n"
            "from allspark.export.onnx_export import ExportError\n"
            "torch.randn(4_000_000).to(torch.float16).float().sum()\n"
            "print(run_forked(lambda: float(torch.randn(2_000_000).to(torch.float16).float().sum() * 0), 'x', ExportError))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() in ("0.0", "-0.0"), out.stderr[-500:]


def test_killed_child_is_named():
    with pytest.raises(ExportError, match="decoder: the export process was killed by SIGKILL .out of memory"):
        run_forked(lambda: os.kill(os.getpid(), signal.SIGKILL), "decoder", ExportError)
