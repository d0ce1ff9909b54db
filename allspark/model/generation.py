"""The one decode loop: greedy, beam search and sampling over any decoder with a KV cache.

Decoder-agnostic: the caller passes the prefill's last logits and a step function on numpy arrays
(token ids, beam reorder) -> next logits, so the torch reference model (`AllSpark.generate`) and
every runtime backend share this code and differ only in the decoder they step. Beam search follows
transformers' semantics (log-prob scores, length penalty 1, no-repeat n-gram ban); Lynx's settings
are `GenerationConfig.lynx()`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum
from typing import Callable, Sequence

import numpy as np

from ..errors import ConfigError


class Strategy(str, Enum):
    GREEDY = "greedy"
    BEAM = "beam"
    SAMPLE = "sample"


@dataclass(frozen=True)
class GenerationConfig:
    strategy: Strategy = Strategy.GREEDY
    max_new_tokens: int = 64
    num_beams: int = 5
    top_k: int = 3
    top_p: float = 0.9
    temperature: float = 1.0
    no_repeat_ngram_size: int = 0
    seed: int = 0
    ignore_eos: bool = False  # always produce max_new_tokens (benchmarks)

    def __post_init__(self) -> None:
        object.__setattr__(self, "strategy", Strategy(self.strategy))
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"generation: max_new_tokens must be an int >= 1 (a runtime also bounds it by its "
                              f"build's maximum positions), got {self.max_new_tokens!r}")
        if self.num_beams < 1 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"generation: invalid settings {self}")
        if self.temperature <= 0:
            raise ConfigError("generation: temperature must be > 0")

    @classmethod
    def lynx(cls, **kw) -> "GenerationConfig":
        """configs/LYNX.yaml: 64 new tokens, 5 beams, no-repeat 2-grams (top-k/top-p apply when sampling)."""
        return replace(cls(strategy=Strategy.BEAM, max_new_tokens=64, num_beams=5, top_k=3, top_p=0.9,
                           no_repeat_ngram_size=2), **kw)


def beam_width(cfg: GenerationConfig) -> int:
    """Rows each request occupies while generating: its beams, or 1."""
    return cfg.num_beams if cfg.strategy == Strategy.BEAM else 1


# A step function: (token ids (B,), beam reorder index (B,) or None) -> next-token logits (B, V)
StepFn = Callable[[np.ndarray, np.ndarray | None], np.ndarray]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _ban_repeats(logp: np.ndarray, seqs: list[list[int]], n: int) -> None:
    """Forbid tokens that would repeat an n-gram already in the sequence (in place)."""
    if n <= 0:
        return
    for i, s in enumerate(seqs):
        if len(s) < n - 1:
            continue
        prefix = tuple(s[len(s) - n + 1:]) if n > 1 else ()
        for j in range(len(s) - n + 1):
            if tuple(s[j:j + n - 1]) == prefix:
                logp[i, s[j + n - 1]] = -np.inf


def generate(first_logits: np.ndarray, step: StepFn, cfg: GenerationConfig, eos: int | None,
             prompts: list[list[int]] | None = None) -> list[list[int]]:
    """New token ids per row. `first_logits` (B, V) come from the prefill; for beam search the
    caller's state must already be expanded to B * num_beams rows (`beam_width` rows per request)."""
    if cfg.strategy == Strategy.BEAM and cfg.num_beams > 1:
        return _beam(first_logits, step, cfg, eos)
    return _greedy_or_sample(first_logits, step, cfg, eos, prompts)


def _pick_sample(logits: np.ndarray, cfg: GenerationConfig, rng: np.random.Generator) -> np.ndarray:
    z = logits.astype(np.float64) / cfg.temperature
    if cfg.top_k:
        kth = np.sort(z, -1)[:, -cfg.top_k][:, None]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    order = np.argsort(-p, -1)
    sorted_p = np.take_along_axis(p, order, -1)
    cut = np.cumsum(sorted_p, -1) - sorted_p >= cfg.top_p  # keep the smallest set reaching top_p
    sorted_p[cut] = 0
    out = np.empty(len(p), dtype=np.int64)
    for i in range(len(p)):
        q = sorted_p[i] / sorted_p[i].sum()
        out[i] = order[i, rng.choice(len(q), p=q)]
    return out


def _greedy_or_sample(logits, step, cfg, eos, prompts):
    picker = TokenPicker(cfg, eos, prompts, rows=logits.shape[0])
    while True:
        nxt = picker.pick_rows(logits)
        if picker.done:
            return picker.rows
        logits = step(nxt, None)


