"""Memory that never surprises: a command that loads weights estimates its peak before it starts and,
when that does not fit the memory available, refuses at once -- naming the size, what is available
and the options that fit -- instead of being killed by the kernel's OOM killer with no message.

    need = Need("allspark export", 28.4e9, parts=(("decoder, fp32 graph", 27.0e9), ...),
                fits=(("--precision int4", 5.2e9), ...))
    check(need)          raises InsufficientMemory unless need * 1.1 fits MemAvailable (and the cgroup)

Estimates are upper-bound models of what each command holds at its peak (docs/DESIGN.md, "Memory"),
measured against the real peaks in docs/benchmarks/scale.md. ALLSPARK_MEMORY_CHECK=off skips the
check (a machine with swap, or an estimate you know is pessimistic); ALLSPARK_MEMORY_AVAILABLE=8GB
pretends less memory is available (tests, or leaving room for something else).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import AllSparkError

log = logging.getLogger("allspark")
MARGIN = 1.1  # what the estimate may be off by before a run that "fits" is killed anyway
# What an onnxruntime CPU session holds per byte of its graph file: fp32 weights as written (+ arena);
# fp16 converted to fp32 beside the originals (a 2.2 GB fp16 decoder: a 4.7 GB session); int4/int8
# MatMulNBits/QMoE weights prepacked for the kernels (docs/benchmarks/scale.md)
SESSION_FACTOR = {"fp32": 1.1, "fp16": 2.2, "int8": 1.3, "int4": 1.3}
RUNTIME_BASE = 350_000_000  # a runtime process before any session: python, onnxruntime, numpy, tokenizer
_UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 1 << 10, "MIB": 1 << 20,
          "GIB": 1 << 30}


class InsufficientMemory(AllSparkError, MemoryError):
    """A command's estimated peak does not fit the memory available."""


@dataclass(frozen=True)
class Need:
    command: str  # e.g. "allspark export"
    bytes: int
    parts: tuple[tuple[str, int], ...] = ()  # what the peak is made of
    fits: tuple[tuple[str, int], ...] = ()  # (options, their estimated peak): alternatives to offer

    def __post_init__(self):
        object.__setattr__(self, "bytes", int(self.bytes))


def gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise AllSparkError(f"ALLSPARK_MEMORY_AVAILABLE: expected a size such as 8GB or 512MiB, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def available_bytes() -> int:
    """What can still be allocated: MemAvailable, lowered by a cgroup (container) limit if there is
    one; ALLSPARK_MEMORY_AVAILABLE overrides. 0 where nothing can be read (no check then)."""
    if os.environ.get("ALLSPARK_MEMORY_AVAILABLE"):
        return parse_bytes(os.environ["ALLSPARK_MEMORY_AVAILABLE"])
    avail = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return 0
    try:  # cgroup v2: the container's own limit
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            avail = min(avail, max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return avail


def check(need: Need, available: int | None = None) -> None:
    """Refuse `need` (InsufficientMemory) unless its peak, with a 10% margin, fits what is available."""
    if os.environ.get("ALLSPARK_MEMORY_CHECK", "").lower() in ("off", "0", "no"):
        return
    avail = available_bytes() if available is None else available
    if not avail:
        return
    log.debug("%s: estimated peak %s of %s available", need.command, gb(need.bytes), gb(avail))
    if need.bytes * MARGIN <= avail:
        return
    parts = f" ({', '.join(f'{what} {gb(n)}' for what, n in need.parts)})" if need.parts else ""
    fitting = [(opt, n) for opt, n in need.fits if n * MARGIN <= avail]
    if fitting:
        how = "; it fits with " + " or ".join(f"`{opt}` (~{gb(n)})" for opt, n in fitting)
    elif need.fits:
        how = ("; none of " + ", ".join(f"`{opt}` (~{gb(n)})" for opt, n in need.fits) + " fits either: "
               "free memory or use a bigger machine")
    else:
        how = "; free memory or use a bigger machine"
    raise InsufficientMemory(f"{need.command} needs about {gb(need.bytes)} of memory{parts}, and "
                             f"{gb(avail)} is available{how} (ALLSPARK_MEMORY_CHECK=off runs it anyway)")
