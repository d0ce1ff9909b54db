"""`allspark serve` (write a Triton repository, optionally start a server), `allspark client`, and
the `serve` target of `allspark bench`."""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
import threading
from pathlib import Path

from ..commands import Command, at_least, port, positive_float
from ..errors import AllSparkError
from ..fsutil import remove_stale
from ..runtime.cli import print_prediction

DEFAULT_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}  # Triton's defaults, which the README's client lines use


def repository_options(args: argparse.Namespace):
    from .options import BatchingOptions, RepositoryOptions, TensorRTOptions

    target = args.target or ("cpu" if getattr(args, "start", False) else "gpu")
    return RepositoryOptions(
        target=target, layout=args.layout, artifact="tensorrt" if args.trt_plans else "onnx",
        batching=BatchingOptions(enabled=not args.no_batching, max_batch_size=args.max_batch_size,
                                 preferred_batch_sizes=tuple(args.preferred_batch_sizes if args.preferred_batch_sizes
                                                             else (b for b in (4, 8, 16, 32) if b <= args.max_batch_size)),
                                 max_queue_delay_us=args.max_queue_delay_us,
                                 queue_timeout_us=args.queue_timeout_us),
        tensorrt=TensorRTOptions(enabled=args.trt, fp16=not args.trt_fp32, engine_cache_dir=args.trt_engine_cache or "",
                                 max_workspace_bytes=args.trt_workspace_bytes),
        instances=args.instances, entry_instances=args.entry_instances, gpus=tuple(args.gpus or ()),
        warmup=args.warmup, threads=args.threads, max_new_tokens=args.max_new_tokens,
        max_request_mb=args.max_request_mb, bls_timeout_ms=args.bls_timeout_ms, providers=tuple(args.providers or ()))


def cmd_serve(args: argparse.Namespace) -> int:
    from .repository import write_repository

    options = repository_options(args)
    if not args.start and not args.repo:
        raise AllSparkError("give --repo DIR to write a repository, and/or --start to serve it")
    k8s = k8s_options(args, options) if args.k8s else None  # validated before anything is written
    if args.start:
        from .server import ServerError, check_ports

        try:  # a taken port fails here, in a second, not after every model has loaded
            check_ports({f"--{k}-port": getattr(args, f"{k}_port") for k in DEFAULT_PORTS})
        except ServerError as e:
            raise AllSparkError(str(e)) from None
        _check_backends(options)
        if options.providers in ((), ("cpu",)):  # host memory (on a GPU provider the weights go to the device)
            from ..contract.manifest import read_manifest
            from ..memory import check
            from .memory_plan import serving_need

            check(serving_need(read_manifest(Path(args.build)), options))
    tmp = None
    if not args.repo:  # a temporary repository; those of killed earlier runs are removed first
        remove_stale(Path(tempfile.gettempdir()), "allspark-repo-")
        tmp = tempfile.TemporaryDirectory(prefix=f"allspark-repo-{os.getpid()}-")
    repo = Path(args.repo) if args.repo else Path(tmp.name) / "repo"
    try:
        info = write_repository(args.build, repo, options)
        roles: dict[str, list[str]] = {}
        for name, role in info["models"].items():
            roles.setdefault(role, []).append(name)
        print(f"wrote {len(info['models'])} models ({options.target.value} target) to {repo}")
        for role, names in roles.items():
            print(f"  {role:<10} {', '.join(names)}")
        if k8s is not None:
            _write_k8s(k8s, args.k8s, repo)
        if args.start:
            return _serve_until_signalled(repo, args, options)
        return 0
    finally:
        if tmp is not None:
            tmp.cleanup()


def k8s_options(args: argparse.Namespace, options):
    """Kubernetes options for `--k8s`: GPUs per pod follow the target (and the highest --gpus id)."""
    from .k8s import K8sOptions, check_out_dir
    from .options import Target

    if not args.repo:
        raise AllSparkError("--k8s needs --repo DIR: the image (Dockerfile) is built from that repository")
    check_out_dir(args.k8s)
    gpus = (max(options.gpus) + 1 if options.gpus else 1) if options.target == Target.GPU else 0
    return K8sOptions(name=args.k8s_name, namespace=args.k8s_namespace, image=args.k8s_image, gpus=gpus,
                      replicas=args.replicas, max_replicas=max(args.replicas, K8sOptions.max_replicas))


