"""Train the embedded default: the `demo` preset on synthetic data for all ten modalities, on CPU.

    python -m allspark.demo.train [--out DIR] [--seed N] [--preset demo] [--lm-steps N] ...

The paper fine-tunes one pack per modality on a frozen, pretrained base LLM. Ours starts random,
so training has three stages:

  1. lm       base LLM + the language/code adapter sets: next-token loss on the answers (and, at
              a fifth of the weight, on the prompt text), teacher-forced through `model.llm`.
  2. encoders every encoder and its bridge, with a throw-away linear probe on the mean bridge
              latent instead of the LLM (cheap) -- the stand-in for the pretrained encoders the
              paper starts from.
  3. packs    end to end through the LLM: every pack (encoder, bridge, adapter set, head), with
              cross-entropy (classification) or MSE on the normalised target (regression), one
              batch per modality per step. The base LLM stays shared by all ten but, being tiny
              and barely pretrained, is tuned too at half the rate (`--llm-lr 0` freezes it, as in
              the paper), with the text tasks kept in every step.

Timing: OpenMP's default spin-waiting is the fastest on cores the trainer has to itself (measured:
0.45 s per stage-1 step against 0.7-1.0 s with OMP_WAIT_POLICY=PASSIVE). On cores shared with other
busy processes spinning can be far slower; set OMP_WAIT_POLICY=PASSIVE there.

Input statistics (TableEncoder, HSIEncoder, GraphEncoder buffers) and regression heads' target
statistics are fitted on the training set first. Deterministic given --seed and --threads.

    python -m allspark.demo.train --only graph [--from CKPT]

retrains some media packs alone, from a trained checkpoint (default: the one at --out), with their
configs taken from --preset: stages 2 and 3 on those modalities only, the base LLM frozen. Only
their pack files and the manifest are written; every other file is copied byte for byte. The
start's training log is kept and this run's added as `retrain`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AllSparkError, ConfigError
from ..model.checkpoint import (load_checkpoint, load_pack_state, pack_state, read_manifest, replace_packs,
                                save_checkpoint)
from ..model.config import HeadKind
from ..model.factory import build_model
from ..model.model import AllSpark, ModalityPack
from ..model.pipeline import Row
from ..model.presets import get_preset
from ..model.registry import resolve_modality, spec
from . import DEFAULT_CHECKPOINT
from .data import Sample, generate_all, tokenizer_corpus

logger = logging.getLogger(__name__)

DEFAULT_OUT = DEFAULT_CHECKPOINT


@dataclass(frozen=True)
class TrainSettings:
    preset: str = "demo"
    seed: int = 0
    out: Path = DEFAULT_OUT
    n_train: int = 3000  # samples per modality
    lm_steps: int = 400
    encoder_steps: int = 500
    pack_steps: int = 350
    batch: int = 32  # rows per modality per step (stages 1, 2)
    pack_batch: int = 16  # rows per modality per step (stage 3)
    llm_lr: float = 0.5  # stage 3 learning rate of the base LLM, relative to lr (0: frozen)
    lr: float = 2e-3
    threads: int = 2
    fp16: bool = True
    eval_n: int = 200  # held-out samples per modality for the reported metrics (0: skip)
    only: tuple[str, ...] = ()  # retrain just these media packs, from `start` (see `retrain`)
    start: Path | None = None  # the trained checkpoint `only` starts from (None: `out`)

    def __post_init__(self) -> None:
        for name in ("n_train", "batch", "pack_batch", "threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lm_steps", "encoder_steps", "pack_steps", "eval_n", "llm_lr"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        text = [m for m in self.only if spec(m).head.generates]
        if text:
            raise ConfigError(f"only: {text} train the shared base LLM with the other text tasks; "
                              "retrain only media modalities, or train everything")
        if self.start is not None and not self.only:
            raise ConfigError("start: a starting checkpoint needs the modalities to retrain (only)")


# ---- prepared training data ----------------------------------------------------------------------

@dataclass
class Prepared:
    """One modality's training set, preprocessed once: rows for build_batch and targets."""

    modality: str
    rows: list[Row]
    target: torch.Tensor  # (n,) class ids | (n, out_dim) head-space values | unused for text
    answers: list[list[int]] = field(default_factory=list)  # text: answer ids + EOS

    def __len__(self) -> int:
        return len(self.rows)


