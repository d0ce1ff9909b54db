"""Valid random requests per modality, sized from a preset (tests, export validation, smoke runs).

`shape_variant` lets callers ask for inputs at a size other than the model's native one (images
of another resolution, point clouds of another count), as export validation must.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .config import Modality, ModalityConfig

_WORDS = "the movie was great and the acting was wonderful but the plot felt slow at times".split()


def random_inputs(mc: ModalityConfig, rng: np.random.Generator, shape_variant: int = 0) -> dict[str, Any]:
    e, v = mc.encoder, shape_variant
    m = mc.modality
    if m in (Modality.LANGUAGE, Modality.CODE):
        n = 5 + 3 * v + int(rng.integers(0, 6))
        words = [_WORDS[i] for i in rng.integers(0, len(_WORDS), n)]
        text = " ".join(words) if m == Modality.LANGUAGE else f"def f(x):\n    return x + {n}  # {words[0]}"
        return {"text": text}
    if m == Modality.TABLE:
        return {"discrete": np.array([rng.integers(0, c) for c in e.cardinalities], dtype=np.int64),
                "continuous": rng.normal(size=e.num_continuous).astype(np.float32)}
    if m == Modality.RGB:
        side = e.image_size + 7 * v
        return {"image": rng.integers(0, 256, (side, side + 3 * v, 3), dtype=np.uint8)}
    if m == Modality.MSI:
        side = e.image_size + 4 * v
        return {"image": rng.uniform(0.0, 0.4, (side, side, e.channels)).astype(np.float32)}
    if m == Modality.HSI:
        return {"spectrum": rng.uniform(0.0, 1.0, e.bands).astype(np.float32)}
    if m == Modality.SAR:
        side = e.image_size + 8 * v
        ch = 1 if v % 2 else e.channels
        return {"image": rng.gamma(1.0, 1.0, (side, side, ch)).astype(np.float32)}
    if m == Modality.TRAJECTORY:
        steps = np.cumsum(rng.normal(0.4, 0.1, (e.obs_len, 2)), axis=0) + rng.normal(0, 5, 2)
        return {"observed": steps.astype(np.float32)}
    if m == Modality.GRAPH:
        return {"series": rng.uniform(0, 70, (e.num_nodes, e.in_steps, e.features)).astype(np.float32),
                "time_of_day": int(rng.integers(0, e.steps_per_day)), "day_of_week": int(rng.integers(0, 7))}
    if m == Modality.POINT_CLOUD:
        n = max(8, e.num_points + (-e.num_points // 3 if v % 2 else 37 * v))
        return {"points": rng.normal(size=(n, 3 + e.extra_features)).astype(np.float32)}
    raise KeyError(m)
