"""Operating the served repository (runtime layout, CPU target, a real Triton server): warm before
ready, Prometheus metrics, request ids, per-request timeouts, and a shutdown that drains streams."""

from __future__ import annotations

import re
import threading
import time
import urllib.request

import numpy as np
import pytest

from allspark.model.registry import random_inputs
from allspark.runtime import GenerationConfig, Runtime

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def rt(build):
    return Runtime.load(build)


@pytest.fixture(scope="module")
def repo(build, tmp_path_factory):
    from allspark.serving.options import RepositoryOptions, Target
    from allspark.serving.repository import write_repository

    root = tmp_path_factory.mktemp("ops") / "repo"
    # runtime layout, warmup on; a small request limit (100 KiB) to test it without sending 64 MiB
    write_repository(build, root, RepositoryOptions(target=Target.CPU, max_request_mb=100 / 1024))
    return root


def _start(repo):
    from allspark.serving.server import ServerError, TritonServer, triton_home

    try:
        triton_home()
    except (ImportError, ServerError) as e:
        pytest.skip(f"no Triton server on this machine: {e}")
    s = TritonServer(repo, models=["rgb", "code", "allspark_entry", "allspark_runtime"])
    s.start()
    return s


@pytest.fixture(scope="module")
def server(repo):
    s = _start(repo)
    yield s
    s.stop()


def _metrics(server) -> str:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as r:
        return r.read().decode()


def _metric(text: str, name: str, model: str) -> float:
    m = re.search(rf'^{name}{{model="{model}",version="1"}} (\S+)$', text, re.MULTILINE)
    assert m, f"{name} for {model} not in the metrics"
    return float(m.group(1))


def test_first_request_after_ready_is_warm(server, rt):
    """The entry warmed every modality in initialize, before Triton reported it ready: the first
    request is within 3.5x the typical one. Unwarmed, it took 5-7x; 2x flaked on a loaded 2-core
    machine (13.96 ms against a 6.91 ms median)."""
    from allspark.serving.client import ServingClient

    x = random_inputs(rt.config.modality("rgb"), np.random.default_rng(3))
    other = random_inputs(rt.config.modality("code"), np.random.default_rng(3))
    with ServingClient(server.grpc_url, "grpc") as c:
        c.info("rgb")  # metadata first: its round trip is not the model's
        # the client's kept gRPC stream opens on its first request (a thread, a channel: 25 ms once
        # against 7 ms in CI); open it with a generation (code), so rgb's graphs are what is timed
        c.predict("code", other, max_new_tokens=2)
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            c.predict("rgb", x)
            times.append(time.perf_counter() - t0)
    assert times[0] <= 3.5 * max(times[9], float(np.median(times[1:]))), [round(1e3 * t, 2) for t in times]


def test_prometheus_metrics_count_requests_and_time_per_model(server, rt):
    from allspark.serving.client import ServingClient

    time.sleep(0.5)  # requests of earlier tests are all counted
    before = _metrics(server)
    n0 = _metric(before, "nv_inference_request_success", "rgb")
    x = random_inputs(rt.config.modality("rgb"), np.random.default_rng(4))
    with ServingClient(server.http_url, "http") as c:
        for _ in range(5):
            c.predict("rgb", x)
    deadline = time.monotonic() + 10  # counted as each request is released, just after its response
    while (_metric(after := _metrics(server), "nv_inference_request_success", "rgb") < n0 + 5
           and time.monotonic() < deadline):
        time.sleep(0.1)
    assert _metric(after, "nv_inference_request_success", "rgb") == n0 + 5
    assert _metric(after, "nv_inference_request_success", "allspark_entry") >= 5
    for name in ("nv_inference_queue_duration_us", "nv_inference_compute_infer_duration_us"):
        assert _metric(after, name, "allspark_entry") > _metric(before, name, "allspark_entry")


