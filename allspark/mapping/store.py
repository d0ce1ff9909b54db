"""A map run's directory: what it was asked (run.json), what is done (one file per chunk), and
nothing half-written.

    DIR/run.json                        settings, build, scenes (written first)
    DIR/parts/<scene>/<chunk>.npz       one committed chunk (`ChunkResult`), written atomically
    DIR/<scene>.classes.tif ...         the outputs, assembled from the parts at the end

A run resumes into DIR only when run.json says the same settings, build and scenes; it then skips
the chunks whose parts exist. A directory written with other settings is refused (naming what
differs) unless --overwrite, which removes this run's own files and nothing else; a directory that
is not empty and holds no map run is always refused.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from .predict import ChunkResult
from .settings import MapError

FORMAT = "allspark-map"
VERSION = 1
RUN_FILE = "run.json"
PARTS = "parts"
OUTPUT_SUFFIXES = (".classes.tif", ".confidence.tif", ".tiles.geojson", ".preview.png")
SUMMARY = "summary.json"


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _differences(old: Any, new: Any, where: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _differences(old.get(k), new.get(k), f"{where}.{k}" if where else k)
        return out
    return [] if old == new else [f"{where}: {old!r} there, {new!r} now"]


class RunStore:
    def __init__(self, out: str | Path):
        self.out = Path(out)

    def begin(self, identity: dict[str, Any], overwrite: bool) -> bool:
        """Prepare DIR for a run of `identity`; True when it resumes an earlier one."""
        run = self.out / RUN_FILE
        if run.is_file():
            try:
                old = json.loads(run.read_text())
            except (OSError, ValueError) as e:
                raise MapError(f"{run}: unreadable ({e}); remove it, or map into another directory") from None
            if old.get("format") == FORMAT and old.get("identity") == identity:
                if not overwrite:
                    return True
            elif not overwrite:
                diff = _differences(old.get("identity"), identity) or ["the run format"]
                raise MapError(f"{self.out} holds a map run with other settings ({'; '.join(diff[:6])}); "
                               "pass --overwrite to replace it, or choose another --out")
            self._remove_own()
        elif self.out.exists() and any(self.out.iterdir()):
            raise MapError(f"{self.out} is not empty and holds no map run (no {RUN_FILE}); "
                           "choose a new or empty directory for --out")
        self.out.mkdir(parents=True, exist_ok=True)
        write_atomic(run, json.dumps({"format": FORMAT, "version": VERSION, "identity": identity}, indent=1).encode())
        return False

    def _remove_own(self) -> None:
        shutil.rmtree(self.out / PARTS, ignore_errors=True)
        for p in self.out.iterdir():
            if p.name in (RUN_FILE, SUMMARY) or p.name.endswith(OUTPUT_SUFFIXES):
                p.unlink()

    def _part(self, scene: str, chunk: int) -> Path:
        return self.out / PARTS / scene / f"{chunk:07d}.npz"

    def done(self, scene: str) -> set[int]:
        d = self.out / PARTS / scene
        return {int(p.stem) for p in d.glob("*.npz") if p.stem.isdigit()} if d.is_dir() else set()

    def commit(self, scene: str, chunk: int, result: ChunkResult | bytes) -> None:
        path = self._part(scene, chunk)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, result if isinstance(result, bytes) else result.to_bytes())

    def load(self, scene: str, chunk: int) -> ChunkResult:
        path = self._part(scene, chunk)
        try:
            return ChunkResult.from_bytes(path.read_bytes())
        except Exception as e:  # a damaged part: say which, so it can be removed and redone
            raise MapError(f"{path}: a damaged part ({type(e).__name__}: {e}); delete it and rerun to redo "
                           "that chunk") from None

    def output(self, scene: str, suffix: str) -> Path:
        return self.out / f"{scene}{suffix}"