def head_space(model: AllSpark, m: str, sample: Sample, row: Row) -> np.ndarray:
    """A regression target in the head's output space: the inverse of the registry's postprocess,
    which is a reshape plus an offset taken from the request (e.g. a trajectory's origin)."""
    s, mc = spec(m), model.config.modality(m)
    out_dim = s.out_dim(mc)
    offset = np.asarray(s.postprocess(mc, np.zeros(out_dim, np.float32), row.context))
    y = (np.asarray(sample.target, np.float64) - offset).reshape(out_dim).astype(np.float32)
    if not np.allclose(s.postprocess(mc, y, row.context), sample.target, atol=1e-4):
        raise ConfigError(f"{m}: postprocess is not a reshape plus an offset; cannot invert it")
    return y


def prepare(model: AllSpark, samples: dict[str, list[Sample]]) -> dict[str, Prepared]:
    out = {}
    tok = model.tokenizer
    for m, ss in samples.items():
        rows = [model.prepare(m, s.inputs) for s in ss]
        kind = spec(m).head
        if kind.generates:
            answers = [tok(" " + s.target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for s in ss]
            out[m] = Prepared(m, rows, torch.zeros(len(ss)), answers)
        elif kind.classifies:
            out[m] = Prepared(m, rows, torch.tensor([int(s.target) for s in ss]))
        else:
            out[m] = Prepared(m, rows, torch.from_numpy(np.stack([head_space(model, m, s, r) for s, r in zip(ss, rows)])))
    return out


@torch.no_grad()
def fit_statistics(model: AllSpark, data: dict[str, Prepared]) -> None:
    """Set input-normalisation buffers (an encoder's `input_statistics`) and regression heads'
    target statistics from training data."""
    for m, d in data.items():
        pack = model.pack(m)
        stats = getattr(pack.encoder, "input_statistics", None)
        if stats is not None:
            x = model.tensors(d.rows)[stats.input].float()
            x = x if stats.per_column else x.reshape(-1)
            getattr(pack.encoder, stats.mean).copy_(x.mean(0))
            getattr(pack.encoder, stats.std).copy_(x.std(0).clamp_min(1e-6))
        if spec(m).head.regresses:
            # Per-output mean, one pooled std: the normalised MSE stays proportional to the MSE in
            # real units, so training minimises RMSE / ADE as evaluated.
            mean = d.target.mean(0)
            pack.head.set_statistics(mean, (d.target - mean).pow(2).mean().sqrt().expand_as(mean))


# ---- losses --------------------------------------------------------------------------------------

def text_rows(d: Prepared, idx: Sequence[int]) -> tuple[list[Row], torch.Tensor]:
    """Teacher forcing: rows whose prompt is prompt + answer[:-1], and next-token targets aligned
    to the right end of the left-padded batch (-100 on padding)."""
    rows, seqs = [], []
    for i in idx:
        r, a = d.rows[i], d.answers[i]
        rows.append(Row(r.modality, r.tensors, r.prompt_ids + a[:-1], r.context))
        seqs.append(r.prompt_ids[1:] + a)  # what each position should predict
    T = max(len(s) for s in seqs)
    target = torch.full((len(seqs), T), -100, dtype=torch.long)
    for k, s in enumerate(seqs):
        target[k, T - len(s):] = torch.tensor(s)
    return rows, target


def lm_loss(model: AllSpark, d: Prepared, idx: Sequence[int], prompt_weight: float = 0.2) -> torch.Tensor:
    rows, target = text_rows(d, idx)
    logits = model.llm.lm_head(model.decode(model.build_batch(rows)).last_hidden_state)  # (B, T, V)
    ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view(target.shape)
    n_answer = torch.tensor([len(d.answers[i]) for i in idx])
    pos = torch.arange(target.shape[1])
    is_answer = pos[None] >= target.shape[1] - n_answer[:, None]  # (B, T)
    valid = target != -100
    answer = (ce * is_answer).sum() / is_answer.sum()
    prompt = (ce * (valid & ~is_answer)).sum() / (valid & ~is_answer).sum().clamp_min(1)
    return answer + prompt_weight * prompt


def head_loss(model: AllSpark, d: Prepared, idx: Sequence[int]) -> torch.Tensor:
    b = model.build_batch([d.rows[i] for i in idx])
    last = model.decode(b).last_hidden_state[:, -1]  # (B, H): left padding ends every row here
    head = model.pack(d.modality).head
    return task_loss(head, head_kind=spec(d.modality).head, h=last, target=d.target[list(idx)])


def task_loss(head: nn.Module, head_kind: HeadKind, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`head.proj` is the linear layer of a classification or regression head (or a probe)."""
    if head_kind.classifies:
        return F.cross_entropy(head.proj(h), target)
    # regression: MSE in normalised units, (y - mean) / std against the linear layer's output
    return F.mse_loss(head.proj(h), (target - head.target_mean) / head.target_std)


class Probe(nn.Module):
    """Throw-away head on the mean of a bridge's latents, to warm an encoder and its bridge up
    without the LLM; it borrows the real head's normalisation so regression targets match."""

    def __init__(self, width: int, head: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, head.proj.out_features)
        if hasattr(head, "target_mean"):
            self.register_buffer("target_mean", head.target_mean.clone())
            self.register_buffer("target_std", head.target_std.clone())


def probe_loss(model: AllSpark, probes: nn.ModuleDict, d: Prepared, idx: Sequence[int]) -> torch.Tensor:
    tensors = model.tensors([d.rows[i] for i in idx])
    probe = probes[d.modality]
    h = probe.norm(model.media_tokens(d.modality, tensors).mean(1))  # (B, H)
    return task_loss(probe, spec(d.modality).head, h, d.target[list(idx)])


@torch.no_grad()
def init_heads(model: AllSpark, data: dict[str, Prepared], n: int = 384, ridge: float = 1e-2) -> None:
    """Fit each head to the LLM's current last hidden states by ridge regression (normalised
    targets; one-hot for classification) before fine-tuning end to end: a fitted head's gradients
    refine the warmed-up encoders and bridges instead of scrambling them (linear probe, then
    fine-tune)."""
    for m, d in data.items():
        head, kind = model.pack(m).head, spec(m).head
        idx = list(range(min(n, len(d))))
        h = torch.cat([model.decode(model.build_batch([d.rows[i] for i in idx[k:k + 64]])).last_hidden_state[:, -1]
                       for k in range(0, len(idx), 64)])  # (n, H)
        if kind.classifies:
            y = F.one_hot(d.target[idx], head.proj.out_features).float() * 4.0 - 2.0
        else:
            y = (d.target[idx] - head.target_mean) / head.target_std
        x = torch.cat([h, torch.ones(len(idx), 1)], 1)  # (n, H + 1)
        w = torch.linalg.solve(x.T @ x + ridge * len(idx) * torch.eye(x.shape[1]), x.T @ y)  # (H + 1, out)
        head.proj.weight.copy_(w[:-1].T)
        head.proj.bias.copy_(w[-1])


# ---- the loop ------------------------------------------------------------------------------------

def batches(n: int, size: int, rng: np.random.Generator) -> Iterator[list[int]]:
    """Endless shuffled epochs of indices."""
    size = min(size, n)
    while True:
        perm = rng.permutation(n)
        for i in range(0, n - size + 1, size):
            yield perm[i:i + size].tolist()


def run_stage(name: str, groups: list[dict], steps: int, losses: dict[str, Callable[[], torch.Tensor]]
              ) -> dict[str, float]:
    """AdamW over parameter `groups` ({"params", "lr"}) with warm-up and cosine decay to 10%;
    each step sums one loss per modality. Returns each loss's moving average at the end."""
    from tqdm import tqdm

    groups = [g for g in groups if g["params"] and g["lr"] > 0]
    if steps == 0 or not groups:
        return {}
    params = [p for g in groups for p in g["params"]]
    # foreach: one fused update per parameter group instead of a Python loop over ~400 tensors
    opt = torch.optim.AdamW(groups, weight_decay=0.0, betas=(0.9, 0.98), foreach=True)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    ema: dict[str, float] = {}
    bar = tqdm(range(steps), desc=f"{name:>8}", dynamic_ncols=True, mininterval=2.0)
    for _ in bar:
        opt.zero_grad(set_to_none=True)
        for key, fn in losses.items():
            loss = fn()
            loss.backward()
            value = float(loss.detach())
            ema[key] = 0.9 * ema.get(key, value) + 0.1 * value
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        bar.set_postfix_str(" ".join(f"{k[:5]}={v:.3f}" for k, v in ema.items()), refresh=False)
    return ema


def trainable(*modules: nn.Module) -> list[nn.Parameter]:
    """Switch on gradients for `modules` and return their parameters, each once."""
    seen, out = set(), []
    for mod in modules:
        mod.requires_grad_(True)
        for p in mod.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def train(settings: TrainSettings) -> tuple[AllSpark, dict]:
    """Train and return the model (in memory) and a log of the stages' final losses and times."""
    s = settings
    torch.set_num_threads(s.threads)
    torch.manual_seed(s.seed)
    rng = np.random.default_rng(s.seed)
    t0 = time.perf_counter()
    log: dict = {"settings": {k: str(v) for k, v in vars(s).items() if k not in ("only", "start")}, "stages": {}}

    model = build_model(s.preset, seed=s.seed, texts=tokenizer_corpus(s.preset, seed=s.seed),
                        identity_adapters=True)
    data = prepare(model, generate_all(s.n_train, s.seed, model.config, model.modalities))
    fit_statistics(model, data)
    log["data_s"] = round(time.perf_counter() - t0, 1)
    logger.info("data: %d samples x %d modalities in %s s", s.n_train, len(data), log["data_s"])
    text = {m: d for m, d in data.items() if spec(m).head.generates}
    media = {m: d for m, d in data.items() if not spec(m).head.generates}
    model.train()

    # 1. base LLM + the text adapter sets (the other sets get no gradient: their rows are absent)
    model.requires_grad_(False)
    stage(log, "lm", lambda: run_stage("lm", [{"params": trainable(model.llm, model.adapters), "lr": s.lr}],
                                        s.lm_steps, lm_losses(model, text, s.batch, rng)))
    warm_encoders(model, media, s, rng, log)
    tune_packs(model, media, text if s.llm_lr > 0 else None, s, rng, log)
    log["train_s"] = round(time.perf_counter() - t0, 1)
    return model, log


def lm_losses(model: AllSpark, text: dict[str, Prepared], batch: int, rng: np.random.Generator
              ) -> dict[str, Callable[[], torch.Tensor]]:
    its = {m: batches(len(d), batch, rng) for m, d in text.items()}
    return {m: (lambda m=m: lm_loss(model, text[m], next(its[m]))) for m in text}


def head_losses(model: AllSpark, media: dict[str, Prepared], batch: int, rng: np.random.Generator
                ) -> dict[str, Callable[[], torch.Tensor]]:
    its = {m: batches(len(d), batch, rng) for m, d in media.items()}
    return {m: (lambda m=m: head_loss(model, media[m], next(its[m]))) for m in media}


def warm_encoders(model: AllSpark, media: dict[str, Prepared], s: TrainSettings, rng: np.random.Generator,
                  log: dict) -> None:
    """Stage 2: the encoders and bridges of `media`, with probes instead of the LLM."""
    model.requires_grad_(False)
    model.train()
    probes = nn.ModuleDict({m: Probe(model.config.llm.hidden_size, model.pack(m).head) for m in media})
    its = {m: batches(len(d), s.batch, rng) for m, d in media.items()}
    groups = [{"params": trainable(probes, *(model.pack(m).encoder for m in media),
                                   *(model.pack(m).bridge for m in media)), "lr": s.lr}]
    stage(log, "encoders", lambda: run_stage(
        "encoders", groups, s.encoder_steps,
        {m: (lambda m=m: probe_loss(model, probes, media[m], next(its[m]))) for m in media}))


def tune_packs(model: AllSpark, media: dict[str, Prepared], text: dict[str, Prepared] | None, s: TrainSettings,
               rng: np.random.Generator, log: dict) -> None:
    """Stage 3: the packs of `media` end to end through the LLM, and the base LLM at a lower rate
    with the `text` tasks alongside so that they are kept (None: the LLM stays frozen, as in the
    paper). Leaves the model frozen, in eval mode."""
    model.requires_grad_(False)
    model.eval()
    init_heads(model, media)
    model.train()
    groups = [{"params": trainable(model.adapters, *(model.pack(m).head for m in media)), "lr": s.lr},
              {"params": trainable(*(model.pack(m).encoder for m in media), *(model.pack(m).bridge for m in media)),
               "lr": s.lr * 0.5},  # warmed up in stage 2: refine, don't relearn
              {"params": trainable(model.llm) if text is not None else [], "lr": s.lr * s.llm_lr}]
    losses = {**head_losses(model, media, s.pack_batch, rng), **lm_losses(model, text or {}, s.pack_batch, rng)}
    stage(log, "packs", lambda: run_stage("packs", groups, s.pack_steps, losses))
    model.requires_grad_(False)
    model.eval()


def from_checkpoint(ckpt: Path, preset: str, only: Sequence[str]) -> AllSpark:
    """The checkpoint's model with the packs of `only` rebuilt from `preset`'s configs and refilled
    with their stored weights (CheckpointError if a shape changed: that needs training from scratch)."""
    model = load_checkpoint(ckpt)
    fresh = {m: get_preset(preset).modality(m) for m in only}
    model.config = replace(model.config, modalities=tuple(fresh.get(mc.modality, mc) for mc in model.config.modalities))
    for m in only:
        state = pack_state(model, m)
        model.packs[m] = ModalityPack(fresh[m], model.config)
        load_pack_state(model, m, state)
    return model.float()


def retrain(settings: TrainSettings) -> tuple[AllSpark, dict]:
    """Stages 2 and 3 for `settings.only` alone, from the checkpoint `settings.start` (default: `out`),
    the base LLM frozen; returns the model and its log: the start's, with this run's as `retrain`."""
    s = settings
    start = s.start or s.out
    torch.set_num_threads(s.threads)
    torch.manual_seed(s.seed)
    rng = np.random.default_rng(s.seed)
    t0 = time.perf_counter()
    used = {k: str(v) for k, v in vars(s).items() if k not in ("llm_lr", "lm_steps")}  # (the LLM is frozen)
    log: dict = {"settings": {**used, "only": ",".join(s.only), "start": str(start)}, "stages": {}}
    before = read_manifest(start).get("demo_training", {})
    model = from_checkpoint(start, s.preset, s.only)
    data = prepare(model, generate_all(s.n_train, s.seed, model.config, s.only))
    fit_statistics(model, data)
    log["data_s"] = round(time.perf_counter() - t0, 1)
    warm_encoders(model, data, s, rng, log)
    tune_packs(model, data, None, s, rng, log)
    log["train_s"] = round(time.perf_counter() - t0, 1)
    return model, {**before, "retrain": log}


def stage(log: dict, name: str, fn: Callable[[], dict[str, float]]) -> None:
    t = time.perf_counter()
    losses = fn()
    log["stages"][name] = {"seconds": round(time.perf_counter() - t, 1),
                           "final_loss": {k: round(v, 4) for k, v in losses.items()}}
    logger.info("stage %s: %s", name, log["stages"][name])


def metrics_path(out: Path) -> Path:
    """Where the reference metrics of a checkpoint live: next to it, `<name>_metrics.json`."""
    return out.parent / f"{out.name}_metrics.json"


def save_and_check(model: AllSpark, settings: TrainSettings, log: dict) -> dict:
    """Write the checkpoint, reload it, evaluate the reloaded model and store the metrics."""
    from .evaluate import EVAL_SEED, TEST_N, evaluate

    dtype = torch.float16 if settings.fp16 else None
    extra = {"demo_training": log}
    out = (replace_packs(model, settings.start or settings.out, settings.out, settings.only, dtype=dtype, extra=extra)
           if settings.only else save_checkpoint(model, settings.out, dtype=dtype, extra=extra))
    reloaded = load_checkpoint(out)
    result = {"eval_seed": EVAL_SEED, "training": log}
    if settings.eval_n:
        result["metrics"] = evaluate(reloaded, settings.eval_n, EVAL_SEED)
    result["test_subset"] = {"n_per_modality": TEST_N,
                             "metrics": evaluate(reloaded, TEST_N, EVAL_SEED, verbose=False)}
    metrics_path(out).write_text(json.dumps(result, indent=1) + "\n")
    return result


def parse_args(argv: Sequence[str] | None = None) -> TrainSettings:
    d = TrainSettings()
    p = argparse.ArgumentParser(prog="python -m allspark.demo.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=d.out, help=f"checkpoint directory (default {d.out})")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--preset", default=d.preset, choices=("tiny", "demo"))
    p.add_argument("--n-train", type=int, default=d.n_train, help="training samples per modality")
    p.add_argument("--lm-steps", type=int, default=d.lm_steps, help="stage 1 steps (base LLM on text)")
    p.add_argument("--encoder-steps", type=int, default=d.encoder_steps, help="stage 2 steps (encoder warm-up)")
    p.add_argument("--pack-steps", type=int, default=d.pack_steps, help="stage 3 steps (packs through the LLM)")
    p.add_argument("--batch", type=int, default=d.batch, help="rows per modality per step (stages 1, 2)")
    p.add_argument("--pack-batch", type=int, default=d.pack_batch, help="rows per modality per step (stage 3)")
    p.add_argument("--llm-lr", type=float, default=d.llm_lr,
                   help="stage 3 learning rate of the base LLM relative to --lr (0 keeps it frozen)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--fp32", action="store_true", help="save float32 weights (default float16)")
    p.add_argument("--eval-n", type=int, default=d.eval_n, help="held-out samples per modality (0: skip)")
    p.add_argument("--only", nargs="+", default=[], metavar="MODALITY",
                   help="retrain only these media packs from a trained checkpoint (stages 2 and 3, LLM frozen); "
                        "every other weight is kept")
    p.add_argument("--from", dest="start", type=Path, help="the checkpoint --only starts from (default: --out)")
    a = p.parse_args(argv)
    try:
        return replace(d, out=a.out, seed=a.seed, preset=a.preset, n_train=a.n_train, lm_steps=a.lm_steps,
                       encoder_steps=a.encoder_steps, pack_steps=a.pack_steps, batch=a.batch,
                       pack_batch=a.pack_batch, llm_lr=a.llm_lr, lr=a.lr,
                       threads=a.threads, fp16=not a.fp32, eval_n=a.eval_n,
                       only=tuple(resolve_modality(m) for m in a.only), start=a.start)
    except AllSparkError as e:  # a setting out of range, an unknown or a text modality in --only
        p.error(str(e))


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = parse_args(argv)
    model, log = retrain(settings) if settings.only else train(settings)
    result = save_and_check(model, settings, log)
    seconds = log["retrain"]["train_s"] if settings.only else log["train_s"]
    logger.info("wrote %s and %s in %.0f s of training", settings.out, metrics_path(settings.out), seconds)
    return 0 if result else 1


if __name__ == "__main__":
    raise SystemExit(main())
