"""`allspark bench agreement`: how far a quantized build's answers move from a reference build's, on
the same requests, per modality (random weights are fine: the question is what quantization changes).

    classification   top-1 agreement (and the largest change of a label's probability)
    regression       max relative error: max |candidate - reference| / max |reference| (and the mean)
    generation       first-token agreement, and KL(reference || candidate) of the first-token
                     distribution (mean and max), from the decoder's prefill logits

Each build answers all requests in turn (its runtime is released before the next loads), so the peak
is one build's, not both. `--reference-backend torch` takes the reference answers from the PyTorch
modules of the candidate's checkpoint in fp32 (what every fp32 build is parity-checked against), so a
big model needs no fp32 build: a base-size fp32 export takes ~45 min here.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import numpy as np

from ..commands import at_least
from .machine import machine_info


def _requests(manifest_config, modality: str, n: int, seed: int) -> list[dict]:
    from ..model.registry import random_inputs

    rng = np.random.default_rng(seed)
    return [random_inputs(manifest_config.modality(modality), rng) for _ in range(n)]


def _source_hash(build: Path, backend: str, options: dict) -> str:
    """What the answers depend on: the build's manifest (onnxruntime), the checkpoint's (torch)."""
    import hashlib

    from ..contract.manifest import read_manifest

    if backend == "torch":
        ckpt = Path(options.get("checkpoint") or read_manifest(build)["provenance"]["checkpoint"])
        path = ckpt / "manifest.json"
    else:
        path = build / "manifest.json"
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def answers(build: Path, modalities: list[str], n: int, batch: int, seed: int, backend: str = "onnxruntime",
            cache: Path | None = None, **options) -> dict[str, dict[str, np.ndarray]]:
    """Per modality: labels / scores, values, or first-token logits for `n` seeded requests.
    `cache`: a directory keeping each modality's answers (keyed by the manifest they came from,
    backend, n, batch, seed), so a slow reference (a base model in fp32: an hour here) is answered
    once for every candidate compared against it."""
    from tqdm import tqdm

    from ..model.registry import spec
    from ..runtime import Request, Runtime

    key = f"{backend}-{_source_hash(build, backend, options)}-n{n}-b{batch}-s{seed}"
    files = {m: cache / f"{key}-{m}.npz" for m in modalities} if cache else {}
    out: dict[str, dict[str, np.ndarray]] = {}
    for m, f in files.items():
        if f.is_file():
            with np.load(f) as z:
                out[m] = {k: z[k] for k in z.files}
    todo = [m for m in modalities if m not in out]
    if not todo:
        return out
    rt = Runtime.load(build, backend, **options)
    bar = tqdm(total=n * len(todo), desc=f"{build.name} ({backend})", unit="request", leave=False)
    try:
        for m in todo:
            reqs = _requests(rt.config, m, n, seed)
            kind = spec(m).head
            got: dict[str, list] = {}
            for i in range(0, n, batch):
                chunk = [Request(m, x) for x in reqs[i:i + batch]]
                bar.update(len(chunk))
                if kind.generates:
                    _, dec = rt.prefill([rt.prepare(r) for r in chunk])
                    got.setdefault("logits", []).append(np.asarray(dec.logits)[:, -1].astype(np.float64))
                    continue
                for p in rt.predict_batch(chunk):
                    if isinstance(p, Exception):
                        raise p
                    if kind.classifies:
                        got.setdefault("label", []).append(p.label)
                        got.setdefault("scores", []).append(np.array([p.scores[k] for k in sorted(p.scores)]))
                    else:
                        got.setdefault("values", []).append(np.asarray(p.values, np.float64))
            out[m] = {k: np.concatenate(v) if k == "logits" else np.array(v) for k, v in got.items()}
            if m in files:  # kept as each modality finishes: a stopped run loses only the one under way
                cache.mkdir(parents=True, exist_ok=True)
                tmp = files[m].with_suffix(".tmp.npz")
                np.savez(tmp, **out[m])
                tmp.replace(files[m])
    finally:
        bar.close()
        del rt
        gc.collect()
    return {m: out[m] for m in modalities}


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def compare(ref: dict[str, np.ndarray], cand: dict[str, np.ndarray]) -> dict[str, float]:
    if "label" in ref:
        return {"top1_agreement": float(np.mean(ref["label"] == cand["label"])),
                "max_probability_change": float(np.abs(ref["scores"] - cand["scores"]).max())}
    if "values" in ref:
        diff = np.abs(cand["values"] - ref["values"])
        scale = np.abs(ref["values"]).max(axis=tuple(range(1, ref["values"].ndim)))  # per request
        return {"max_relative_error": float(diff.max() / np.abs(ref["values"]).max()),
                "mean_relative_error": float(np.mean(diff.reshape(len(diff), -1).max(1) / np.maximum(scale, 1e-12)))}
    p, q = _softmax(ref["logits"]), _softmax(cand["logits"])
    kl = np.sum(p * (np.log(p + 1e-30) - np.log(q + 1e-30)), axis=-1)
    return {"first_token_agreement": float(np.mean(ref["logits"].argmax(-1) == cand["logits"].argmax(-1))),
            "kl_mean": float(kl.mean()), "kl_max": float(kl.max())}


TARGETS = {"top1_agreement": (">=", 0.98)}  # the paper-scale issue's bar for base-size classifiers


def run(args: argparse.Namespace) -> int:
    from ..contract.manifest import read_manifest
    from ..errors import ConfigError

    cand_b = Path(args.candidate)
    torch_ref = args.reference_backend == "torch"
    if not torch_ref and not args.reference:
        raise ConfigError("--reference: the build answers are compared against (or --reference-backend torch)")
    ref_b = Path(args.reference) if args.reference else cand_b
    mr, mc = read_manifest(ref_b), read_manifest(cand_b)
    modalities = [m for m in (args.modalities.split(",") if args.modalities else mr["modalities"]) if m]
    missing = [m for m in modalities if m not in mc["modalities"] or m not in mr["modalities"]]
    if missing:
        raise ConfigError(f"modalities {missing} are not in both builds ({mr['modalities']} / {mc['modalities']})")
    ref_options = {"checkpoint": args.checkpoint} if torch_ref and args.checkpoint else {}
    t0 = time.perf_counter()
    cache = Path(args.cache) if args.cache else None
    ref = answers(ref_b, modalities, args.n, args.batch, args.seed, args.reference_backend, cache, **ref_options)
    t_ref = time.perf_counter() - t0
    cand = answers(cand_b, modalities, args.n, args.batch, args.seed, cache=cache)
    ref_precision = "fp32 (PyTorch)" if torch_ref else mr["precision"]
    result = {"kind": "allspark-bench-agreement", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "machine": machine_info(), "n": args.n, "seed": args.seed,
              "reference": {"build": str(ref_b), "backend": args.reference_backend, "precision": ref_precision,
                            **({"checkpoint": str(args.checkpoint or mr["provenance"]["checkpoint"])} if torch_ref else {}),
                            "seconds": round(t_ref, 1)},
              "candidate": {"build": str(cand_b), "precision": mc["precision"], "quantization": mc.get("quantization"),
                            "seconds": round(time.perf_counter() - t0 - t_ref, 1)},
              "modalities": {m: compare(ref[m], cand[m]) for m in modalities}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {out}, {out.with_suffix('.md')}")
    return 0


def markdown(r: dict) -> str:
    a, b = r["reference"], r["candidate"]
    lines = [f"# Agreement: {b['precision']} against {a['precision']}", "",
             f"{r['n']} seeded random requests per modality (seed {r['seed']}), answered by each build in turn on "
             f"{r['machine']['cpu']} ({r['machine']['cores']} cores): reference "
             + (f"the PyTorch modules of `{a['checkpoint']}` in fp32" if a.get("backend") == "torch" else f"`{a['build']}`")
             + f" ({a['seconds']} s), "
             f"candidate `{b['build']}` ({b['seconds']} s). Quantization: {b.get('quantization') or '-'}.", "",
             "| modality | metric | value | bar |", "|---|---|---|---|"]
    for m, res in r["modalities"].items():
        for k, v in res.items():
            bar = ""
            if k in TARGETS:
                op, t = TARGETS[k]
                bar = f"{op} {t}: {'met' if v >= t else 'MISSED'}"
            lines.append(f"| {m} | {k} | {v:.4g} | {bar} |")
    ref = "--reference-backend torch" if a.get("backend") == "torch" else "--reference FP32_BUILD"
    lines += ["", f"Reproduce: `allspark bench agreement {ref} --candidate INT4_BUILD --n {r['n']}`.", ""]
    return "\n".join(lines)


def add_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("--reference", help="the build answers are compared against (e.g. fp32)")
    s.add_argument("--reference-backend", choices=("onnxruntime", "torch"), default="onnxruntime",
                   help="torch: the reference is the PyTorch modules of the checkpoint in fp32 (no fp32 build needed; "
                        "--reference defaults to the candidate build, whose manifest names its checkpoint)")
    s.add_argument("--checkpoint", help="with --reference-backend torch: the checkpoint (default: the build's own)")
    s.add_argument("--candidate", required=True, help="e.g. the int4 build of the same checkpoint")
    s.add_argument("--modalities", default="", help="comma-separated; default: all of the reference's")
    s.add_argument("--n", type=at_least(1), default=200, help="requests per modality")
    s.add_argument("--batch", type=at_least(1), default=8)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--cache", help="a directory keeping each build's answers per modality, reused by later runs "
                   "(the same manifest, backend, --n, --batch, --seed): answer a slow reference once")
    s.add_argument("--out", default="docs/benchmarks/quantized/agreement.json")
