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
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..commands import at_least
from ..model.registry import resolve_modality
from .data import Sample, demo_spec, generate

if TYPE_CHECKING:  # torch loads when a model is evaluated, not when `allspark eval` parses its arguments
    from ..model.model import AllSpark

log = logging.getLogger(__name__)

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


HIGHER_IS_BETTER = PERCENT | {"R2"}  # the rest (RMSE, MAE, ADE, FDE) are errors


def lost_to(m: str, res: dict[str, float]) -> list[str]:
    """The baselines in `res` that match or beat the model on its first metric, each as
    "last value: RMSE 1.911 vs the model's 3.293" (a model no better than a predictor that ignores
    most of its input has learnt nothing worth its cost, whatever its absolute score)."""
    name = metric_names(m)[0]
    model = res.get(name)
    if model is None:
        return []
    wins = (lambda a, b: a > b) if name in HIGHER_IS_BETTER else (lambda a, b: a < b)
    return [f"{k[len(name) + 2:-1]}: {name} {v:.4g} vs the model's {model:.4g}"
            for k, v in res.items() if k.startswith(f"{name} (") and not wins(model, v)]


def quality_bar(m: str, res: dict[str, float]) -> tuple[str, bool]:
    """(the rule, whether `res` meets it) for one modality's metrics from `evaluate`: its demo task's
    bar and, where `res` holds baselines, beating every one of them on the first metric."""
    bar = demo_spec(m).demo.quality_bar
    name = metric_names(m)[0]
    bases = [k[len(name) + 2:-1] for k in res if k.startswith(f"{name} (")]
    rule = bar.rule + (f", {name} better than {' and '.join(bases)}" if bases else "")
    return rule, bool(bar.check(res)) and not lost_to(m, res)


def naive_baselines(true: np.ndarray) -> dict[str, np.ndarray]:
    """Predictions that ignore the input, for a modality with no baseline of its own: the most
    frequent target (labels, text) or the mean target (values), both taken from the held-out set."""
    if true.dtype == object or np.issubdtype(true.dtype, np.integer):
        values, counts = np.unique(true, return_counts=True)
        return {"majority": np.full(true.shape, values[np.argmax(counts)], dtype=true.dtype)}
    return {"mean": np.broadcast_to(true.mean(axis=0), true.shape)}


# ---- running the model ---------------------------------------------------------------------------

def predict(model: AllSpark, m: str, samples: Sequence[Sample], batch_size: int = 64,
            max_new_tokens: int = 24) -> np.ndarray:
    """Predictions in the targets' form: label ids, postprocessed values, or generated text."""
    import torch

    with torch.no_grad():
        return _predict(model, m, samples, batch_size, max_new_tokens)


def _predict(model: AllSpark, m: str, samples: Sequence[Sample], batch_size: int, max_new_tokens: int) -> np.ndarray:
    head = demo_spec(m).head
    if hasattr(model, "predict_batch"):  # an exported build on a Runtime backend
        return _predict_runtime(model, m, samples, batch_size, max_new_tokens)
    out: list[Any] = []
    for i in range(0, len(samples), batch_size):
        rows = [model.prepare(m, s.inputs) for s in samples[i:i + batch_size]]
        if head.generates:
            ids = model.generate(rows, max_new_tokens=max_new_tokens)
            out += [model.tokenizer.decode(t, skip_special_tokens=True).strip() for t in ids]
        elif head.regresses:
            out += [model.postprocess(r, y).values for r, y in zip(rows, model(rows))]
        else:
            out += [int(y.argmax()) for y in model(rows)]
    return np.array(out, dtype=object) if head.generates else np.stack(out)


def _predict_runtime(rt, m: str, samples: Sequence[Sample], batch_size: int, max_new_tokens: int) -> np.ndarray:
    """The same predictions from `Runtime.predict_batch` (greedy, as the reference's generate)."""
    from ..runtime import GenerationConfig, Request

    head = demo_spec(m).head
    labels = list(rt.config.modality(m).labels)
    gen = GenerationConfig(max_new_tokens=max_new_tokens)
    out: list[Any] = []
    for i in range(0, len(samples), batch_size):
        for p in rt.predict_batch([Request(m, s.inputs) for s in samples[i:i + batch_size]], gen):
            if isinstance(p, Exception):
                raise p
            out.append(p.text if head.generates else np.asarray(p.values) if head.regresses else labels.index(p.label))
    return np.array(out, dtype=object) if head.generates else np.stack(out)


