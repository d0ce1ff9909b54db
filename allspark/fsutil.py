"""Files and directories every artefact writer shares: hashing, and atomic directory replacement.

A checkpoint, a build and a Triton repository are each written into a temporary sibling
directory and renamed into place only when complete:

    with atomic_directory(out) as tmp:      # .<name>.tmp-<pid>-XXXX next to `out`
        write everything into tmp           # an exception (or a kill) leaves `out` untouched
    # here `out` is the new directory; an old `out` was swapped out and removed

Temporary directories of writers that were killed are removed by the next writer to the same
place (their pid is in the name).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def check_output_directory(out: str | Path, overwrite: bool, ours: Callable[[Path], bool], what: str) -> bool:
    """Before a command writes `out` (cheaply, ahead of any heavy import): an existing non-empty
    directory is refused unless `overwrite`, and even then only when `ours(out)` says it is one of
    our own `what`s (never someone's home directory). Returns True when `out` will be replaced."""
    from .errors import AllSparkError

    out = Path(out)
    if not out.exists():
        return False
    if not out.is_dir():
        raise AllSparkError(f"{out} exists and is not a directory; choose another --out")
    if not any(out.iterdir()):
        return False
    if not overwrite:
        raise AllSparkError(f"{out} already exists and is not empty; add --overwrite to replace it, or choose "
                            "another --out")
    if not ours(out):
        raise AllSparkError(f"{out} is not an allspark {what}; --overwrite replaces only a {what}: choose another --out")
    return True


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _temp_prefix(out: Path) -> str:
    return f".{out.name}.tmp-"


def remove_stale_temps(out: str | Path) -> None:
    """Temporary directories of earlier writers to `out` whose process is gone (killed midway)."""
    out = Path(out)
    remove_stale(out.parent, _temp_prefix(out))


def remove_stale(parent: Path, prefix: str) -> None:
    """Directories `parent/<prefix><pid>-*` whose process no longer exists."""
    for d in Path(parent).glob(f"{prefix}*-*"):
        try:
            pid = int(d.name[len(prefix):].split("-", 1)[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, PermissionError):
            continue


def replace_directory(tmp: Path, out: Path) -> None:
    """Move the finished `tmp` to `out`; an existing `out` is swapped aside first, then removed."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


@contextlib.contextmanager
def atomic_directory(out: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory that becomes `out` when the block succeeds."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_temp_prefix(out)}{os.getpid()}-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would make the renamed directory private to its writer
    try:
        yield tmp
        replace_directory(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
