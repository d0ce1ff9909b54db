"""Generation through the server: direct to allspark_runtime vs through the ensemble, interleaved with
in-process Runtime.predict, on one server (runtime layout, threads 1)."""
import json, sys, tempfile, time
from pathlib import Path
import numpy as np
from allspark.runtime import Runtime, GenerationConfig
from allspark.model.registry import random_inputs
from allspark.serving.client import ServingClient
from allspark.serving.options import RepositoryOptions, Target
from allspark.serving.repository import write_repository
from allspark.serving.server import TritonServer

build, n = sys.argv[1], int(sys.argv[2])
T = int(sys.argv[4]) if len(sys.argv) > 4 else 16
rt = Runtime.load(build, threads=1)
rng = np.random.default_rng(0)
gen = GenerationConfig(max_new_tokens=T, ignore_eos=True)
out = {}
with tempfile.TemporaryDirectory() as tmp:
    repo = Path(tmp) / "repo"
    write_repository(build, repo, RepositoryOptions(target=Target.CPU, threads=1))
    with TritonServer(repo) as server:
        direct = ServingClient(server.grpc_url, "grpc")
        ensemble = ServingClient(server.grpc_url, "grpc")
        ensemble._direct_outputs = lambda m: None  # the route before: the modality's ensemble
        for m in ("language", "code"):
            x = random_inputs(rt.config.modality(m), rng)
            t = {"in_process": [], "direct": [], "ensemble": []}
            for _ in range(5):
                rt.predict(m, x, generation=gen); direct.predict(m, x, max_new_tokens=T, ignore_eos=True)
                ensemble.predict(m, x, max_new_tokens=T, ignore_eos=True)
            import itertools
            order = list(itertools.permutations(("in_process", "direct", "ensemble")))  # every order alike
            for i in range(n):
                for k in order[i % 6]:
                    t0 = time.perf_counter()
                    if k == "in_process":
                        p = rt.predict(m, x, generation=gen)
                    else:
                        p = (direct if k == "direct" else ensemble).predict(m, x, max_new_tokens=T, ignore_eos=True)
                    t[k].append(1e3 * (time.perf_counter() - t0))
            a = {k: np.array(v) for k, v in t.items()}
            out[m] = {"n": n, **{f"{k}_p50_ms": round(float(np.median(v)), 3) for k, v in a.items()},
                      "direct_overhead_ms": round(float(np.median(a["direct"] - a["in_process"])), 3),
                      "ensemble_overhead_ms": round(float(np.median(a["ensemble"] - a["in_process"])), 3),
                      "direct_minus_ensemble_ms": round(float(np.median(a["direct"] - a["ensemble"])), 3)}
            out[m]["direct_overhead_rel"] = round(out[m]["direct_overhead_ms"] / out[m]["in_process_p50_ms"], 4)
            print(m, out[m], flush=True)
        direct.close(); ensemble.close()
Path(sys.argv[3]).write_text(json.dumps(out, indent=2) + "\n")
