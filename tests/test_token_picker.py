"""`TokenPicker` is the one greedy / sampling chooser: `generate` drives it for a batch, the scheduler
for one stream. The expected tokens were recorded from the loop it replaced (issue 27), so a change in
the random stream, the n-gram ban or where a row ends fails here."""
from __future__ import annotations

import numpy as np
import pytest

from allspark.model.generation import GenerationConfig, TokenPicker, generate

V = 23
PROMPTS = [[1, 2], [3], []]


def _step(tokens: np.ndarray, reorder: np.ndarray | None) -> np.ndarray:
    """A toy decoder whose logits (B, V) depend on every row's fed token."""
    rng = np.random.default_rng(int(np.sum(tokens * np.arange(1, len(tokens) + 1))) % 1000)
    return rng.normal(size=(len(tokens), V)) * 3


FIRST = np.random.default_rng(5).normal(size=(3, V)) * 3
GREEDY = dict(max_new_tokens=9, no_repeat_ngram_size=2)
SAMPLE = dict(strategy="sample", seed=7, temperature=0.8, top_k=8, top_p=0.9, max_new_tokens=9)


@pytest.mark.parametrize("kw, eos, expected", [
    (GREEDY, None, [[9, 22, 10, 15, 8, 2, 18, 9, 5], [17, 3, 15, 6, 18, 18, 17, 20, 17],
                    [12, 1, 21, 17, 17, 16, 3, 21, 9]]),
    (GREEDY, 15, [[9, 22, 10], [17, 3], [12, 1, 21, 17, 17, 16, 3, 7, 10]]),
    (SAMPLE, None, [[13, 13, 16, 20, 4, 7, 10, 5, 8], [18, 20, 20, 17, 15, 12, 13, 11, 0],
                    [12, 10, 2, 22, 2, 0, 21, 16, 9]]),
    # row 0 ends at EOS while the others go on: ended rows still draw from the shared random stream
    (SAMPLE, 4, [[13, 13, 16, 20], [18, 20, 20, 17, 15, 12, 13, 11, 0], [12, 10, 2, 22, 2, 0, 21, 16, 9]]),
])
def test_generate_keeps_the_recorded_tokens(kw, eos, expected):
    assert generate(FIRST, _step, GenerationConfig(**kw), eos, PROMPTS) == expected


def test_one_stream_picker_equals_generate_for_a_batch_of_one():
    cfg = GenerationConfig(**SAMPLE)
    picker, logits, got = TokenPicker(cfg, 4, [PROMPTS[1]]), FIRST[1:2], []
    while True:
        tok = picker.pick(logits[0])
        if tok is not None:
            got.append(tok)
        if picker.done:
            break
        logits = _step(np.array([tok]), None)
    assert got == picker.tokens == generate(FIRST[1:2], _step, cfg, 4, [PROMPTS[1]])[0]


def test_pick_each_gives_every_stream_the_tokens_it_gets_alone():
    """The scheduler's batched pick: one argmax for the plain greedy streams, the rest one by one;
    each stream's tokens (and where it ends: EOS, max_new_tokens) are those of `pick` alone."""
    cfgs = [GenerationConfig(max_new_tokens=6), GenerationConfig(max_new_tokens=9),
            GenerationConfig(**GREEDY), GenerationConfig(**SAMPLE), GenerationConfig(max_new_tokens=9)]
    eos = [None, 15, None, 4, 17]

    def run(batched: bool) -> list[list[int]]:
        pickers = [TokenPicker(c, e, [PROMPTS[i % 3]]) for i, (c, e) in enumerate(zip(cfgs, eos))]
        rng = np.random.default_rng(11)
        for _ in range(10):
            logits = (rng.normal(size=(len(pickers), V)) * 3).astype(np.float32)
            live = [i for i, p in enumerate(pickers) if not p.done]
            if batched:
                TokenPicker.pick_each([pickers[i] for i in live], logits[live])
            else:
                for i in live:
                    pickers[i].pick(logits[i])
        return [p.tokens for p in pickers]

    alone = run(False)
    assert run(True) == alone
    assert [len(t) for t in alone][:1] == [6] and any(0 < len(t) < 9 for t in alone[1:])  # both endings happen
