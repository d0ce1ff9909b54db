"""Start and stop a real Triton Inference Server on loopback: `TritonServer(repo)` is a context manager.

The PyPI wheel `nvidia-pytriton` ships a `tritonserver` binary (2.51) with the python backend only.
It is used standalone, by the recipe measured to work on CPU-only machines:

    <cache>/tritonserver/<version>-py3.X/{bin,backends,caches}      copied once from the wheel
    backends/python/triton_python_backend_stub                       the stub built for this Python
    LD_LIBRARY_PATH = <site-packages>/nvidia_pytriton.libs : <this Python's LIBDIR>
    PATH            = <this interpreter's bin> : ...                 the stub finds our packages through it

The server runs in its own session (process group), with models loaded explicitly, so stopping it
signals the server and every python-backend stub at once. The python backend's shared-memory regions
carry a per-server prefix: whatever a killed server leaves in /dev/shm under it is removed.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import AllSparkError

SHM_DIR = Path("/dev/shm")


class ServerError(AllSparkError, RuntimeError):
    """The Triton server could not be installed, started or stopped."""


@dataclass(frozen=True)
class ServerOptions:
    """How to run the server. Ports of 0 are chosen free on 127.0.0.1 at start."""

    host: str = "127.0.0.1"
    http_port: int = 0
    grpc_port: int = 0
    metrics_port: int = 0
    startup_timeout_s: float = 240.0
    exit_timeout_s: int = 10
    log_verbose: int = 0
    shm_default_bytes: int = 4 << 20  # per python-backend stub; the backend's own default is 64 MiB
    shm_growth_bytes: int = 1 << 20
    model_load_threads: int = 4

    def __post_init__(self) -> None:
        for name in ("http_port", "grpc_port", "metrics_port"):
            port = getattr(self, name)
            if not 0 <= port < 65536:
                raise ServerError(f"{name}: expected 0 (free port) or 1..65535, got {port}")
        if self.startup_timeout_s <= 0 or self.exit_timeout_s < 1:
            raise ServerError("startup_timeout_s must be > 0 and exit_timeout_s >= 1")
        if self.host not in ("127.0.0.1", "localhost", "::1"):
            raise ServerError(f"host: this server is for loopback only, got {self.host!r}")


# ---- installation -----------------------------------------------------------------------------


def _package_dir() -> Path:
    """pytriton's directory, found without importing it (its client side needs packages the
    server does not: zmq, sh, ...)."""
    import importlib.util

    found = importlib.util.find_spec("pytriton")
    if found is None or not found.submodule_search_locations:
        raise ServerError("the Triton server comes from the `nvidia-pytriton` wheel; "
                          "install the serving extra: pip install -e '.[serving]'")
    return Path(next(iter(found.submodule_search_locations)))


def _wheel_dir() -> Path:
    return _package_dir() / "tritonserver"


def _libs_dir() -> Path:
    return _package_dir().parent / "nvidia_pytriton.libs"


def triton_home() -> Path:
    """The server's bin/backends/caches with this Python's stub, copied once into the cache dir."""
    from importlib.metadata import version

    wheel = _wheel_dir()
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = wheel / "python_backend_stubs" / py / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"nvidia-pytriton has no python backend stub for Python {py} ({stub})")
    cache = Path(os.environ.get("ALLSPARK_CACHE", Path.home() / ".cache" / "allspark"))
    home = cache / "tritonserver" / f"{version('nvidia-pytriton')}-py{py}"
    if (home / "bin" / "tritonserver").is_file():
        return home
    tmp = Path(tempfile.mkdtemp(prefix=".tritonserver-", dir=_mkdir(home.parent)))
    try:
        for part in ("bin", "backends", "caches"):
            shutil.copytree(wheel / part, tmp / part, symlinks=True)
        shutil.copy2(stub, tmp / "backends" / "python" / stub.name)
        os.replace(tmp, home)  # atomic: a half-copied server is never picked up
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (home / "bin" / "tritonserver").is_file():  # not merely lost a race to another process
            raise
    return home


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def available_backends() -> set[str]:
    """Backends this server build can run (the PyPI build: python only); ensembles need none."""
    return {p.name for p in (triton_home() / "backends").iterdir() if p.is_dir()}


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = os.pathsep.join(x for x in (str(_libs_dir()), libdir, env.get("LD_LIBRARY_PATH", "")) if x)
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    env.setdefault("OMP_NUM_THREADS", "1")  # numpy/torch inside many stubs: no oversubscription
    return env


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct ports free right now (bound together, so they differ, then released)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something listens on `port` (our bind fails; SO_REUSEADDR ignores TIME_WAIT leftovers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def check_ports(ports: dict[str, int], host: str = "127.0.0.1") -> None:
    """ServerError naming the first of `ports` ({what: port}, 0 = a free one, chosen later) that is
    taken or given twice: a server started on it would fail after loading every model, or worse,
    its readiness probe would reach the other server and report a false ready."""
    seen: dict[int, str] = {}
    for what, port in ports.items():
        if not port:
            continue
        if port in seen:
            raise ServerError(f"port {port} is given to both {seen[port]} and {what}; give each its own (0: a free one)")
        seen[port] = what
        if port_in_use(port, host):
            raise ServerError(f"port {port} ({what}) is already in use on {host}, by another server?; "
                              f"pick another with {what} N (0: a free one)")


def group_pids(pgid: int) -> list[int]:
    """Live processes of a process group (zombies excluded), read from /proc."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(d.name))
    return pids


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the process that started it dies, even by SIGKILL
    (Linux `prctl(PR_SET_PDEATHSIG)`), so a killed `allspark serve` leaves no server behind; the
    server's own shutdown then stops its python-backend stubs and frees their shared memory."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except OSError:  # not Linux: the atexit and signal handlers remain
        pass