def _write_k8s(k8s, out: str, repo: Path) -> None:
    from .k8s import write_k8s

    files = write_k8s(k8s, out)
    print(f"wrote Kubernetes manifests (image {k8s.image}, GPUs per pod: {k8s.gpus}) to {out}: "
          f"{', '.join(f.name for f in files)}")
    print(f"  docker build --build-arg REPO={repo} -t {k8s.image} .   then   kubectl apply -k {out}")


def _check_backends(options) -> None:
    from .options import Target
    from .server import available_backends

    needed = {"onnxruntime"} if options.target == Target.GPU else set()
    if needed - available_backends():
        raise AllSparkError(f"this tritonserver has backends {sorted(available_backends())}; the gpu target needs "
                            f"{sorted(needed)} (Triton's NGC container). Serve here with --target cpu.")


def _serve_until_signalled(repo: Path, args: argparse.Namespace, options) -> int:
    from .server import ServerError, ServerOptions, TritonServer
    from .supervisor import StubSupervisor

    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server = TritonServer(repo, args.http_port, args.grpc_port, args.metrics_port,
                              options=ServerOptions(startup_timeout_s=args.startup_timeout, log_verbose=args.log_verbose),
                              log_path=args.log or kept_log_path())
        print(f"starting tritonserver (loading the models takes a while on CPU); log: {server.log_path}", flush=True)
        try:
            server.start()
        except ServerError as e:  # one line: the cause from the log, and where the whole log is kept
            server.stop()
            cause = server.log_cause() if server.log_path.is_file() else str(e).splitlines()[0]
            raise AllSparkError(f"tritonserver did not start: {cause} (whole log kept: {server.log_path})") from None
        with server, StubSupervisor(server):  # a model whose stub died is reloaded
            print(f"ready: HTTP {server.http_url}  gRPC {server.grpc_url}  metrics {server.metrics_url}")
            print(f"log: {server.log_path} (kept)   Ctrl-C or SIGTERM to stop", flush=True)
            while not stop.wait(0.5):
                if server.process.poll() is not None:
                    raise AllSparkError(f"tritonserver exited with status {server.process.returncode}: "
                                        f"{server.log_cause()} (whole log kept: {server.log_path})")
            print("stopping ...", flush=True)
        print("stopped")
        return 0
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def kept_log_path() -> Path:
    """Where `serve --start` keeps the server's log by default (it outlives the server)."""
    import time

    cache = Path(os.environ.get("ALLSPARK_CACHE", Path.home() / ".cache" / "allspark"))
    return cache / "logs" / f"tritonserver-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


def cmd_client(args: argparse.Namespace) -> int:
    from ..model.readers import read_input
    from ..model.registry import resolve_modality
    from .client import ServingClient

    m = resolve_modality(args.modality)
    with ServingClient(args.url, "grpc" if args.grpc else "http", timeout_s=args.timeout) as client:
        inputs = read_input(m, args.input, client.modality_config(m))
        if args.stream and not args.json:
            final = None
            for ev in client.stream(m, inputs, args.prompt, args.max_new_tokens):
                if ev.final:
                    final = ev
                else:
                    print(ev.text, end="", flush=True)
            print(f"\n{m}: {final.text}" if final else "")
            return 0
        p = client.predict(m, inputs, prompt=args.prompt, max_new_tokens=args.max_new_tokens)
    print_prediction(m, p, args.json)
    return 0


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from .bench import BenchOptions, run_bench

    opts = BenchOptions(concurrency=tuple(args.concurrency), max_requests=args.requests, max_seconds=args.seconds,
                        modalities=tuple(args.modalities or ()), protocol=args.protocol,
                        max_new_tokens=args.max_new_tokens, compare_batching=not args.no_compare, compare_layouts=not args.no_compare,
                        threads=args.threads, providers=tuple(args.providers or ()), floor=not args.no_floor)
    run_bench(args.build, args.out, opts)
    return 0