def test_request_ids_come_back_and_name_errors(server, rt):
    import tritonclient.grpc as tg

    from allspark.serving.client import ServingClient, ServingError

    x = random_inputs(rt.config.modality("rgb"), np.random.default_rng(5))
    image = (np.asarray(x["image"]) / 255).astype(np.float32)[None]  # the sample is an 8-bit image
    with tg.InferenceServerClient(server.grpc_url) as raw:
        t = tg.InferInput("image", list(image.shape), "FP32")
        t.set_data_from_numpy(image)
        res = raw.infer("rgb", [t], request_id="scene-0042")
        assert res.get_response().id == "scene-0042"
    bad = np.full_like(image[0], 7.0)  # out of [0, 1]: the entry's own error, led by the id
    with ServingClient(server.grpc_url, "grpc") as c, pytest.raises(ServingError, match="request scene-0043: rgb: input 'image'"):
        c.predict("rgb", {"image": bad}, request_id="scene-0043")


def test_per_request_timeouts(server, rt):
    """A single-pass request still queued at its deadline is not run; a stream still running at it
    ends with a timeout error; requests without one, or with a long one, are unaffected."""
    from allspark.serving.client import ServingClient, ServingError

    x = random_inputs(rt.config.modality("rgb"), np.random.default_rng(6))
    with ServingClient(server.grpc_url, "grpc") as c:
        with pytest.raises(ServingError, match="rgb: the request's deadline passed"):  # 1 us: gone before it runs
            c.predict("rgb", x, timeout_us=1)
    with ServingClient(server.grpc_url, "grpc") as c:
        assert c.predict("rgb", x, timeout_us=30_000_000).label == rt.predict("rgb", x).label
        with pytest.raises(ServingError, match=r"code: the request.s timeout of \d+ ms expired"):
            c.predict("code", {"text": "def f():"}, max_new_tokens=450, ignore_eos=True, timeout_us=30_000)  # within the positions
        assert len(c.predict("code", {"text": "x = 1"}, max_new_tokens=5, ignore_eos=True).tokens) == 5


def test_requests_over_the_size_limit_and_bad_stream_parameters_get_errors(server, rt):
    import tritonclient.grpc as tg

    from allspark.serving.client import ServingError

    x = random_inputs(rt.config.modality("rgb"), np.random.default_rng(9))
    image = (np.asarray(x["image"]) / 255).astype(np.float32)
    with tg.InferenceServerClient(server.grpc_url) as raw:
        def infer(rows):
            batch = np.repeat(image[None], rows, 0)
            t = tg.InferInput("image", list(batch.shape), "FP32")
            t.set_data_from_numpy(batch)
            return raw.infer("rgb", [t])

        assert infer(2).as_numpy("label").shape[0] == 2  # under the 100 KiB limit
        over = int(100 * 2**10 / image.nbytes) + 1  # rows: just over it
        assert 2 < over <= 32, "the test needs another limit for this image size"  # within max_batch_size
        with pytest.raises(Exception, match=r"at most 100 KiB per request .*got 1\d\d KiB"):
            infer(over)
    from allspark.serving.client import ServingClient

    with ServingClient(server.grpc_url, "grpc") as c:
        for params, what in (({"ignore_eos": "yes"}, "ignore_eos"), ({"deadline_unix_ns": "soon"}, "deadline_unix_ns")):
            events: list = []
            with tg.InferenceServerClient(server.grpc_url) as raw:
                raw.start_stream(callback=lambda result, error: events.append((result, error)))
                t = tg.InferInput("text", [1], "BYTES")
                t.set_data_from_numpy(np.array([b"def f():"], dtype=object))
                raw.async_stream_infer("code", [t], parameters=params)
                deadline = time.monotonic() + 30
                while not events and time.monotonic() < deadline:
                    time.sleep(0.05)
                raw.stop_stream()
            assert events and events[0][1] is not None and what in events[0][1].message(), events  # never silence
        with pytest.raises(ServingError, match="max_new_tokens"):
            c.predict("code", {"text": "x"}, max_new_tokens=0)


def test_probe_sees_a_dead_stub_that_health_endpoints_miss(server, repo):
    """`allspark probe REPO` (the pods' liveness probe) fails while a python model has a dead stub,
    though Triton's /v2/health/live and the model's readiness still say 200; after the supervisor's
    reload it passes again."""
    import os
    import signal as sig

    from allspark.cli import main
    from allspark.serving.supervisor import StubSupervisor, probe

    assert probe(repo, server.http_url) == []
    os.kill(_stub_pids(server.shm_prefix, "allspark_entry")[0], sig.SIGKILL)
    time.sleep(0.5)
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/allspark_entry/ready"):
        with urllib.request.urlopen(f"http://{server.http_url}{path}", timeout=5) as r:
            assert r.status == 200, path  # what Kubernetes would see without the probe
    assert main(["probe", str(repo), "--url", server.http_url]) == 1
    assert probe(repo) == ["model allspark_entry: 1 of 2 python-backend stubs alive"]
    assert StubSupervisor(server).check() == ["allspark_entry"]
    assert probe(repo, server.http_url) == []


