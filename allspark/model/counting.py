"""Parameter accounting per modality, in the paper's Table XV terms.

Per modality: encoder, bridge, adapters (its one set), head, base_llm. As in the paper, base_llm
is the LLaMA body without the output projection (lm_head), which only text generation uses;
trainable = everything but the base LLM (and RGB's frozen EVA encoder).
"""

from __future__ import annotations

from typing import Any

from .model import AllSpark

COMPONENTS = ("encoder", "bridge", "adapters", "head", "base_llm")


def _n(module) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def count_parameters(model: AllSpark) -> dict[str, dict[str, Any]]:
    llm = model.llm
    base = _n(llm.model)  # embed_tokens + layers + norm; lm_head excluded (paper's accounting)
    per_set = sum(p[0].numel() for a in model.adapters for p in a.parameters())
    out: dict[str, dict[str, Any]] = {}
    for m in model.modalities:
        pack, mc = model.packs[m], model.config.modality(m)
        comps = {"encoder": _n(pack.encoder), "bridge": _n(pack.bridge), "adapters": per_set,
                 "head": _n(pack.head), "base_llm": base}
        total = sum(comps.values())
        frozen = base + (comps["encoder"] if mc.frozen_encoder else 0)
        out[m] = {"components": comps, "total": total, "trainable": total - frozen}
    return out


def format_table(counts: dict[str, dict[str, Any]]) -> str:
    head = f"{'modality':<12}" + "".join(f"{c:>12}" for c in COMPONENTS) + f"{'total':>12}{'trainable':>12}"
    lines = [head + "   (millions of parameters)", "-" * len(head)]
    for m, row in counts.items():
        vals = [row["components"][c] for c in COMPONENTS] + [row["total"], row["trainable"]]
        lines.append(f"{m:<12}" + "".join(f"{v / 1e6:>12.3f}" for v in vals))
    return "\n".join(lines)
