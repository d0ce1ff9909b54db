"""The README's shell blocks, run as written on CPU (issue 30): every `allspark` line in a ```bash
block runs in a fresh process from a clean directory, in the README's order, with its paths, ports and
flags, and exits 0. Optional parts in [brackets] and trailing comments are dropped (they are choices,
not commands). Lines that need what a CPU test cannot have are listed in NOT_HERE with the reason, so
a new command is run unless someone says why not.

`serve --start` blocks until stopped: it runs in the background on the README's (default) ports and
the `client` lines after it talk to it; without a Triton server on this machine, or with those ports
taken, the three serving lines are skipped by name."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

# a prefix of a README command line -> why this test does not run it
NOT_HERE = {
    "allspark new --preset base": "writes 6.4 GB of random weights",
    "allspark new --preset paper": "writes 14.0 GB of random weights",
    "allspark convert": "needs Lynx's, Vicuna's and EVA's released weights",
    "allspark bench": "a benchmark (minutes); tests/test_bench.py runs it small",
}
SERVING = ("allspark serve build/demo --start", "allspark client")


def readme_commands(text: str) -> list[str]:
    """The `allspark` command lines of the ```bash blocks, continuations joined, [options] and # comments dropped."""
    lines: list[str] = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0]
            while re.search(r"\[[^\[\]]*\]", line):  # nested [a|b] choices inside options too
                line = re.sub(r"\s*\[[^\[\]]*\]", "", line)
            line = " ".join(line.split())
            if line.startswith("allspark "):
                lines.append(line)
    return lines


def test_readme_commands_are_parsed_as_written():
    cmds = readme_commands((REPO / "README.md").read_text())
    assert "allspark export allspark/demo/checkpoint --out build/demo" in cmds
    assert "allspark run build/tiny --modality rgb --input scene.png" in cmds
    assert "allspark client http://127.0.0.1:8000 --modality rgb --input scene.png" in cmds
    # every skip names a line the README still has (a stale one would hide nothing, or the wrong thing)
    assert all(any(c.startswith(p) for c in cmds) for p in NOT_HERE), [p for p in NOT_HERE if not any(
        c.startswith(p) for c in cmds)]
    # build/demo is made before any command uses it
    first_use = min(i for i, c in enumerate(cmds) if " build/demo" in c and "--out build/demo" not in c)
    assert cmds.index("allspark export allspark/demo/checkpoint --out build/demo") < first_use


def _serving_possible() -> str | None:
    """Why the serving lines cannot run here, or None."""
    from allspark.serving.server import ServerError, check_ports, triton_home

    try:
        triton_home()
        check_ports({"--http-port": 8000, "--grpc-port": 8001, "--metrics-port": 8002})
    except (ImportError, ServerError) as e:
        return str(e)
    return None


@pytest.mark.slow
def test_every_cpu_command_of_the_readme_runs_as_written(tmp_path):
    from PIL import Image

    # the checkout's relative paths, as a reader at the repository root has them
    (tmp_path / "allspark" / "demo").mkdir(parents=True)
    (tmp_path / "allspark" / "demo" / "checkpoint").symlink_to(REPO / "allspark" / "demo" / "checkpoint")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (56, 56, 3), np.uint8)).save(tmp_path / "scene.png")
    env = {**os.environ, "PYTHONPATH": str(REPO), "ALLSPARK_CACHE": str(tmp_path / "cache")}
    no_serving = _serving_possible()
    server = None
    ran, skipped = [], []
    try:
        for cmd in readme_commands((REPO / "README.md").read_text()):
            why = next((w for p, w in NOT_HERE.items() if cmd.startswith(p)), None)
            if why is None and cmd.startswith(SERVING) and no_serving:
                why = f"serving: {no_serving}"
            if why:
                skipped.append(f"{cmd}: {why}")
                continue
            argv = [sys.executable, "-m", "allspark", *cmd.split()[1:]]
            if cmd.startswith("allspark serve build/demo --start"):
                server = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True)
                for line in server.stdout:
                    if line.startswith("ready:"):
                        break
                else:
                    pytest.fail(f"{cmd}: exited {server.wait()} before ready")
                ran.append(cmd)
                continue
            r = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
            assert r.returncode == 0, f"{cmd}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
            ran.append(cmd)
    finally:
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGTERM)
            server.wait(120)
    print("ran:", *ran, "skipped:", *skipped, sep="\n  ")
    assert any(c.startswith("allspark map build/demo") for c in ran) and (tmp_path / "build" / "demo").is_dir()