def test_shutdown_drains_running_streams(repo, rt):
    """SIGTERM while a stream runs: the server stops taking requests, lets the stream finish, then
    exits cleanly (nothing killed)."""
    from allspark.serving.client import ServingClient

    s = _start(repo)
    got: dict = {}
    started = threading.Event()

    def run():
        try:
            with ServingClient(s.grpc_url, "grpc") as c:
                events = []
                for ev in c.stream("code", {"text": "def drain(x):"}, max_new_tokens=300, ignore_eos=True):
                    events.append(ev)
                    started.set()
                got["events"] = events
        except Exception as e:  # pragma: no cover - reported by the assert below
            got["error"] = e
            started.set()

    t = threading.Thread(target=run)
    try:
        t.start()
        assert started.wait(60)
        report = s.stop()
    finally:
        s.stop()
    t.join(60)
    assert "error" not in got, got.get("error")
    final = got["events"][-1]
    want = rt.generate("code", {"text": "def drain(x):"}, config=GenerationConfig(max_new_tokens=300, ignore_eos=True))
    assert final.final and final.tokens == want.tokens and len(final.tokens) == 300
    assert report == {"killed": [], "shm_removed": []}


@pytest.mark.slow
def test_a_killed_stub_is_brought_back_under_load(repo, rt):
    """Chaos: SIGKILL one stub of the shared entry while clients send requests. The supervisor sees
    fewer stubs than instances and reloads the model; within seconds every request is answered again,
    and no answer is ever wrong (failures are errors, not other labels)."""
    import os
    import signal as sig

    from allspark.serving.client import ServingClient
    from allspark.serving.supervisor import StubSupervisor, live_stubs

    x = random_inputs(rt.config.modality("rgb"), np.random.default_rng(8))
    want = rt.predict("rgb", x).label
    s = _start(repo)
    log: list[tuple[float, object]] = []
    stop = threading.Event()

    def client():
        with ServingClient(s.grpc_url, "grpc") as c:
            while not stop.is_set():
                t = time.monotonic()
                try:
                    log.append((t, c.predict("rgb", x).label))
                except Exception as e:
                    log.append((t, e))

    try:
        with StubSupervisor(s, interval_s=0.5) as sup:
            assert sup.expected["allspark_entry"] == 2 and live_stubs(s.shm_prefix)["allspark_entry"] == 2
            threads = [threading.Thread(target=client) for _ in range(3)]
            for t in threads:
                t.start()
            time.sleep(1.0)
            stub = _stub_pids(s.shm_prefix, "allspark_entry")[0]
            killed = time.monotonic()
            os.kill(stub, sig.SIGKILL)
            deadline = killed + 30
            while not sup.restarts and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(2.0)  # served after the reload
            stop.set()
            for t in threads:
                t.join(60)
            assert sup.restarts and sup.restarts[0][1] == "allspark_entry"
            # both new instances run (the old version's surviving stub may linger while Triton
            # unloads it: the dead stub's in-flight requests never complete)
            assert live_stubs(s.shm_prefix)["allspark_entry"] >= 2
    finally:
        stop.set()
        s.stop()
    answers = [a for _, a in log if not isinstance(a, Exception)]
    assert answers and all(a == want for a in answers)  # never a wrong answer
    errors = [t for t, a in log if isinstance(a, Exception)]
    recovered = max(errors, default=killed) - killed
    assert recovered < 10, f"requests still failed {recovered:.1f} s after the kill"
    assert [a for t, a in log if t > killed + recovered + 0.01], "nothing was served after the recovery"


def _stub_pids(shm_prefix: str, model: str) -> list[int]:
    from pathlib import Path

    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if len(argv) > 2 and argv[2].decode().startswith(shm_prefix) and f"/{model}/" in argv[1].decode():
                pids.append(int(proc.name))
    return pids
