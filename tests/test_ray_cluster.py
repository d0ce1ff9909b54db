"""`allspark map --ray ADDRESS` on a real two-node Ray cluster on this machine (loopback only, each
node its own temp dir and resources): both nodes do work, the build reaches them through Ray's
object store, and a run whose worker node is killed mid-job still completes with outputs
byte-identical to a one-process run."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")
rasterio = pytest.importorskip("rasterio")

from allspark.demo import DEFAULT_CHECKPOINT
from allspark.mapping import Execution, MapSettings, run_map
from allspark.mapping.demo_scene import make_demo_scene

pytestmark = pytest.mark.slow
OUTPUTS = ("classes.tif", "confidence.tif", "tiles.geojson", "preview.png")
CHUNKS = 24 * 32 // 4  # the scene's windows in chunks of --batch 4
STORE = "200000000"  # bytes of object store per node: the machine is shared
# Loopback only, every listener on 127.0.0.1. Ray 2.60 fights this in two places:
# - `ray start`, `ray.init` and address parsing rewrite 127.0.0.1/localhost to the machine's routable
#   address (ray._private.services.resolve_ip_for_localhost), so the nodes would register as e.g.
#   192.0.2.2, and its gRPC servers (GCS, raylet, object manager) then bind every interface. Any other
#   127/8 address is kept as given but also binds every interface: only a node IP of exactly 127.0.0.1
#   keeps them on loopback.
# - RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes Ray take 127.0.0.1 as the node's own address everywhere
#   (driver, agents, workers), but then `ray start --address` refuses to add a second node.
# So every process gets RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, and the two `ray start` processes alone run
# through LAUNCH, which turns multi-node back on in that process and keeps 127.0.0.1 as given.
LOOPBACK = "127.0.0.1"
LAUNCH = ("import sys, ray._private.ray_constants as c, ray._private.services as s; "
          "c.ENABLE_RAY_CLUSTER = True; s.resolve_ip_for_localhost = lambda host: host; "
          "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()")
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
       "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def _port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


class Cluster:
    """A head and one worker node, each `ray start --block` in its own process group and temp dir."""

    def __init__(self, root: Path):
        self.root, self.procs = root, {}
        self.address = f"{LOOPBACK}:{_port()}"

    def _start(self, name: str, *args: str) -> None:
        temp = Path(tempfile.mkdtemp(prefix=f"r{name[0]}", dir="/tmp"))  # unix socket paths must stay short
        self.procs[name] = (subprocess.Popen(
            [sys.executable, "-c", LAUNCH, "start", "--block", "--num-cpus", "1", "--object-store-memory", STORE, "--temp-dir", str(temp),
             "--node-ip-address", LOOPBACK, "--disable-usage-stats", *args],
            stdout=open(self.root / f"{name}.log", "w"), stderr=subprocess.STDOUT, start_new_session=True, env=ENV), temp)

    def start(self) -> None:
        self._start("head", "--head", "--port", self.address.split(":")[1], "--include-dashboard", "false",
                    "--resources", json.dumps({"head": 1}))
        self._wait(1)
        self._start("worker", "--address", self.address, "--resources", json.dumps({"worker": 1}))
        self._wait(2)

    def _wait(self, nodes: int, timeout: float = 120) -> None:
        code = (f"import ray; ray.init(address='{self.address}', logging_level='ERROR'); "
                "print(sorted({n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']})); "
                "print(sum(n['Alive'] for n in ray.nodes()))")
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=ENV)
            if r.returncode == 0 and r.stdout.strip().splitlines()[-1:] == [str(nodes)]:
                assert r.stdout.strip().splitlines()[-2] == f"['{LOOPBACK}']", r.stdout  # every node on loopback
                return
            time.sleep(2)
        raise AssertionError(f"the cluster did not reach {nodes} nodes: {r.stderr[-1500:]}")

    def listeners(self) -> list[str]:
        """The local address of every TCP socket that a process of either node listens on (`ss -ltnp`)."""
        groups = {proc.pid for proc, _ in self.procs.values()}
        rows = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout.splitlines()
        found = []
        for row in rows:
            for pid in map(int, re.findall(r"pid=(\d+)", row)):
                try:
                    if os.getpgid(pid) in groups:
                        found.append(row.split()[3])
                        break
                except ProcessLookupError:
                    pass
        return found

    def kill(self, name: str) -> None:
        proc, _ = self.procs[name]
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the node and every process it started, at once
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)

    def stop(self) -> None:
        for name in ("worker", "head"):
            if name in self.procs:
                proc, temp = self.procs[name]
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)  # --block: ray stops the node's processes
                    try:
                        proc.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        pass
                self.kill(name)
                shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    from allspark.export.build import export_build

    if not (DEFAULT_CHECKPOINT / "manifest.json").is_file():
        pytest.skip("the trained demo checkpoint is not in this checkout")
    root = tmp_path_factory.mktemp("ray")
    build = root / "b"
    export_build(DEFAULT_CHECKPOINT, build, modalities=["rgb"], precision="fp32", progress=False)
    # 24 x 32 windows, 192 chunks of 4: a few seconds of work, so the worker can be killed mid-job (at
    # 6 x 8, 12 chunks took less than one poll of the loop below on an idle machine)
    scene, _ = make_demo_scene("rgb", root / "scene.tif", build, 24, 32, seed=3)
    t = time.perf_counter()
    run_map(build, scene, root / "one", MapSettings("rgb", batch=4), Execution(progress=False))
    return build, scene, root, time.perf_counter() - t


def _map(build: Path, scene: Path, out: Path, address: str) -> subprocess.Popen:
    # the workers open their node's unpacked copy, shipped through the object store (ray_runner)
    return subprocess.Popen([sys.executable, "-m", "allspark", "map", str(build), "--modality", "rgb",
                             "--input", str(scene), "--out", str(out), "--batch", "4", "--ray", address,
                             "--workers", "2", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def _same_outputs(a: Path, b: Path) -> None:
    for name in OUTPUTS:
        assert (a / f"scene.{name}").read_bytes() == (b / f"scene.{name}").read_bytes(), name


def test_two_nodes_share_the_job_and_survive_losing_one(job, tmp_path):
    build, scene, root, one_s = job
    timings = {"one process": one_s}
    cluster = Cluster(tmp_path)
    shipped = build  # the same path as the one-process run (its outputs' tags name it); workers never open it
    try:
        cluster.start()
        if shutil.which("ss"):
            bound = cluster.listeners()
            assert bound and all(a.rsplit(":", 1)[0] in ("127.0.0.1", "[::ffff:127.0.0.1]") for a in bound), bound
        t = time.perf_counter()
        p = _map(shipped, scene, tmp_path / "two", cluster.address)
        out, err = p.communicate(timeout=600)
        timings["two nodes"] = time.perf_counter() - t
        assert p.returncode == 0, err[-3000:]
        _same_outputs(root / "one", tmp_path / "two")
        ray_stats = json.loads((tmp_path / "two" / "summary.json").read_text())["throughput"]["ray"]
        assert ray_stats["nodes"] == 2 and len(ray_stats["chunks_per_node"]) == 2, ray_stats  # both did work

        # again, the worker node killed once a few chunks are committed
        t = time.perf_counter()
        p = _map(shipped, scene, tmp_path / "lost", cluster.address)
        parts = tmp_path / "lost" / "parts"
        end = time.monotonic() + 300
        while time.monotonic() < end and len(list(parts.glob("*/*.npz")) if parts.is_dir() else []) < 2:
            time.sleep(0.05)
        committed = len(list(parts.glob("*/*.npz")))
        assert p.poll() is None and committed < CHUNKS, (p.poll(), committed)  # mid-job
        cluster.kill("worker")
        out, err = p.communicate(timeout=600)
        timings["two nodes, worker killed"] = time.perf_counter() - t
        assert p.returncode == 0, err[-3000:]
        _same_outputs(root / "one", tmp_path / "lost")
        lost = json.loads((tmp_path / "lost" / "summary.json").read_text())["throughput"]["ray"]
        print("killed after", committed, f"of {CHUNKS} chunks; chunks per node:", lost["chunks_per_node"])
    finally:
        cluster.stop()
    print("map timings (s):", json.dumps({k: round(v, 1) for k, v in timings.items()}))
