"""Run one export in a forked child, so that what the exporter keeps alive dies with the child.

torch's dynamo exporter keeps references to the weights it traced after it returns (a module-level
map in `torch.fx.experimental.proxy_tensor` and tensors held from C++): for the base decoder 4.1 of
its 4.3 GB stayed resident, so the onnxruntime session of the parity check came on top (peak 9.2 GB
= 2.1x the weights). A forked child shares the parent's weights copy-on-write (the exporter only
reads them), writes the graph and exits; the parent then owns its weights alone and can free them
before onnxruntime loads the graph.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import traceback
from collections.abc import Callable
from typing import Any

# components whose weights reach this size export in a child by default (fork costs ~10 ms)
ISOLATE_BYTES = 256 << 20


def can_fork() -> bool:
    return hasattr(os, "fork") and sys.platform.startswith("linux")


def run_forked(fn: Callable[[], Any], what: str, error: type[Exception]) -> Any:
    """`fn()` in a forked child; its JSON-able result comes back through a pipe. An exception in the
    child is raised here as `error` with the child's message; a child killed (e.g. by the kernel's
    out-of-memory killer) is reported as such."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into the parent's stack (atexit, context managers)
        code = 0
        try:
            os.close(r)
            _single_threaded()
            try:
                payload = {"result": fn()}
            except BaseException as e:  # noqa: BLE001 -- everything goes back to the parent
                payload = {"error": str(e) if isinstance(e, error) else f"{type(e).__name__}: {e}",
                           "trace": traceback.format_exc(limit=8)}
            with os.fdopen(w, "w") as f:
                json.dump(payload, f)
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        hint = " (out of memory? the kernel's OOM killer sends SIGKILL)" if sig == signal.SIGKILL else ""
        raise error(f"{what}: the export process was killed by {signal.Signals(sig).name}{hint}")
    try:
        payload = json.loads(data)
    except ValueError:
        raise error(f"{what}: the export process exited with status {os.WEXITSTATUS(status)} and no result") from None
    if "error" in payload:
        raise error(payload["error"])
    return payload["result"]


def _single_threaded() -> None:
    """A forked child must not enter the intra-op thread pool its parent already started: the pool's
    workers did not survive the fork, and the first parallel op (e.g. casting a 4096-wide example
    input) waits for them forever. The exporter only traces, so one thread costs nothing."""
    import torch

    torch.set_num_threads(1)


def return_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise, and RSS stays high)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
