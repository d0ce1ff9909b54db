"""Evaluate a checkpoint on held-out synthetic data, in the paper's terms.

    python -m allspark.demo.evaluate [CKPT] [--n 200] [--seed 1000003] [--markdown docs/demo_results.md]

Held-out sets come from `EVAL_SEED`, never used for training. Metrics per modality follow the
registry's metric names: top-1 accuracy (classification), OA / AA / kappa (HSI), RMSE / MAE / R2
(table, graph), ADE / FDE with the stay-in-place and constant-velocity baselines (trajectory),
and exact match of the generated answer (language: the sentiment word, so it is also the
accuracy; code: the docstring). CodeSearchNet's MRR needs a retrieval pool and is not computed.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..model.config import HeadKind, Modality
from ..model.model import AllSpark
from ..model.registry import spec
from .data import Sample, generate

EVAL_SEED = 1_000_003  # training uses small seeds; this stream is held out
TEST_N = 16  # per modality: the subset tests/test_demo.py re-evaluates against stored numbers
Metric = Callable[[np.ndarray, np.ndarray], float]


# ---- metrics -------------------------------------------------------------------------------------

def _confusion(pred: np.ndarray, true: np.ndarray, k: int) -> np.ndarray:
    cm = np.zeros((k, k))
    np.add.at(cm, (true, pred), 1)
    return cm


def overall_accuracy(pred: np.ndarray, true: np.ndarray) -> float:
    return float(np.mean(pred == true))


def average_accuracy(pred: np.ndarray, true: np.ndarray) -> float:
    """Mean of per-class recalls over the classes present."""
    return float(np.mean([np.mean(pred[true == c] == c) for c in np.unique(true)]))


def kappa(pred: np.ndarray, true: np.ndarray) -> float:
    cm = _confusion(pred, true, int(max(pred.max(), true.max())) + 1)
    n = cm.sum()
    po, pe = np.trace(cm) / n, (cm.sum(0) * cm.sum(1)).sum() / n ** 2
    return float((po - pe) / (1 - pe)) if pe < 1 else 1.0


def rmse(pred: np.ndarray, true: np.ndarray) -> float:
    return float(np.sqrt(np.mean((pred - true) ** 2)))


def mae(pred: np.ndarray, true: np.ndarray) -> float:
    return float(np.mean(np.abs(pred - true)))


def r2(pred: np.ndarray, true: np.ndarray) -> float:
    return float(1 - np.sum((pred - true) ** 2) / np.sum((true - true.mean()) ** 2))


def ade(pred: np.ndarray, true: np.ndarray) -> float:
    return float(np.linalg.norm(pred - true, axis=-1).mean())  # (n, pred_len, 2) metres


def fde(pred: np.ndarray, true: np.ndarray) -> float:
    return float(np.linalg.norm(pred[:, -1] - true[:, -1], axis=-1).mean())


def exact_match(pred: np.ndarray, true: np.ndarray) -> float:
    return float(np.mean([p.strip() == t.strip() for p, t in zip(pred, true)]))


# The registry's metric names -> functions; fractions are reported in percent.
METRICS: dict[str, Metric] = {
    "top-1": overall_accuracy, "OA": overall_accuracy, "AA": average_accuracy, "kappa": kappa,
    "RMSE": rmse, "MAE": mae, "R2": r2, "ADE": ade, "FDE": fde,
    "accuracy": exact_match, "exact match": exact_match,
}
PERCENT = {"top-1", "OA", "AA", "kappa", "accuracy", "exact match"}


# Reference predictors from the inputs alone, reported next to the model's numbers.
# Each takes a sample and the target's shape.
def _stay(s: Sample, shape: tuple[int, ...]) -> np.ndarray:
    return np.repeat(s.inputs["observed"][-1:], shape[0], 0)  # (pred_len, 2)


def _constant_velocity(s: Sample, shape: tuple[int, ...]) -> np.ndarray:
    obs = s.inputs["observed"]
    return obs[-1] + np.arange(1, shape[0] + 1)[:, None] * (obs[-1] - obs[-2])


def _last_value(s: Sample, shape: tuple[int, ...]) -> np.ndarray:
    return np.repeat(s.inputs["series"][:, -1, :1], shape[1], 1)  # (nodes, horizon)


BASELINES: dict[Modality, dict[str, Callable[[Sample, tuple[int, ...]], np.ndarray]]] = {
    Modality.TRAJECTORY: {"stay": _stay, "const-vel": _constant_velocity},
    Modality.GRAPH: {"last value": _last_value},
}


# The embedded default's quality bar (issue 3): (rule, test on a modality's metrics).
_CLASS_BAR = ("accuracy >= 90%", lambda r: r.get("top-1", r.get("OA", -1.0)) >= 90.0)
_TEXT_BAR = ("exact match >= 90%", lambda r: r["exact match"] >= 90.0)
_R2_BAR = ("R2 >= 0.8", lambda r: r["R2"] >= 0.8)
_TRAJECTORY_BAR = ("ADE <= 0.5 x stay-in-place and <= 1.1 x constant velocity",
                   lambda r: r["ADE"] <= 0.5 * r["ADE (stay)"] and r["ADE"] <= 1.1 * r["ADE (const-vel)"])


def quality_bar(m: Modality | str, res: dict[str, float]) -> tuple[str, bool]:
    """(the rule, whether `res` meets it) for one modality's metrics from `evaluate`."""
    m = Modality(m)
    if m == Modality.TRAJECTORY:
        rule, ok = _TRAJECTORY_BAR
    elif spec(m).head == HeadKind.GENERATION:
        rule, ok = _TEXT_BAR
    elif "R2" in res:
        rule, ok = _R2_BAR
    else:
        rule, ok = _CLASS_BAR
    return rule, bool(ok(res))


