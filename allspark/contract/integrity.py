"""A build is checked before it is trusted: every file a component names must lie inside the build
and match the sha256 the manifest records for it.

Hashing a multi-GB build on every start would be slow, so a file's hash is remembered by what
changes whenever its content can: (device, inode, size, mtime, ctime). ctime cannot be set back by
an unprivileged user, so an edited file is hashed again even if its mtime was restored. The cache
lives in memory and in `$ALLSPARK_CACHE/hashes.json` (default `~/.cache/allspark`); a deployment
that verified its build once can pass `verify=False` to skip the check.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import AllSparkError
from ..fsutil import sha256_file


class BuildIntegrityError(AllSparkError, ValueError):
    """A build's file is missing, outside the build, or not what its manifest says."""

    def __init__(self, component: str, file: str, problem: str):
        self.component, self.file, self.problem = component, file, problem
        super().__init__(f"build component {component!r}: {file}: {problem}; re-export the build "
                         "(`allspark export CHECKPOINT --out BUILD`) or restore the file")


@dataclass(frozen=True)
class FileCheck:
    component: str
    file: str
    ok: bool
    problem: str = ""  # what is wrong: missing, outside the build, empty, sha256 mismatch, ...


_lock = threading.Lock()
_memory: dict[str, str] = {}


def _cache_path() -> Path:
    return Path(os.environ.get("ALLSPARK_CACHE", Path.home() / ".cache" / "allspark")) / "hashes.json"


def _key(path: Path, st: os.stat_result) -> str:
    return f"{path.resolve()}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"


def _load_disk_cache() -> dict[str, str]:
    try:
        data = json.loads(_cache_path().read_text())
        return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}
    except (OSError, ValueError):
        return {}


def cached_sha256(path: Path) -> str:
    """The file's sha256, computed once per version of the file (see the module docstring)."""
    key = _key(path, path.stat())
    with _lock:
        if not _memory:
            _memory.update(_load_disk_cache())
        if key in _memory:
            return _memory[key]
    digest = sha256_file(path)
    with _lock:
        _memory[key] = digest
        try:  # best effort: a read-only home only costs a re-hash next time
            cache = _cache_path()
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(dict(list(_memory.items())[-10_000:])))
            os.replace(tmp, cache)
        except OSError:
            pass
    return digest


def resolve_inside(build: Path, name: str) -> Path | None:
    """`build/name` if it names a file under the build, else None (absolute paths, `..`)."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or "\\" in name:
        return None
    root = build.resolve()
    path = (root / name).resolve()
    return path if path.is_relative_to(root) and path != root else None


@dataclass(frozen=True)
class ArtifactPaths:
    """Where one artifact's files lie: `main` is what a backend opens, `files` every hashed file
    (main included) by its manifest name, e.g. external-data files a graph refers to."""

    main: Path
    files: dict[str, Path]


def artifact_paths(build: str | Path, component: str, art: dict[str, Any], fmt: str = "") -> ArtifactPaths:
    """The only way from a manifest to a file that is opened: the artifact's `file` must be one of the
    files its `sha256` covers (the ones `check_files` verifies), and every path must lie in the build.
    Raises `BuildIntegrityError` naming the component and both names otherwise."""
    build = Path(build)
    main, hashed = art.get("file"), art.get("sha256") or {}
    if main not in hashed:
        raise BuildIntegrityError(component, str(main),
                                  f"the {fmt or 'artifact'} file {main!r} is not among the files its sha256 "
                                  f"covers ({sorted(hashed)}), so it would be opened unverified")
    files = {}
    for f in hashed:
        path = resolve_inside(build, f)
        if path is None:
            raise BuildIntegrityError(component, f, "the manifest names a path outside the build")
        files[f] = path
    return ArtifactPaths(files[main], files)


def check_files(build: str | Path, manifest: dict[str, Any], hashes: bool = True) -> Iterator[FileCheck]:
    """Every file of every component's artifacts, then the other files the manifest hashes
    (tokenizer, validation cases; reported under the component "build"). An artifact whose `file` is
    not among its hashed files fails here too (see `artifact_paths`)."""
    build = Path(build)
    for name, c in manifest["components"].items():
        for fmt, art in c["artifacts"].items():
            if art.get("file") not in (art.get("sha256") or {}):
                try:
                    artifact_paths(build, name, art, fmt)
                except BuildIntegrityError as e:
                    yield FileCheck(name, e.file, False, e.problem)
            for f, digest in (art.get("sha256") or {}).items():
                yield _check_one(build, name, f, digest, hashes)
    for f, digest in manifest.get("sha256", {}).items():
        yield _check_one(build, "build", f, digest, hashes)


def _check_one(build: Path, component: str, f: str, digest: str, hashes: bool) -> FileCheck:
    path = resolve_inside(build, f)
    if path is None:
        return FileCheck(component, f, False, "the manifest names a path outside the build")
    if not path.exists():
        return FileCheck(component, f, False, "missing")
    if not path.is_file():
        return FileCheck(component, f, False, "not a regular file")
    if path.stat().st_size == 0:
        return FileCheck(component, f, False, "empty")
    if hashes and cached_sha256(path) != digest:
        return FileCheck(component, f, False, "sha256 does not match the manifest (altered, truncated or swapped)")
    return FileCheck(component, f, True)


def verify_files(build: str | Path, manifest: dict[str, Any], hashes: bool = True) -> None:
    """Raise `BuildIntegrityError` for the first file that fails (a build is trusted whole or not at all)."""
    for check in check_files(build, manifest, hashes):
        if not check.ok:
            raise BuildIntegrityError(check.component, check.file, check.problem)
