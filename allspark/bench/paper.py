"""The paper-size rows of `allspark bench scale` (`--paper CKPT --precisions int4,int8`): a
quantized export of the whole AllSpark (ten modalities, EVA-g at 420 px, the 7B decoder holding all
ten adapter sets) on this machine, then every modality answered.

    export              `allspark export CKPT --precision P`, timed, peak PSS of the process tree
    resident            PSS of a process after `Runtime.load` (a text modality alone: the LLM; all ten)
    allspark run        once per modality, on a request file written from the modality's sample
    stages              one request per modality through a warm runtime (median of --repeat), and one
                        mixed batch of all ten through `Runtime.predict_batch`
    decode              `allspark bench BUILD` on that text modality: time to first token, decode step, GB/s
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .memory import measure

PY = [sys.executable, "-m", "allspark"]

_RESIDENT = """
import json, sys
from pathlib import Path
from allspark.runtime import Runtime
mods = json.loads(sys.argv[2])
rt = Runtime.load(sys.argv[1], **({"modalities": mods} if mods else {}))
pss = [int(l.split()[1]) for l in Path("/proc/self/smaps_rollup").read_text().splitlines() if l.startswith("Pss:")][0]
print(json.dumps({"pss_mb": pss / 1024}))
"""

_STAGES = """
import json, sys, time
import numpy as np
from allspark.model.generation import GenerationConfig
from allspark.model.registry import random_inputs
from allspark.runtime import Request, Runtime
rt = Runtime.load(sys.argv[1])
repeat = int(sys.argv[2])
gen = GenerationConfig(max_new_tokens=4)
rng = np.random.default_rng(0)
reqs = {m: random_inputs(rt.config.modality(m), rng) for m in rt.modalities}
out = {"stages": {}, "answers": {}}
for m, x in reqs.items():
    runs = [rt.predict(m, x, generation=gen) for _ in range(repeat + 1)][1:]  # the first warms up
    out["stages"][m] = {k: float(np.median([r.timings_ms[k] for r in runs])) for k in runs[0].timings_ms}
    p = runs[-1]  # random weights may generate tokens that decode to no text: the ids then
    out["answers"][m] = (p.label if p.label is not None else p.tokens if p.tokens is not None
                         else np.asarray(p.values).ravel()[:3].round(3).tolist())
t = time.perf_counter()
mixed = rt.predict_batch([Request(m, x) for m, x in reqs.items()], gen)
out["mixed_batch"] = {"rows": len(mixed), "answered": sum(not isinstance(p, Exception) for p in mixed),
                      "errors": [str(p) for p in mixed if isinstance(p, Exception)],
                      "ms": 1e3 * (time.perf_counter() - t)}
