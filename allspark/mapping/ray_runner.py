"""The same map job on Ray Data: the pending chunks are a dataset, `map_batches` runs them on a pool
of actors that each hold one `Runtime`, and the driver commits every result as it streams back.

Each dataset row is one chunk (scene index, chunk index) -- the same chunks, hence the same model
calls, as the single-process run -- so the outputs are identical to it. The build reaches the
workers through Ray's object store (packed once by the driver, unpacked once per node into a
directory named by its manifest's sha256, verified on load like any build), never as a path assumed
on every node. Workers read the scenes themselves (a shared file system, or a GDAL-readable URL),
and this package must be installed on each node. The results (a few bytes per window) come back to
the driver, which alone writes DIR; a lost node's chunks are retried on the actors left (Ray Data
restarts actors and retries their tasks), and a chunk is committed only whole.

    --ray            a local Ray cluster started for the job (--workers CPUs), stopped at its end
    --ray ADDRESS    an existing cluster (`ray start --head`; "auto", "ray://host:10001")
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from .settings import MapError

log = logging.getLogger(__name__)


class _Actor:
    """A Ray Data callable class: built once per actor, called with one chunk per batch."""

    def __init__(self, packed: list, backend: str, threads: int, paths: list[str], settings):
        import ray

        from ..runtime.runtime import Runtime
        from .plan import plan_run
        from .predict import ChunkPredictor

        build = unpack_build(*ray.get(packed[0]))  # [ref]: nested, so that Ray hands the ref, not the bytes
        self.node = ray.get_runtime_context().get_node_id()
        # the plans again, from the scenes' headers: the same pure function of sizes and settings
        # as the driver's, and small constructor arguments (large ones go through the object store)
        _, rmap, mc, plans = plan_run(Path(build), [Path(p) for p in paths], settings)
        options = ({"threads": threads, "modalities": [mc.modality], "shared_arena": True}
                   if backend == "onnxruntime" else {})
        self.predictor = ChunkPredictor(Runtime.load(build, backend=backend, **options), plans, rmap, mc, settings)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = [self.predictor(int(s), int(c)).to_bytes() for s, c in zip(batch["scene"], batch["chunk"])]
        return {"scene": batch["scene"], "chunk": batch["chunk"], "result": np.asarray(out, dtype=object),
                "node": np.asarray([self.node] * len(out), dtype=object)}


def pack_build(build: Path) -> tuple[str, bytes]:
    """(the manifest's sha256, a tar of the build's files): what a worker needs to hold the build."""
    import io
    import tarfile

    from ..fsutil import sha256_file

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for f in sorted(build.rglob("*")):
            rel = f.relative_to(build)
            if f.is_file() and rel.parts[0] != "trt_cache":  # engines are per machine
                tar.add(f, arcname=str(rel), recursive=False)
    return sha256_file(build / "manifest.json"), buf.getvalue()


def unpack_build(digest: str, data: bytes) -> str:
    """The build on this node: `$TMPDIR/allspark-builds/<sha256>`, unpacked once (atomically: the
    actors of one node may race here) and verified when the Runtime loads it."""
    import io
    import tarfile
    import tempfile

    root = Path(tempfile.gettempdir()) / "allspark-builds"
    dest = root / digest
    if not (dest / "manifest.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{digest[:12]}-"))
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            tar.extractall(tmp, filter="data")  # no paths outside tmp, no links out
        try:
            os.rename(tmp, dest)
        except OSError:  # another actor got there first: theirs is the same build
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return str(dest)


def run_on_ray(build, plans, pending: list[tuple[int, int]], settings, ex, on_result) -> dict[str, Any]:
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise MapError(f"--ray needs Ray Data ({e}); install it: pip install 'allspark-runtime[ray]'") from None
    from .predict import ChunkResult

    started = not ray.is_initialized()
    if started:
        kw: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                                  configure_logging=False)
        if ex.ray:
            kw["address"] = ex.ray
        else:
            kw["num_cpus"] = ex.workers
        # the actors import this package from the driver's environment (the same venv on one machine)
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        try:
            ray.init(**kw)
        except Exception as e:
            raise MapError(f"cannot start or reach the Ray cluster {ex.ray or '(local)'}: {e}") from None
    for name in ("ray", "ray.data"):  # the job's own bar and errors say what matters
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the job's own bar counts commits
        ctx.execution_options.preserve_order = False
        ds = ray.data.from_items([{"scene": s, "chunk": c} for s, c in pending], override_num_blocks=min(len(pending), 200))
        threads = ex.threads or 1  # one CPU per actor: more intra-op threads would oversubscribe it
        packed = ray.put(pack_build(Path(build)))
        ds = ds.map_batches(_Actor, batch_size=1, batch_format="numpy", concurrency=ex.workers, num_cpus=1,
                            fn_constructor_kwargs=dict(packed=[packed], backend=ex.backend, threads=threads,
                                                       paths=[p.scene.path for p in plans], settings=settings))
        per_node: dict[str, int] = {}
        for batch in ds.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=2):
            for s, c, r, n in zip(batch["scene"], batch["chunk"], batch["result"], batch["node"]):
                on_result(int(s), int(c), ChunkResult.from_bytes(bytes(r)))
                per_node[str(n)] = per_node.get(str(n), 0) + 1
        alive = [n for n in ray.nodes() if n.get("Alive")]
        return {"ray": {"nodes": len(alive), "cpus": ray.cluster_resources().get("CPU"), "chunks_per_node": per_node}}
    except MapError:
        raise
    except Exception as e:  # a worker's error arrives wrapped: surface its message
        cause = getattr(e, "cause", None) or e
        raise MapError(f"the Ray job failed: {type(cause).__name__}: {cause}") from None
    finally:
        if started:
            ray.shutdown()
