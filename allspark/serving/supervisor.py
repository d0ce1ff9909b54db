"""Bring back python models whose stub process died (`allspark serve --start` runs this).

Measured on Triton 2.51 (CPU): after a python-backend stub is killed, the server, the model and its
ensembles all still report ready, and every request to that instance fails with "Stub process ...
is not healthy"; loading the unchanged model again is a no-op. So the supervisor watches the stubs
themselves -- each is a process whose argv names its model file and this server's shared-memory
prefix -- and when a model has fewer live stubs than its config has instances, it unloads and loads
that model (0.6 s for the demo's shared entry, warm-up included). Its other instances keep serving
meanwhile; requests that were inside the dead stub fail with the server's error.

In a Kubernetes pod (the Dockerfile runs `tritonserver` directly) the pod's restart is the remedy:
its liveness probe runs `allspark probe REPO` (`probe`), which fails while a model has fewer live
stubs than instances -- Triton's own /v2/health/live stays 200 then.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)
STUB = "triton_python_backend_stub"


def live_stubs(shm_prefix: str | None = None, repo: str | Path | None = None) -> dict[str, int]:
    """Live stub processes per model: of the server whose shared-memory prefix is `shm_prefix`, or
    of the models under `repo` (a pod, where one server runs: the prefix is Triton's default)."""
    where = f"{Path(repo).resolve()}/" if repo is not None else None
    counts: dict[str, int] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # gone meanwhile
            continue
        if len(argv) < 3 or not argv[0].endswith(STUB.encode()) or state == "Z":
            continue
        model_file, prefix = argv[1].decode(errors="replace"), argv[2].decode(errors="replace")
        if (shm_prefix is None or prefix.startswith(shm_prefix)) and (where is None or model_file.startswith(where)):
            model = Path(model_file).parent.parent.name  # <repo>/<model>/<version>/model.py
            counts[model] = counts.get(model, 0) + 1
    return counts


def expected_stubs(repo: Path, models: list[str]) -> dict[str, int]:
    """Python models among `models` and their instance counts, from their configs."""
    from .model_config import read_config

    out = {}
    for m in models:
        path = repo / m / "config.pbtxt"
        if not path.is_file():
            continue
        cfg = read_config(path)
        if cfg.backend == "python":
            out[m] = sum(max(g.count, 1) * max(len(g.gpus), 1) for g in cfg.instance_group) or 1
    return out


class StubSupervisor:
    """A thread that checks every `interval_s` and reloads models with dead stubs."""

    def __init__(self, server, interval_s: float = 1.0):
        self.server, self.interval_s = server, interval_s
        self.expected = expected_stubs(server.repo, server.models)
        self.restarts: list[tuple[float, str]] = []  # (time, model)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="allspark-stub-supervisor", daemon=True)

    def start(self) -> StubSupervisor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def __enter__(self) -> StubSupervisor:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def check(self) -> list[str]:
        """Reload every model with fewer live stubs than instances; returns those reloaded."""
        live = live_stubs(self.server.shm_prefix)
        dead = [m for m, n in self.expected.items() if live.get(m, 0) < n]
        for m in dead:
            if self._stop.is_set():
                break
            log.warning("model %s: %d of %d stubs alive; reloading it", m, live.get(m, 0), self.expected[m])
            self._reload(m)
        return dead

    def _reload(self, model: str) -> None:
        import tritonclient.http as th

        t0 = time.monotonic()
        with th.InferenceServerClient(self.server.http_url, network_timeout=300.0) as client:
            try:
                client.unload_model(model)
                client.load_model(model)
            except Exception as e:  # the next check tries again
                log.error("model %s: reload failed: %s", model, e)
                return
        self.restarts.append((time.time(), model))
        log.warning("model %s reloaded in %.1f s", model, time.monotonic() - t0)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            if self.server.process is None or self.server.process.poll() is not None:
                return  # the server is gone: nothing to supervise
            try:
                self.check()
            except Exception as e:  # the supervisor must not die of one bad check
                log.error("stub supervisor: %s", e)


def probe(repo: str | Path, url: str | None = None) -> list[str]:
    """What is wrong with the server serving `repo` on this machine ([] if nothing): python models
    with fewer live stubs than instances, and (with `url`) Triton's liveness endpoint."""
    import urllib.error
    import urllib.request

    from .model_config import read_config

    repo = Path(repo)
    names = [p.name for p in sorted(repo.iterdir()) if (p / "config.pbtxt").is_file()]
    problems = []
    if url is not None:
        try:
            with urllib.request.urlopen(f"http://{url.split('://', 1)[-1]}/v2/health/live", timeout=3) as r:
                if r.status != 200:
                    problems.append(f"{url}: /v2/health/live answered {r.status}")
        except (urllib.error.URLError, OSError) as e:
            problems.append(f"{url}: /v2/health/live unreachable ({e})")
    live = live_stubs(repo=repo)
    for m, n in expected_stubs(repo, [read_config(repo / x / "config.pbtxt").name or x for x in names]).items():
        if live.get(m, 0) < n:
            problems.append(f"model {m}: {live.get(m, 0)} of {n} python-backend stubs alive")
    return problems
