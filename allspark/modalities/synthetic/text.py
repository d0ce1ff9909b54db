"""Synthetic text: templated movie reviews (sentiment) and small functions to document.

Reviews mix two or three clauses of the review's sentiment, sometimes one clause of the other
sentiment, negations ("was not dull" is praise) and neutral filler; the answer is the majority,
"positive" or "negative". Functions are one of twelve operations over a list, written in Python or
JavaScript as a builtin call or a loop, under a generic name; the answer is the one-line docstring
naming the operation and the list's noun (from the parameter name). All text is lower-case, as
Lynx lower-cases prompts.
"""

from __future__ import annotations

from typing import Any

import numpy as np

Rng = np.random.Generator

# ---- language: movie reviews ---------------------------------------------------------------------
ADJECTIVES = {
    1: ("wonderful", "brilliant", "gripping", "charming", "superb", "delightful", "moving", "clever"),
    -1: ("dull", "boring", "clumsy", "predictable", "tedious", "awful", "bland", "messy"),
}
ASPECTS = ("acting", "plot", "script", "soundtrack", "camera work", "pacing", "ending", "cast",
           "dialogue", "direction", "story", "humour")
_CLAUSES = ("the {a} was {j}", "i thought the {a} was {j}", "the {a} felt {j}", "honestly the {a} is {j}",
            "overall the {a} seemed {j}")
_NEGATED = ("the {a} was not {j}", "the {a} was never {j}", "i would not call the {a} {j}")
_CONTRARY = ("although {c}", "even if {c}", "but {c}")
_FILLER = ("i saw it with my brother.", "it runs about two hours.", "the film is set in a small town.",
           "it came out last year.", "we watched it on a rainy sunday.", "the cinema was half empty.")
SENTIMENTS = {1: "positive", -1: "negative"}


def _clause(rng: Rng, polarity: int) -> str:
    aspect = str(rng.choice(ASPECTS))
    if rng.random() < 0.25:  # praise by negating a complaint, or the other way round
        return str(rng.choice(_NEGATED)).format(a=aspect, j=rng.choice(ADJECTIVES[-polarity]))
    return str(rng.choice(_CLAUSES)).format(a=aspect, j=rng.choice(ADJECTIVES[polarity]))


def language(mc: Any, rng: Rng) -> tuple[dict[str, Any], str]:
    polarity = int(rng.choice([1, -1]))
    parts = [_clause(rng, polarity) + "." for _ in range(int(rng.integers(2, 4)))]
    if rng.random() < 0.5:
        parts.append(str(rng.choice(_CONTRARY)).format(c=_clause(rng, -polarity)) + ".")
    parts += [str(f) for f in rng.choice(_FILLER, int(rng.integers(0, 3)), replace=False)]
    order = rng.permutation(len(parts))
    return {"text": " ".join(parts[i] for i in order)}, SENTIMENTS[polarity]


# ---- code: functions -> docstrings -----------------------------------------------------------------
NOUNS = ("prices", "scores", "ages", "distances", "weights", "temperatures", "counts", "votes",
         "sizes", "speeds", "heights", "rates")
# operation: (docstring, python bodies, javascript bodies); {p} the parameter, {v} a loop variable.
OPERATIONS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "sum": ("return the sum of the {n}.",
            ("return sum({p})", "total = 0\n    for {v} in {p}:\n        total += {v}\n    return total"),
            ("return {p}.reduce((a, b) => a + b, 0);",
             "let total = 0;\n  for (const {v} of {p}) {{\n    total += {v};\n  }}\n  return total;")),
    "max": ("return the largest of the {n}.",
            ("return max({p})", "best = {p}[0]\n    for {v} in {p}:\n        if {v} > best:\n            best = {v}\n    return best"),
            ("return Math.max(...{p});",
             "let best = {p}[0];\n  for (const {v} of {p}) {{\n    if ({v} > best) best = {v};\n  }}\n  return best;")),
    "min": ("return the smallest of the {n}.",
            ("return min({p})", "best = {p}[0]\n    for {v} in {p}:\n        if {v} < best:\n            best = {v}\n    return best"),
            ("return Math.min(...{p});",
             "let best = {p}[0];\n  for (const {v} of {p}) {{\n    if ({v} < best) best = {v};\n  }}\n  return best;")),
    "count": ("return the number of {n}.",
              ("return len({p})", "n = 0\n    for {v} in {p}:\n        n += 1\n    return n"),
              ("return {p}.length;", "let n = 0;\n  for (const {v} of {p}) {{\n    n += 1;\n  }}\n  return n;")),
    "mean": ("return the average of the {n}.",
             ("return sum({p}) / len({p})",),
             ("return {p}.reduce((a, b) => a + b, 0) / {p}.length;",)),
    "reverse": ("return the {n} in reverse order.",
                ("return {p}[::-1]", "return list(reversed({p}))"),
                ("return {p}.slice().reverse();",)),
    "sort": ("return the {n} sorted in ascending order.",
             ("return sorted({p})",),
             ("return {p}.slice().sort((a, b) => a - b);",)),
    "positive": ("return the positive {n}.",
                 ("return [{v} for {v} in {p} if {v} > 0]",),
                 ("return {p}.filter(({v}) => {v} > 0);",)),
    "double": ("return the {n} doubled.",
               ("return [2 * {v} for {v} in {p}]",),
               ("return {p}.map(({v}) => 2 * {v});",)),
    "first": ("return the first of the {n}.", ("return {p}[0]",), ("return {p}[0];",)),
    "last": ("return the last of the {n}.", ("return {p}[-1]",), ("return {p}[{p}.length - 1];",)),
    "unique": ("return the distinct {n}.", ("return list(set({p}))",), ("return [...new Set({p})];",)),
}
_NAMES = ("compute", "process", "handle", "helper", "transform", "summarize", "apply", "run")
_LOOP_VARS = ("x", "v", "item", "value")


def code(mc: Any, rng: Rng) -> tuple[dict[str, Any], str]:
    op = str(rng.choice(list(OPERATIONS)))
    doc, py, js = OPERATIONS[op]
    noun, verb, var = str(rng.choice(NOUNS)), str(rng.choice(_NAMES)), str(rng.choice(_LOOP_VARS))
    if rng.random() < 0.5:
        body = str(rng.choice(py)).format(p=noun, v=var)
        src = f"def {verb}_{noun}({noun}):\n    {body}"
    else:
        body = str(rng.choice(js)).format(p=noun, v=var)
        src = f"function {verb}{noun.capitalize()}({noun}) {{\n  {body}\n}}"
    return {"text": src}, doc.format(n=noun)
