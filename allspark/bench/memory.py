"""Peak memory of a command and every process it forks: proportional set size (PSS) summed over the
process tree, sampled every 50 ms.

`ru_maxrss` is per process, and a forked child's RSS counts the pages it shares with its parent:
summing RSS double-counts them, taking the max misses one side. PSS splits each shared page among
its sharers, so the tree's PSS is what the machine actually holds for the command. Sampling backs off
on big processes (reading PSS walks their page tables), so a spike shorter than that can be missed.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Measured:
    seconds: float
    peak_pss_mb: float  # the tree's summed PSS at its highest sample
    peak_rss_mb: float  # the largest single process's ru_maxrss (for comparison)
    returncode: int


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _tree(pid: int) -> list[int]:
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += _children(p)
    return seen


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def tree_pss_mb(pid: int) -> float:
    return sum(_pss_kb(p) for p in _tree(pid)) / 1024


def measure(cmd: list[str], env: dict[str, str] | None = None, interval: float = 0.05,
            stdout=subprocess.DEVNULL) -> Measured:
    """Run `cmd` to completion; its wall time and peak memory (see the module's docstring)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.PIPE, env=env)
    peak = [0.0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            t = time.perf_counter()
            peak[0] = max(peak[0], tree_pss_mb(proc.pid))
            # reading PSS walks the page tables: ~0.1 s for a 14 GB process; keep it under 20% of a core
            done.wait(max(interval, 4 * (time.perf_counter() - t)))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    stderr = proc.stderr.read() if proc.stderr else b""
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    done.set()
    thread.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = stderr.decode(errors="replace").strip().splitlines()[-5:]
        raise RuntimeError(f"{' '.join(cmd[:5])} ... exited with status {proc.returncode}: " + " | ".join(tail))
    return Measured(round(seconds, 2), round(peak[0], 1), round(usage.ru_maxrss / 1024, 1), proc.returncode)