def _add_repository_flags(s: argparse.ArgumentParser) -> None:
    g = s.add_argument_group("repository")
    g.add_argument("--target", choices=("gpu", "cpu"),
                   help="gpu: onnxruntime models on KIND_GPU; cpu: python models running onnxruntime "
                        "(default: gpu, or cpu with --start)")
    from .layouts import LAYOUTS, Layout

    builtin = [x.value for x in (Layout.RUNTIME, Layout.COMPONENTS)]  # then any registered by a plug-in
    names = builtin + sorted(set(LAYOUTS) - set(builtin))
    g.add_argument("--layout", choices=names,
                   help="; ".join(LAYOUTS[n].help for n in names) + ". Default: runtime on cpu, components on gpu")
    g.add_argument("--providers", nargs="+", metavar="EP",
                   help="cpu target: the python models' onnxruntime execution providers, e.g. cuda (the python "
                        "backend on a GPU)")
    g.add_argument("--max-batch-size", type=at_least(1), default=32)
    g.add_argument("--preferred-batch-sizes", type=at_least(1), nargs="+",
                   help="default: those of 4 8 16 32 up to --max-batch-size")
    g.add_argument("--max-queue-delay-us", type=at_least(0), default=0)
    g.add_argument("--queue-timeout-us", type=at_least(0), default=0,
                   help="reject requests waiting longer in a model's queue (0: never); per request: the client's timeout_us")
    g.add_argument("--no-batching", action="store_true", help="no dynamic batcher on any model")
    g.add_argument("--instances", type=at_least(1), default=1, help="instances per component model")
    g.add_argument("--entry-instances", type=at_least(1), default=2, help="instances of the shared entry models (runtime layout: forwarder instances and single-pass worker threads of the one process holding the build, not copies of it)")
    g.add_argument("--gpus", type=at_least(0), nargs="*", help="KIND_GPU device ids (default: all)")
    g.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="every model answers once before the server reports ready (default: on)")
    g.add_argument("--threads", type=at_least(0), default=0, help="onnxruntime intra-op threads in cpu models (0: default)")
    g.add_argument("--max-new-tokens", type=at_least(1), default=64, help="generation default per request")
    g.add_argument("--max-request-mb", type=positive_float, default=64.0,
                   help="largest request an entry accepts, all inputs together (default: %(default)s)")
    g.add_argument("--bls-timeout-ms", type=at_least(1), default=30_000,
                   help="components layout: fail a component call queued longer (default: %(default)s)")
    g.add_argument("--trt", action="store_true", help="TensorRT execution accelerator (gpu target)")
    g.add_argument("--trt-plans", action="store_true",
                   help="serve the build's TensorRT engines (allspark trt-engines) as tensorrt_plan models (gpu target)")
    g.add_argument("--trt-fp32", action="store_true", help="TensorRT in fp32 instead of fp16")
    g.add_argument("--trt-engine-cache", metavar="DIR", help="TensorRT engine cache directory on the server")
    g.add_argument("--trt-workspace-bytes", type=at_least(1 << 20), default=1 << 30)


def _serve_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("build")
    s.add_argument("--repo", help="repository directory (written atomically; default with --start: a temp dir)")
    s.add_argument("--start", action="store_true", help="start a Triton server on 127.0.0.1 and serve until Ctrl-C")
    s.add_argument("--http-port", type=port, default=DEFAULT_PORTS["http"],
                   help="with --start (default: %(default)s, Triton's; 0: a free port)")
    s.add_argument("--grpc-port", type=port, default=DEFAULT_PORTS["grpc"], help="(default: %(default)s; 0: a free port)")
    s.add_argument("--metrics-port", type=port, default=DEFAULT_PORTS["metrics"],
                   help="(default: %(default)s; 0: a free port)")
    s.add_argument("--startup-timeout", type=positive_float, default=300.0)
    s.add_argument("--log", help="server log file, kept after the server stops (default: "
                                 "$ALLSPARK_CACHE/logs/tritonserver-<time>-<pid>.log)")
    s.add_argument("--log-verbose", type=at_least(0), default=0)
    _add_repository_flags(s)
    _add_k8s_flags(s)


