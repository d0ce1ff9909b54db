"""The Triton server (python backend) against the in-process runtime: `make gpu-check`'s server stage.

Writes a CPU-target repository (python models running onnxruntime) whose models open their
sessions on `providers` (on a GPU: ["cuda"], the decode loop device-resident), starts a real
`tritonserver` on loopback, sends one request per modality over gRPC, checks each answer is the
in-process `Runtime`'s on the same providers, and times 20 more round trips (p50). Then the served
generation streams against the in-process decode loop (issue 27's GPU target): `streams` concurrent
gRPC clients, one `stream_tokens`-token language generation each, at once, against one
`predict_batch` of as many rows in process (on a GPU the device-resident loop both sides); tokens/s
each way (median of `stream_repeats`, alternated) and their ratio; then the same streams taking a
response per token (reported beside it, not judged). Uses gRPC only (tritonclient's
HTTP client needs gevent, which a GPU image may lack).

    python -m allspark.bench.server_check BUILD OUT.json [--providers cuda]
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..contract.manifest import SYNTHETIC_KEY

STREAMS_TARGET = 0.9  # served streams' tokens/s over the in-process loop's


def check(build: Path, providers: list[str], repeats: int = 20, max_new_tokens: int = 8, streams: int = 8,
          stream_tokens: int = 64, stream_repeats: int = 3) -> dict:
    from ..model.registry import random_inputs
    from ..runtime import GenerationConfig, Runtime
    from ..serving.client import ServingClient
    from ..serving.options import RepositoryOptions, Target
    from ..serving.repository import write_repository
    from ..serving.server import TritonServer

    rt = Runtime.load(build, providers=providers or None)
    rng = np.random.default_rng(0)
    inputs = {m: random_inputs(rt.config.modality(m), rng) for m in rt.modalities}
    gen = GenerationConfig(max_new_tokens=max_new_tokens, ignore_eos=True)
    res: dict = {"providers": providers, "device_resident_in_process": rt.device_resident, "modalities": {},
                 "build": {"preset": rt.config.name, "precision": rt.manifest.get("precision"),
                           "synthetic_weights": bool(rt.manifest.get(SYNTHETIC_KEY))}}
    with tempfile.TemporaryDirectory(prefix="allspark-server-check-") as tmp:
        repo = Path(tmp) / "repo"
        write_repository(build, repo, RepositoryOptions(target=Target.CPU, providers=tuple(providers)))
        t0 = time.perf_counter()
        with TritonServer(repo) as server:
            res["ready_seconds"] = round(time.perf_counter() - t0, 1)
            with ServingClient(server.grpc_url, "grpc") as client:
                for m, x in inputs.items():
                    want = rt.predict(m, x, generation=gen)
                    kw = {"max_new_tokens": max_new_tokens, "ignore_eos": True} if want.text is not None else {}
                    got = client.predict(m, x, **kw)
                    ms = []
                    for _ in range(repeats):
                        t = time.perf_counter()
                        client.predict(m, x, **kw)
                        ms.append(1e3 * (time.perf_counter() - t))
                    if want.label is not None:
                        same = got.label == want.label
                    elif want.text is not None:
                        same = got.text == want.text
                    else:
                        same = bool(np.allclose(got.values, want.values, atol=1e-3))
                    res["modalities"][m] = {"same_answer_as_in_process": same, "p50_ms": round(float(np.median(ms)), 2)}
            gens = [m for m in inputs if rt.routes[m].head is None]  # the generation modalities
            if gens and streams > 0:
                res["streams"] = stream_throughput(rt, server.grpc_url, gens[0], inputs[gens[0]], streams,
                                                   stream_tokens, stream_repeats)
                # the same streams token by token: one response each per step, sent off the
                # scheduler's thread (serving.models.stream.ResponseQueue); reported, not judged
                res["streams_token_by_token"] = stream_throughput(rt, server.grpc_url, gens[0], inputs[gens[0]],
                                                                  streams, stream_tokens, stream_repeats,
                                                                  every_token=True)
    res["all_same"] = all(r["same_answer_as_in_process"] for r in res["modalities"].values())
    return res


def stream_throughput(rt, url: str, modality: str, x: dict, n: int, tokens: int, repeats: int,
                      every_token: bool = False) -> dict:
    """`n` served streams at once against one `n`-row `predict_batch` in process: tokens/s each way
    (median over `repeats`, the two alternated) and served / in-process. `every_token`: each stream
    takes one response per token (`ServingClient.stream`), not the final one only."""
    import threading

    from ..runtime import GenerationConfig, Request
    from ..serving.client import ServingClient

    gen = GenerationConfig(max_new_tokens=tokens, ignore_eos=True)
    clients = [ServingClient(url, "grpc") for _ in range(n)]
    local: list[float] = []
    served: list[float] = []
    errors: list[str] = []

    def generated(c) -> list[int]:
        if every_token:
            return list(c.stream(modality, x, max_new_tokens=tokens, ignore_eos=True))[-1].tokens
        return c.predict(modality, x, max_new_tokens=tokens, ignore_eos=True).tokens or []

    def one(c, go) -> None:
        go.wait()
        try:
            got = generated(c)
            if len(got) != tokens:
                errors.append(f"a stream gave {len(got)} tokens, not {tokens}")
        except Exception as e:  # counted: no ratio is reported over failed streams
            errors.append(str(e)[:200])

    try:
        for c in clients:  # connected, its stream open, the path warm
            generated(c)
        rt.predict_batch([Request(modality, x)] * n, gen)
    except Exception as e:  # recorded: the modalities' results stand, this one is not measured
        for c in clients:
            c.close()
        return {"modality": modality, "streams": n, "tokens": tokens, "every_token": every_token,
                "errors": [str(e)[:200]], "ratio": None, "target": STREAMS_TARGET}
    try:
        for _ in range(repeats):
            t = time.perf_counter()
            rt.predict_batch([Request(modality, x)] * n, gen)
            local.append(time.perf_counter() - t)
            go = threading.Barrier(n + 1)
            threads = [threading.Thread(target=one, args=(c, go)) for c in clients]
            for th in threads:
                th.start()
            go.wait()
            t = time.perf_counter()
            for th in threads:
                th.join()
            served.append(time.perf_counter() - t)
    finally:
        for c in clients:
            c.close()

    def rate(secs: list[float]) -> float:
        return round(n * tokens / float(np.median(secs)), 1)

    res = {"modality": modality, "streams": n, "tokens": tokens, "every_token": every_token,
           "in_process_tokens_per_s": rate(local),
           "served_tokens_per_s": rate(served), "errors": errors[:3], "target": STREAMS_TARGET}
    res["ratio"] = None if errors else round(res["served_tokens_per_s"] / res["in_process_tokens_per_s"], 3)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("build")
    ap.add_argument("out")
    ap.add_argument("--providers", nargs="*", default=["cuda"])
    a = ap.parse_args(argv)
    # gpu-check's time box ends a stage with SIGTERM: exit through the finally blocks (the server
    # stopped, the repository's copy of the build removed) instead of dying where it stands
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    res = check(Path(a.build), list(a.providers))
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    for m, r in res["modalities"].items():
        print(f"{m:<12} same answer: {r['same_answer_as_in_process']}  p50 {r['p50_ms']} ms")
    for key in ("streams", "streams_token_by_token"):
        if key not in res:
            continue
        s = res[key]
        print(f"{s['streams']} {s['modality']} streams of {s['tokens']} tokens"
              f"{' (a response per token)' if s.get('every_token') else ''}: served {s.get('served_tokens_per_s')} "
              f"tokens/s, in process {s.get('in_process_tokens_per_s')}: {s['ratio']}x (target {s['target']}x)"
              + (f"; errors: {s['errors']}" if s["errors"] else ""))
    return 0 if res["all_same"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