class TokenPicker:
    """The one greedy / sampling token chooser, step by step, for `rows` streams sharing one random
    stream (a batch: `generate`; one stream: `allspark.runtime.scheduler`, which batches streams
    itself and so gets `generate`'s tokens for a batch of one). A row ends at EOS or after
    max_new_tokens tokens; ended rows are still scored (the random stream advances per row as it
    always has). Beam search chooses over the whole beam: not here."""

    def __init__(self, cfg: GenerationConfig, eos: int | None, prompts: list[list[int]] | None = None,
                 rows: int = 1):
        if cfg.strategy == Strategy.BEAM and cfg.num_beams > 1:
            raise ConfigError("TokenPicker: beam search chooses over the whole beam; use generate()")
        self.cfg, self.eos = cfg, eos
        self.rng = np.random.default_rng(cfg.seed)
        self.history = [list(p) for p in prompts] if prompts else [[] for _ in range(rows)]
        self.rows: list[list[int]] = [[] for _ in range(rows)]  # new tokens per row
        self.ended = np.zeros(rows, dtype=bool)

    @property
    def done(self) -> bool:
        return bool(self.ended.all())

    @property
    def tokens(self) -> list[int]:
        """The one stream's new tokens (rows=1)."""
        return self.rows[0]

    def pick_rows(self, logits: np.ndarray) -> np.ndarray:
        """Next tokens (B,) int64 for logits (B, V); what rows still running keep is in `rows`."""
        sample = self.cfg.strategy == Strategy.SAMPLE
        # greedy: log-softmax shifts each row by a constant, so the argmax of the logits is the same
        logp = _log_softmax(logits.astype(np.float64)) if sample else logits.astype(np.float64)
        _ban_repeats(logp, [h + o for h, o in zip(self.history, self.rows)], self.cfg.no_repeat_ngram_size)
        nxt = _pick_sample(logp, self.cfg, self.rng) if sample else logp.argmax(-1)
        for i, tok in enumerate(nxt):
            if self.ended[i]:
                continue
            if self.eos is not None and tok == self.eos:
                self.ended[i] = True
            else:
                self.rows[i].append(int(tok))
                self.ended[i] = len(self.rows[i]) >= self.cfg.max_new_tokens
        return nxt.astype(np.int64)

    def pick(self, logits: np.ndarray) -> int | None:
        """One stream's next token for logits (V,), or None when it ends at EOS (after
        max_new_tokens the last token is returned and `done` is set)."""
        n = len(self.rows[0])
        tok = int(self.pick_rows(logits[None])[0])
        return tok if len(self.rows[0]) > n else None

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing banned: the token is the logits' argmax alone."""
        return self.cfg.strategy != Strategy.SAMPLE and self.cfg.no_repeat_ngram_size <= 0

    @staticmethod
    def pick_each(pickers: Sequence["TokenPicker"], logits: np.ndarray) -> list[int | None]:
        """`pick` for one-stream pickers, one per row of logits (B, V) (a scheduler's streams): the
        plain greedy ones share one argmax over their rows (float32's order is float64's, so each
        gets the token it gets alone) instead of a cast, a ban and an argmax per row."""
        out: list[int | None] = [None] * len(pickers)
        plain = [i for i, p in enumerate(pickers) if p.plain_greedy]
        best = logits[plain].argmax(-1) if plain else ()
        for i, tok in zip(plain, best):
            out[i] = pickers[i]._take(int(tok))
        for i, p in enumerate(pickers):
            if not p.plain_greedy:
                out[i] = p.pick(logits[i])
        return out

    def _take(self, tok: int) -> int | None:
        """A one-stream picker's bookkeeping for a chosen token, as `pick_rows` does it."""
        if self.ended[0]:
            return None
        if self.eos is not None and tok == self.eos:
            self.ended[0] = True
            return None
        self.rows[0].append(tok)
        self.ended[0] = len(self.rows[0]) >= self.cfg.max_new_tokens
        return tok


def _beam(logits, step, cfg, eos):
    K = cfg.num_beams
    B = logits.shape[0] // K
    V = logits.shape[1]
    seqs: list[list[int]] = [[] for _ in range(B * K)]
    scores = np.full((B, K), -np.inf)
    scores[:, 0] = 0.0  # all beams start identical: keep one alive so the first step is not K copies
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    for t in range(cfg.max_new_tokens):
        logp = _log_softmax(logits.astype(np.float64))
        _ban_repeats(logp, seqs, cfg.no_repeat_ngram_size)
        cand = (scores.reshape(B * K, 1) + logp).reshape(B, K * V)
        top = np.argsort(-cand, -1)[:, : 2 * K]  # 2K so EOS hypotheses don't starve the beam
        new_seqs, new_scores, reorder, tokens = [], np.full((B, K), -np.inf), np.zeros(B * K, np.int64), np.zeros(B * K, np.int64)
        for b in range(B):
            k = 0
            for c in top[b]:
                beam, tok = divmod(int(c), V)
                src, sc = b * K + beam, float(cand[b, c])
                if not np.isfinite(sc):
                    continue
                if eos is not None and tok == eos:
                    finished[b].append((sc / max(len(seqs[src]), 1), seqs[src]))
                    continue
                new_scores[b, k] = sc
                reorder[b * K + k], tokens[b * K + k] = src, tok
                new_seqs.append(seqs[src] + [tok])
                k += 1
                if k == K:
                    break
            while k < K:  # fewer live candidates than beams: pad with a dead copy
                reorder[b * K + k] = b * K
                new_seqs.append(list(seqs[b * K]))
                k += 1
        seqs, scores = new_seqs, new_scores
        best_live = scores.max(-1) / (t + 1)
        if eos is not None and all(len(f) >= K and max(s for s, _ in f) >= best_live[b]
                                   for b, f in enumerate(finished)):
            break
        if t == cfg.max_new_tokens - 1:
            break
        logits = step(tokens, reorder)
    out = []
    for b in range(B):
        live = [(scores[b, k] / max(len(seqs[b * K + k]), 1), seqs[b * K + k]) for k in range(K)
                if np.isfinite(scores[b, k])]
        out.append(max(finished[b] + live, key=lambda x: x[0])[1])
    return out