def _add_k8s_flags(s: argparse.ArgumentParser) -> None:
    from .k8s import K8sOptions

    g = s.add_argument_group("kubernetes")
    g.add_argument("--k8s", metavar="DIR", help="also write Kubernetes manifests for the repository baked into an "
                   "image (Deployment, Service, HPA, kustomization; KServe InferenceService); see docs/deploy.md")
    g.add_argument("--k8s-image", metavar="IMAGE", default=K8sOptions.image,
                   help="image built with the Dockerfile (default: %(default)s)")
    g.add_argument("--k8s-name", metavar="NAME", default=K8sOptions.name,
                   help="name of every manifest (default: %(default)s)")
    g.add_argument("--k8s-namespace", metavar="NS", default=K8sOptions.namespace)
    g.add_argument("--replicas", metavar="N", type=at_least(1), default=K8sOptions.replicas,
                   help="pods at start; the HPA scales between 1 and max(4, N)")


def _client_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("url", help="HOST:PORT of the server's HTTP (or, with --grpc, gRPC) endpoint")
    s.add_argument("--modality", required=True)
    s.add_argument("--input", required=True, help="PNG/JPEG, GeoTIFF, .npy, .npz, CSV, .ply/.xyz/.txt, or a text file")
    s.add_argument("--grpc", action="store_true")
    s.add_argument("--prompt", help="instead of the modality's first prompt")
    s.add_argument("--max-new-tokens", type=at_least(1), help="generation (default: the server's)")
    s.add_argument("--stream", action="store_true", help="print generated text as it streams")
    s.add_argument("--timeout", type=positive_float, default=60.0)
    s.add_argument("--json", action="store_true")


def _bench_serve_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("build")
    s.add_argument("--out", default="docs/benchmarks/serve.json", help="JSON; a .md summary is written beside it")
    s.add_argument("--concurrency", type=at_least(1), nargs="+", default=[1, 8, 32])
    s.add_argument("--requests", type=at_least(1), default=200, help="at most this many requests per modality and level")
    s.add_argument("--seconds", type=positive_float, default=6.0, help="at most this long per modality and level")
    s.add_argument("--modalities", nargs="*")
    s.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    s.add_argument("--max-new-tokens", type=at_least(1), default=16)
    s.add_argument("--no-compare", action="store_true", help="skip the components layout and the repository without dynamic batching")
    s.add_argument("--threads", type=at_least(0), default=1, help="onnxruntime intra-op threads, in-process and in the server")
    s.add_argument("--providers", nargs="+", metavar="EP", help="onnxruntime execution providers, in-process and in "
                   "the server's python models (e.g. cuda)")
    s.add_argument("--no-floor", action="store_true", help="skip timing the serving floor (a model that does nothing)")


def _probe_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("repo", help="the model repository the local tritonserver serves (in the image: /models)")
    s.add_argument("--url", help="also require Triton's /v2/health/live at this HTTP address (e.g. 127.0.0.1:8000)")


def cmd_probe(args: argparse.Namespace) -> int:
    """Exit 0 if every python model of REPO has all its stubs alive (and --url is live), else 1."""
    from .supervisor import probe

    problems = probe(args.repo, args.url)
    for p in problems:
        print(p)
    print("unhealthy" if problems else "healthy")
    return 1 if problems else 0


COMMANDS = (
    Command("serve", "write a Triton model repository for a build; --start serves it", _serve_arguments, cmd_serve),
    Command("probe", "liveness of a local Triton server: every python model's stubs alive (Kubernetes exec probe)",
            _probe_arguments, cmd_probe),
    Command("client", "one request from a file to a running server (like `allspark run`)", _client_arguments,
            cmd_client),
)
BENCH_TARGETS = (
    Command("serve", "Triton round trips per modality at concurrency 1/8/32 vs in-process, dynamic batching "
            "on vs off", _bench_serve_arguments, cmd_bench_serve),
)
