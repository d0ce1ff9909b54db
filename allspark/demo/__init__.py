"""The embedded default: synthetic data for every built-in modality (its generators live with the
built-in plug-in, `allspark.modalities.synthetic`), a CPU trainer for the `demo` preset, the
evaluation in the paper's terms, and the trained checkpoint (`checkpoint/`).

    from allspark.demo import DEFAULT_CHECKPOINT, generate
    samples = generate("rgb", n=8, seed=0)            # requests + targets, deterministic by seed
    python -m allspark.demo.train                     # 10-16 min on 2 CPU cores -> checkpoint/
    python -m allspark.demo.evaluate                  # held-out metrics of checkpoint/

Importing this package imports nothing heavy (the names below load on first use), so that
`python -m allspark.demo.train` can configure OpenMP before torch loads.
"""

from pathlib import Path

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "checkpoint"

__all__ = ["DEFAULT_CHECKPOINT", "Sample", "generate", "generate_all"]


def __getattr__(name: str):
    if name in ("Sample", "generate", "generate_all"):
        from . import data

        return getattr(data, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