# ---- the server -------------------------------------------------------------------------------


class TritonServer:
    """A `tritonserver` on loopback serving `repo`, with `models` loaded explicitly.

        with TritonServer("repo") as server:            # free ports; waits until ready
            client = tritonclient.http.InferenceServerClient(server.http_url)

    `models=None` loads every model in the repository whose backend this server build has (the PyPI
    build: python models and ensembles). Exiting stops the whole process group.
    """

    def __init__(self, repo: str | Path, http_port: int = 0, grpc_port: int = 0, metrics_port: int = 0,
                 models: Sequence[str] | None = None, options: ServerOptions | None = None,
                 log_path: str | Path | None = None):
        base = options or ServerOptions()
        self.options = ServerOptions(**{**base.__dict__, "http_port": http_port or base.http_port,
                                        "grpc_port": grpc_port or base.grpc_port,
                                        "metrics_port": metrics_port or base.metrics_port})
        self.repo = Path(repo).resolve()
        if not self.repo.is_dir():
            raise ServerError(f"{repo}: no such model repository; write one with `allspark serve BUILD --repo DIR`")
        self.models = list(models) if models is not None else loadable_models(self.repo)
        if not self.models:
            raise ServerError(f"{repo}: no model this server can load (backends: {sorted(available_backends())})")
        self._log_dir = None if log_path else tempfile.TemporaryDirectory(prefix="allspark-triton-")
        self.log_path = Path(log_path) if log_path else Path(self._log_dir.name) / "tritonserver.log"
        self.shm_prefix = f"allspark{os.getpid()}x{uuid.uuid4().hex[:8]}_"
        self.process: subprocess.Popen | None = None
        self.ports: dict[str, int] = {}

    # ---- urls -----------------------------------------------------------------------------------
    @property
    def http_url(self) -> str:
        return f"{self.options.host}:{self.ports['http']}"

    @property
    def grpc_url(self) -> str:
        return f"{self.options.host}:{self.ports['grpc']}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.options.host}:{self.ports['metrics']}/metrics"

    @property
    def pgid(self) -> int:
        if self.process is None:
            raise ServerError("the server is not running")
        return self.process.pid  # start_new_session: the server leads its own group

    # ---- lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> TritonServer:
        if self.process is None:  # (started already by a caller that handles a failed start itself)
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        if self.process is not None:
            raise ServerError("the server is already running")
        home = triton_home()
        atexit.register(self.stop)  # a crashed caller must not leave a server behind (stop is idempotent)
        for attempt in range(3):  # a free port can be taken between choosing and binding it
            self._launch(home)
            try:
                self._wait_ready()
                return
            except ServerError:
                log = self.log_tail()
                self.stop()
                if attempt == 2 or not re.search(r"address already in use|failed to start", log, re.IGNORECASE) \
                        or any(getattr(self.options, f"{k}_port") for k in ("http", "grpc", "metrics")):
                    raise

    def _launch(self, home: Path) -> None:
        o = self.options
        check_ports({f"{k}_port": getattr(o, f"{k}_port") for k in ("http", "grpc", "metrics")}, o.host)
        chosen = iter(free_ports(3, o.host))
        self.ports = {k: getattr(o, f"{k}_port") or next(chosen) for k in ("http", "grpc", "metrics")}
        cmd = [str(home / "bin" / "tritonserver"),
               f"--model-repository={self.repo}",
               f"--backend-directory={home / 'backends'}",
               f"--cache-directory={home / 'caches'}",
               "--model-control-mode=explicit",
               *(f"--load-model={m}" for m in self.models),
               f"--http-address={o.host}", f"--http-port={self.ports['http']}",
               f"--grpc-address={o.host}", f"--grpc-port={self.ports['grpc']}",
               f"--metrics-address={o.host}", f"--metrics-port={self.ports['metrics']}",
               "--allow-gpu-metrics=false", "--strict-readiness=true",
               "--disable-auto-complete-config",  # configs are complete; no extra stub per model
               f"--exit-timeout-secs={o.exit_timeout_s}",
               f"--model-load-thread-count={o.model_load_threads}",
               f"--log-verbose={o.log_verbose}",
               f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
               f"--backend-config=python,shm-default-byte-size={o.shm_default_bytes}",
               f"--backend-config=python,shm-growth-byte-size={o.shm_growth_bytes}"]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=server_env(), cwd=self.repo, start_new_session=True,
                                            preexec_fn=_die_with_parent)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.options.startup_timeout_s
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"tritonserver exited with status {self.process.returncode} while starting; "
                                  f"log tail ({self.log_path}):\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=1.0) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.1)
        raise ServerError(f"tritonserver not ready after {self.options.startup_timeout_s:.0f}s; "
                          f"log tail ({self.log_path}):\n{self.log_tail()}")

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2.0) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def stop(self) -> dict:
        """SIGTERM the process group, wait for a clean exit, SIGKILL what remains; clean /dev/shm.

        Returns what a clean shutdown should not need: {"killed": [pids], "shm_removed": [names]}.
        """
        report: dict = {"killed": [], "shm_removed": []}
        if self.process is None:
            return report
        pgid = self.process.pid
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(timeout=self.options.exit_timeout_s + 10)
        except subprocess.TimeoutExpired:
            report["killed"] += self._kill_group(pgid)
            self.process.wait(timeout=10)
        deadline = time.monotonic() + 10  # stubs notice their parent is gone within a second or two
        while group_pids(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        report["killed"] += self._kill_group(pgid)
        for f in self.leftover_shm():
            f.unlink(missing_ok=True)
            report["shm_removed"].append(f.name)
        self.process = None
        return report

    @staticmethod
    def _kill_group(pgid: int) -> list[int]:
        pids = group_pids(pgid)
        if pids:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    def leftover_shm(self) -> list[Path]:
        return sorted(SHM_DIR.glob(f"{self.shm_prefix}*")) if SHM_DIR.is_dir() else []

    def log_cause(self) -> str:
        """The log's last error line (Triton's `E<mmdd> <time> <pid> <file>] message`: the earlier ones are
        CPU-machine noise about CUDA), or its last line."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        for line in reversed(lines):
            m = re.match(r"^E\d{4} [\d:.]+ \d+ \S+\] (.*)", line)
            if m:
                return m.group(1).strip().strip('"')
        return next((ln.strip() for ln in reversed(lines) if ln.strip()), "(empty log)")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def loadable_models(repo: Path) -> list[str]:
    """Models of `repo` whose backend this server build has (ensembles need none), sorted."""
    from .model_config import read_config

    have = available_backends()
    names = []
    for d in sorted(p for p in repo.iterdir() if (p / "config.pbtxt").is_file()):
        cfg = read_config(d / "config.pbtxt")
        if cfg.platform == "ensemble" or cfg.backend in have:
            names.append(cfg.name or d.name)
    return names