def metric_names(m: str) -> tuple[str, ...]:
    s = demo_spec(m)
    names = tuple(n for n in s.metrics if n in METRICS)
    return names + (("exact match",) if s.head.generates and "exact match" not in names else ())


def evaluate_modality(model: AllSpark, m: str, samples: Sequence[Sample]) -> dict[str, float]:
    pred = predict(model, m, samples)
    true = np.array([s.target for s in samples], dtype=object) if isinstance(samples[0].target, str) \
        else np.stack([np.asarray(s.target) for s in samples])
    res = {name: METRICS[name](pred, true) for name in metric_names(m)}
    own = demo_spec(m).demo.baselines
    bases = {base: np.stack([fn(s.inputs, true.shape[1:]) for s in samples]) for base, fn in own.items()} \
        if own else naive_baselines(true)
    for base, bp in bases.items():
        res.update({f"{name} ({base})": METRICS[name](bp, true) for name in metric_names(m)})
    return {k: round(100 * v if k.split(" (")[0] in PERCENT else v, 4) for k, v in res.items()}


def verdict_line(m: str, res: dict[str, float]) -> str:
    rule, ok = quality_bar(m, res)
    lost = lost_to(m, res)
    why = f"; loses to {'; '.join(lost)}" if lost else ""
    return f"{m:<12} " + "  ".join(f"{k}={v:.4g}" for k, v in res.items()) + \
        f"  [{'meets' if ok else 'MISSES'} {rule}{why}]"


def evaluate(model: AllSpark, n_per_modality: int = 200, seed: int = EVAL_SEED,
             modalities: Sequence[str] | None = None, verbose: bool = True) -> dict[str, dict[str, float]]:
    """Metrics per modality on `n_per_modality` held-out samples drawn with `seed` (each logged
    with its quality-bar verdict when `verbose`)."""
    mods = [resolve_modality(m) for m in modalities] if modalities else list(model.modalities)
    results = {}
    for m in mods:
        results[m] = evaluate_modality(model, m, generate(m, n_per_modality, seed, model.config))
        if verbose:
            log.info("%s", verdict_line(m, results[m]))
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


def add_arguments(s: argparse.ArgumentParser) -> None:
    """The arguments of `allspark eval` and `python -m allspark.demo.evaluate`."""
    from . import DEFAULT_CHECKPOINT

    s.add_argument("ckpt", nargs="?", default=str(DEFAULT_CHECKPOINT),
                   help="checkpoint directory (default: the embedded demo checkpoint)")
    s.add_argument("--n", type=at_least(1), default=200, help="held-out samples per modality")
    s.add_argument("--seed", type=int, default=EVAL_SEED, help="seed of the held-out set")
    s.add_argument("--modalities", nargs="*", help="only these modalities")
    s.add_argument("--build", help="evaluate this exported build on onnxruntime instead of the checkpoint "
                   "(e.g. an int8 export against the fp32 one)")
    s.add_argument("--threads", type=at_least(1), help="CPU threads (default: the library's choice)")
    s.add_argument("--json", help="also write the metrics as JSON here")
    s.add_argument("--markdown", help="also write a markdown table here")


def run(args: argparse.Namespace) -> int:
    """Evaluate, print one verdict line per modality and a summary; write JSON/markdown if asked."""
    import json
    from pathlib import Path

    import torch

    from ..model.checkpoint import load_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.build:
        from ..runtime import Runtime

        model = Runtime.load(args.build, threads=args.threads or 0)
    else:
        from ..memory import check
        from ..runtime.memory_plan import checkpoint_need

        if (Path(args.ckpt) / "manifest.json").is_file():  # (else load_checkpoint says what is wrong)
            mods = args.modalities or json.loads((Path(args.ckpt) / "manifest.json").read_text())["modalities"]
            check(checkpoint_need(args.ckpt, mods, "allspark eval (PyTorch, fp32)"))
        model = load_checkpoint(args.ckpt)
    results = evaluate(model, args.n, args.seed, args.modalities, verbose=False)
    for m, res in results.items():
        print(verdict_line(m, res), flush=True)
    met = [m for m, res in results.items() if quality_bar(m, res)[1]]
    print(f"quality bar met by {len(met)} of {len(results)} modalities"
          + (f"; missed: {', '.join(m for m in results if m not in met)}" if len(met) < len(results) else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(markdown_table(results, args.n, args.seed))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m allspark.demo.evaluate` is `allspark eval`."""
    p = argparse.ArgumentParser(prog="python -m allspark.demo.evaluate", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