print(json.dumps(out))
"""


def write_request_file(modality: str, inputs: dict, directory: Path) -> Path:
    """A file `allspark run` reads back into `inputs`: text as .txt, one array as .npy where the
    modality takes it (an image, a point cloud), several fields as .npz by name."""
    import numpy as np

    from ..model.registry import spec

    text = [v for v in inputs.values() if isinstance(v, str)]
    if text:
        path = directory / f"{modality}.txt"
        path.write_text(text[0])
        return path
    types = spec(modality).file_types
    if len(inputs) == 1 and (not types or ".npy" in types):
        path = directory / f"{modality}.npy"
        np.save(path, np.asarray(next(iter(inputs.values()))))
    else:
        path = directory / f"{modality}.npz"
        np.savez(path, **{k: np.asarray(v) for k, v in inputs.items()})
    if types and path.suffix not in types:
        raise ValueError(f"{modality}: no file type to write its request to ({', '.join(types)} taken)")
    return path


def _json_line(cmd: list[str]) -> dict:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd[:6])}...: exit {r.returncode}: {r.stderr.strip()[-800:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def paper_row(ckpt: Path, build: Path, precision: str, repeat: int, decode_tokens: int) -> dict:
    import numpy as np

    from ..contract.manifest import read_manifest
    from ..model.registry import random_inputs
    from ..model.config import AllSparkConfig

    # `measure` raises on a failed command, naming its status and stderr's tail
    export = measure([*PY, "export", str(ckpt), "--out", str(build), "--precision", precision, "--quiet", "--overwrite"])
    m = read_manifest(build)
    comps = m["components"]
    nbytes = {c: v["artifacts"]["onnx"]["bytes"] for c, v in comps.items()}
    largest = max(nbytes, key=nbytes.get)
    row = {"precision": precision, "modalities": m["modalities"], "quantization": m.get("quantization"),
           "export": {"seconds": export.seconds, "peak_mb": export.peak_pss_mb, "largest_component": largest,
                      "largest_component_bytes": nbytes[largest],
                      "peak_over_largest": round(export.peak_pss_mb * 2 ** 20 / nbytes[largest], 2),
                      "parity": {c: {"passed": v["parity"]["passed"], "scope": v["parity"].get("scope", "full depth"),
                                     "max_rel": max(o["max_rel"] for o in v["parity"]["outputs"].values())}
                                 for c, v in comps.items()}},
           "build_bytes": sum(p.stat().st_size for p in build.rglob("*") if p.is_file()),
           "decoder_bytes": nbytes["decoder"], "component_bytes": nbytes}
    from ..model.registry import spec

    text = next(mod for mod in m["modalities"] if spec(mod).head.generates)  # the LLM alone: language
    row["text_modality"] = text
    row["resident_mb"] = {"text": _json_line([sys.executable, "-c", _RESIDENT, str(build), json.dumps([text])])["pss_mb"],
                          "all": _json_line([sys.executable, "-c", _RESIDENT, str(build), "null"])["pss_mb"]}
    cfg = AllSparkConfig.from_dict(m["config"])
    rng = np.random.default_rng(1)
    files = build.parent / f"requests-{precision}"
    files.mkdir(exist_ok=True)
    row["run"] = {}
    for mod in m["modalities"]:
        f = write_request_file(mod, random_inputs(cfg.modality(mod), rng), files)
        out = build.parent / f"run-{precision}-{mod}.json"
        try:  # one modality's failure is recorded in its cell, not the row lost (export took ~15-20 min)
            with open(out, "w") as fh:
                r = measure([*PY, "run", str(build), "--modality", mod, "--input", str(f), "--json",
                             "--max-new-tokens", "4"], stdout=fh)
        except RuntimeError as e:
            row["run"][mod] = {"error": str(e)[-800:]}
            continue
        answer = json.loads(out.read_text())
        row["run"][mod] = {"seconds": r.seconds, "peak_mb": r.peak_pss_mb,
                           "answer": {k: answer[k] for k in ("label", "text", "values", "timings_ms", "error")
                                      if k in answer}}
    try:  # a later stage's failure is recorded in the row, not the row lost (export took ~20-40 min)
        row.update(_json_line([sys.executable, "-c", _STAGES, str(build), str(repeat)]))
    except RuntimeError as e:
        row["stages_error"] = str(e)[-800:]
    bench_out = build.parent / f"bench-{precision}"
    try:
        measure([*PY, "bench", str(build), "--backends", "onnxruntime", "--modalities", text, "--batch", "1",
                 "--repeat", str(repeat), "--warmup", "1", "--gen-tokens", "4", "--decode-tokens",
                 str(decode_tokens), "--out", str(bench_out), "--quiet"])
    except RuntimeError as e:
        row["generation_error"] = str(e)[-800:]
        return row
    g = json.loads((bench_out / "bench.json").read_text()).get("generation", {}).get("onnxruntime")
    if g:
        step = g["decode_step"]["median_ms"]
        row["generation"] = {"onnxruntime": {
            "ttft_ms": round(g["ttft"]["median_ms"], 1), "decode_step_ms": round(step, 2),
            "tokens_per_s": g["tokens_per_s"], "achieved_gbs": round(nbytes["decoder"] / (step / 1e3) / 1e9, 2)}}
    return row