# ---- running the model ---------------------------------------------------------------------------

@torch.no_grad()
def predict(model: AllSpark, m: Modality, samples: Sequence[Sample], batch_size: int = 64,
            max_new_tokens: int = 24) -> np.ndarray:
    """Predictions in the targets' form: label ids, postprocessed values, or generated text."""
    out: list[Any] = []
    for i in range(0, len(samples), batch_size):
        rows = [model.prepare(m, s.inputs) for s in samples[i:i + batch_size]]
        if spec(m).head == HeadKind.GENERATION:
            ids = model.generate(rows, max_new_tokens=max_new_tokens)
            out += [model.tokenizer.decode(t, skip_special_tokens=True).strip() for t in ids]
        elif spec(m).head == HeadKind.REGRESSION:
            out += [model.postprocess(r, y)["values"] for r, y in zip(rows, model(rows))]
        else:
            out += [int(y.argmax()) for y in model(rows)]
    return np.array(out, dtype=object) if spec(m).head == HeadKind.GENERATION else np.stack(out)


def metric_names(m: Modality) -> tuple[str, ...]:
    names = tuple(n for n in spec(m).metrics if n in METRICS)
    return names + (("exact match",) if spec(m).head == HeadKind.GENERATION and "exact match" not in names else ())


def evaluate_modality(model: AllSpark, m: Modality, samples: Sequence[Sample]) -> dict[str, float]:
    pred = predict(model, m, samples)
    true = np.array([s.target for s in samples], dtype=object) if isinstance(samples[0].target, str) \
        else np.stack([np.asarray(s.target) for s in samples])
    res = {name: METRICS[name](pred, true) for name in metric_names(m)}
    for base, fn in BASELINES.get(m, {}).items():
        bp = np.stack([fn(s, true.shape[1:]) for s in samples])
        res.update({f"{name} ({base})": METRICS[name](bp, true) for name in metric_names(m)})
    return {k: round(100 * v if k.split(" (")[0] in PERCENT else v, 4) for k, v in res.items()}


def evaluate(model: AllSpark, n_per_modality: int = 200, seed: int = EVAL_SEED,
             modalities: Sequence[Modality | str] | None = None, verbose: bool = True) -> dict[str, dict[str, float]]:
    """Metrics per modality on `n_per_modality` held-out samples drawn with `seed`."""
    mods = [Modality(m) for m in modalities] if modalities else list(model.modalities)
    results = {}
    for m in mods:
        results[m.value] = evaluate_modality(model, m, generate(m, n_per_modality, seed, model.config))
        if verbose:
            rule, ok = quality_bar(m, results[m.value])
            print(f"{m.value:<12} " + "  ".join(f"{k}={v:.4g}" for k, v in results[m.value].items())
                  + f"  [{'meets' if ok else 'MISSES'} {rule}]", flush=True)
    return results


# ---- reporting -----------------------------------------------------------------------------------

def markdown_table(results: dict[str, dict[str, float]], n: int, seed: int) -> str:
    lines = [(f"Held-out synthetic data: {n} samples per modality, seed {seed}. Percentages for "
              "accuracy, OA/AA/kappa and exact match; ug/m3 (table), mph (graph), metres (trajectory)."),
             "", "| modality | metric | model | baselines | quality bar |", "|---|---|---|---|---|"]
    for m, res in results.items():
        rule, ok = quality_bar(m, res)
        for i, name in enumerate(k for k in res if " (" not in k):
            base = ", ".join(f"{k.split(' (')[1][:-1]} {v:.4g}" for k, v in res.items() if k.startswith(name + " ("))
            bar = f"{rule}: {'met' if ok else '**missed**'}" if i == 0 else ""
            lines.append(f"| {m} | {name} | {res[name]:.4g} | {base} | {bar} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m allspark.demo.evaluate` is `allspark eval`."""
    from .cli import add_arguments

    p = argparse.ArgumentParser(prog="python -m allspark.demo.evaluate", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    a = p.parse_args(argv)
    return a.func(a)


if __name__ == "__main__":
    raise SystemExit(main())
