"""Kubernetes manifests for a Triton model repository baked into an image (the repo's `Dockerfile`).

    write_k8s(K8sOptions(image="registry.example/allspark-triton:0.1.0", gpus=1), "k8s")
    # k8s/ deployment.yaml service.yaml hpa.yaml kustomization.yaml   -> kubectl apply -k k8s/
    #      inferenceservice.yaml                                      -> KServe, instead of the three

Scale-out is replicas of one tritonserver pod behind a ClusterIP Service: Kubernetes spreads the
connections over the pods and Triton batches what each pod receives; nothing here routes requests.

The HorizontalPodAutoscaler scales the Deployment on a Pods metric, `QUEUE_METRIC`: the average time
a request waited in Triton's queues over the last minute. Triton exports only cumulative counters
(`nv_inference_queue_duration_us`, `nv_inference_request_success`, per model), so a Prometheus
adapter rule (`PROMETHEUS_ADAPTER_RULE`, also in hpa.yaml's header) divides their rates, per pod.
Without that adapter the HPA reports the metric as unavailable and leaves the replica count alone.

The manifests are plain dicts (`k8s_manifests`), checked in tests against the official Kubernetes
API models; `write_k8s` writes them as YAML, atomically.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

from .. import __version__
from ..errors import ConfigError
from ..fsutil import atomic_directory

QUEUE_METRIC = "allspark_inference_queue_duration_us_per_request"
GPU_RESOURCE = "nvidia.com/gpu"
KSERVE_MODEL_DIR = "/mnt/models"  # where KServe's storage initializer puts `storage_uri`
KSERVE_CONTAINER = "kserve-container"  # the name KServe looks for (STORAGE_URI, resource defaults)
STORAGE_SCHEMES = ("gs", "s3", "pvc", "hdfs", "webhdfs", "http", "https", "hf", "oci")

# The Prometheus adapter rule that serves QUEUE_METRIC per pod (prometheus-adapter's `rules:`).
# Summed over the pod's models, so it is the queue time of an average model execution; the 1e-3
# floor keeps an idle pod at 0 instead of 0/0.
PROMETHEUS_ADAPTER_RULE = f"""\
- seriesQuery: 'nv_inference_queue_duration_us{{namespace!="",pod!=""}}'
  resources:
    overrides:
      namespace: {{resource: namespace}}
      pod: {{resource: pod}}
  name:
    matches: ^nv_inference_queue_duration_us$
    as: {QUEUE_METRIC}
  metricsQuery: >-
    sum(rate(nv_inference_queue_duration_us{{<<.LabelMatchers>>}}[1m])) by (<<.GroupBy>>)
    / clamp_min(sum(rate(nv_inference_request_success{{<<.LabelMatchers>>}}[1m])) by (<<.GroupBy>>), 1e-3)
"""

_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # Service and InferenceService names
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # namespaces
_QUANTITY = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?\d+)?$")
_SUFFIX = {"": 1, "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "k": 10**3, "M": 10**6,
           "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
           **{s: 2 ** (10 * (i + 1)) for i, s in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"))}}
PULL_POLICIES = ("IfNotPresent", "Always", "Never")


def quantity(text: str, name: str) -> Decimal:
    """A Kubernetes resource quantity ("500m", "2", "16Gi") as a number, or ConfigError."""
    m = _QUANTITY.match(str(text))
    if not m:
        raise ConfigError(f"{name}: expected a Kubernetes quantity such as 500m, 2, 512Mi or 16Gi, got {text!r}")
    number, suffix = Decimal(m.group(1)), m.group(2) or ""
    try:
        scale = Decimal(f"1{suffix}") if suffix[:1] in ("e", "E") else Decimal(_SUFFIX[suffix])  # 1e3, or Gi
        return number * scale
    except InvalidOperation:
        raise ConfigError(f"{name}: {text!r} is out of range") from None


@dataclass(frozen=True)
class K8sOptions:
    """One tritonserver per pod; `gpus` per pod (0: the CPU target, no GPU requested)."""

    name: str = "allspark"
    namespace: str = "default"
    image: str = f"allspark-triton:{__version__}"
    image_pull_policy: str = "IfNotPresent"
    replicas: int = 1
    gpus: int = 1
    cpu_request: str = "2"
    cpu_limit: str = "8"
    memory_request: str = "8Gi"
    memory_limit: str = "16Gi"
    shm_size: str = "1Gi"  # /dev/shm: the python backend's stubs exchange tensors through it
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    model_repository: str = "/models"  # in the image (the Dockerfile's COPY)
    storage_uri: str = ""  # KServe only: download the repository from here instead (s3://, gs://, pvc://...)
    min_replicas: int = 1  # HPA / InferenceService bounds
    max_replicas: int = 4
    target_queue_time_us: int = 50_000  # HPA: average queue time per request it scales to keep
    startup_timeout_s: int = 900  # loading every model (and building TensorRT engines) may take minutes

    def __post_init__(self) -> None:
        if len(self.name) > 63 or not _DNS1035.match(self.name):
            raise ConfigError(f"name: expected a DNS-1035 label (lower-case letters, digits and '-', starting "
                              f"with a letter, at most 63 characters), got {self.name!r}")
        if len(self.namespace) > 63 or not _DNS1123.match(self.namespace):
            raise ConfigError(f"namespace: expected a DNS-1123 label (lower-case letters, digits and '-', "
                              f"at most 63 characters), got {self.namespace!r}")
        if not self.image or any(c.isspace() for c in self.image):
            raise ConfigError(f"image: expected an image reference such as registry/allspark-triton:0.1.0, "
                              f"got {self.image!r}")
        if self.image_pull_policy not in PULL_POLICIES:
            raise ConfigError(f"image_pull_policy: expected one of {', '.join(PULL_POLICIES)}, "
                              f"got {self.image_pull_policy!r}")
        for field in ("replicas", "min_replicas", "target_queue_time_us", "startup_timeout_s"):
            if getattr(self, field) < 1:
                raise ConfigError(f"{field}: expected an integer >= 1, got {getattr(self, field)}")
        if self.gpus < 0:
            raise ConfigError(f"gpus: expected GPUs per pod >= 0 (0 for the CPU target), got {self.gpus}")
        if not self.min_replicas <= self.replicas <= self.max_replicas:
            raise ConfigError(f"replicas: expected min_replicas <= replicas <= max_replicas, got "
                              f"{self.min_replicas} <= {self.replicas} <= {self.max_replicas}")
        ports = {"http_port": self.http_port, "grpc_port": self.grpc_port, "metrics_port": self.metrics_port}
        for field, p in ports.items():
            if not 1 <= p <= 65535:
                raise ConfigError(f"{field}: expected a port in 1..65535, got {p}")
        if len(set(ports.values())) != 3:
            raise ConfigError(f"ports: expected three different ports, got {ports}")
        for kind in ("cpu", "memory"):
            request, limit = getattr(self, f"{kind}_request"), getattr(self, f"{kind}_limit")
            if quantity(request, f"{kind}_request") > quantity(limit, f"{kind}_limit"):
                raise ConfigError(f"{kind}_request: expected at most {kind}_limit ({limit}), got {request}")
            if quantity(request, f"{kind}_request") <= 0:
                raise ConfigError(f"{kind}_request: expected more than 0, got {request}")
        if quantity(self.shm_size, "shm_size") <= 0:
            raise ConfigError(f"shm_size: expected more than 0, got {self.shm_size}")
        if not self.model_repository.startswith("/"):
            raise ConfigError(f"model_repository: expected an absolute path inside the image, "
                              f"got {self.model_repository!r}")
        scheme = self.storage_uri.partition("://")[0]
        if self.storage_uri and ("://" not in self.storage_uri or scheme not in STORAGE_SCHEMES):
            schemes = ", ".join(f"{s}://" for s in STORAGE_SCHEMES)
            raise ConfigError(f"storage_uri: expected a KServe storage URI ({schemes}), got {self.storage_uri!r}")


def triton_args(opts: K8sOptions, repository: str | None = None) -> list[str]:
    """tritonserver's command line: the Dockerfile's CMD for the default options.

    Models load at start (the default model-control mode); --strict-readiness keeps a pod out of
    the Service until every model is ready. The python-backend settings are those `TritonServer`
    runs with in tests.
    """
    return ["tritonserver", f"--model-repository={repository or opts.model_repository}",
            "--strict-readiness=true", f"--http-port={opts.http_port}", f"--grpc-port={opts.grpc_port}",
            f"--metrics-port={opts.metrics_port}", "--disable-auto-complete-config",
            f"--backend-config=python,shm-default-byte-size={4 << 20}",
            f"--backend-config=python,shm-growth-byte-size={1 << 20}"]


def _labels(opts: K8sOptions) -> dict[str, str]:
    """The pod selector: stable across upgrades (a Deployment's selector cannot change)."""
    return {"app.kubernetes.io/name": "allspark-triton", "app.kubernetes.io/instance": opts.name}


def _metadata(opts: K8sOptions, labels: dict[str, str] | None = None) -> dict:
    return {"name": opts.name, "namespace": opts.namespace,
            "labels": {**(labels or _labels(opts)), "app.kubernetes.io/version": __version__,
                       "app.kubernetes.io/managed-by": "allspark"}}


def _scrape_annotations(opts: K8sOptions) -> dict[str, str]:
    """For a Prometheus that discovers pods by annotation (the community chart's default job)."""
    return {"prometheus.io/scrape": "true", "prometheus.io/port": str(opts.metrics_port),
            "prometheus.io/path": "/metrics"}


def _resources(opts: K8sOptions) -> dict:
    limits = {"cpu": opts.cpu_limit, "memory": opts.memory_limit}
    if opts.gpus:  # extended resources: a limit alone (the request defaults to it)
        limits[GPU_RESOURCE] = str(opts.gpus)
    return {"requests": {"cpu": opts.cpu_request, "memory": opts.memory_request}, "limits": limits}


def _probes(opts: K8sOptions, repository: str) -> dict:
    def get(path: str, period: int, failures: int, timeout: int) -> dict:
        return {"httpGet": {"path": path, "port": opts.http_port}, "periodSeconds": period,
                "failureThreshold": failures, "timeoutSeconds": timeout}

    # Triton opens its endpoints only after loading every model: the startup probe gives it
    # startup_timeout_s before the liveness probe may restart the container. Liveness is
    # `allspark probe`: Triton's /v2/health/live stays 200 while a python model's stub is dead
    # (measured, Triton 2.51), so the probe also counts the stubs against the configs.
    live = {"exec": {"command": ["allspark", "probe", repository, "--url", f"127.0.0.1:{opts.http_port}"]},
            "periodSeconds": 10, "failureThreshold": 3, "timeoutSeconds": 10}
    return {"startupProbe": get("/v2/health/ready", 10, math.ceil(opts.startup_timeout_s / 10), 5),
            "livenessProbe": live,
            "readinessProbe": get("/v2/health/ready", 5, 3, 3)}


def _shm_volume(opts: K8sOptions) -> tuple[dict, dict]:
    """A memory-backed /dev/shm (a container's default is 64 MiB)."""
    return ({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": opts.shm_size}},
            {"name": "dshm", "mountPath": "/dev/shm"})


def _container(opts: K8sOptions, name: str, repository: str | None, ports: list[dict]) -> dict:
    _, mount = _shm_volume(opts)
    # args only: the image's entrypoint (NGC's nvidia_entrypoint.sh) still runs them
    return {"name": name, "image": opts.image, "imagePullPolicy": opts.image_pull_policy,
            "args": triton_args(opts, repository), "ports": ports, "resources": _resources(opts),
            **_probes(opts, repository or opts.model_repository), "volumeMounts": [mount]}


def _ports(opts: K8sOptions) -> list[dict]:
    return [{"name": "http", "containerPort": opts.http_port, "protocol": "TCP"},
            {"name": "grpc", "containerPort": opts.grpc_port, "protocol": "TCP"},
            {"name": "metrics", "containerPort": opts.metrics_port, "protocol": "TCP"}]


def deployment(opts: K8sOptions) -> dict:
    volume, _ = _shm_volume(opts)
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": _metadata(opts),
        "spec": {
            "replicas": opts.replicas,
            "selector": {"matchLabels": _labels(opts)},
            "template": {
                "metadata": {"labels": _labels(opts), "annotations": _scrape_annotations(opts)},
                "spec": {
                    "containers": [_container(opts, "tritonserver", None, _ports(opts))],
                    "volumes": [volume],
                    # longer than Triton's own 30 s wait for in-flight requests after SIGTERM
                    "terminationGracePeriodSeconds": 60,
                },
            },
        },
    }


def service(opts: K8sOptions) -> dict:
    # gRPC keeps one HTTP/2 connection: kube-proxy balances connections, not requests
    ports = [{"name": p["name"], "port": p["containerPort"], "targetPort": p["name"], "protocol": "TCP"}
             for p in _ports(opts)]
    return {"apiVersion": "v1", "kind": "Service", "metadata": _metadata(opts),
            "spec": {"type": "ClusterIP", "selector": _labels(opts), "ports": ports}}


def horizontal_pod_autoscaler(opts: K8sOptions) -> dict:
    return {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": _metadata(opts),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": opts.name},
            "minReplicas": opts.min_replicas, "maxReplicas": opts.max_replicas,
            "metrics": [{"type": "Pods", "pods": {
                "metric": {"name": QUEUE_METRIC},
                "target": {"type": "AverageValue", "averageValue": str(opts.target_queue_time_us)}}}],
            # a new pod takes minutes to load its models: scale down only after 5 quiet minutes
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300}},
        },
    }


def inference_service(opts: K8sOptions) -> dict:
    """KServe's custom-container predictor running the same image and arguments.

    Not KServe's stock `triton` runtime: its image lacks the `allspark` package the python models
    import. One port (HTTP): Knative routes a single port. With `storage_uri` KServe's storage
    initializer downloads the repository to /mnt/models (the STORAGE_URI variable of kserve-container).
    """
    volume, _ = _shm_volume(opts)
    repository = KSERVE_MODEL_DIR if opts.storage_uri else None
    container = _container(opts, KSERVE_CONTAINER, repository,
                           [{"name": "http1", "containerPort": opts.http_port, "protocol": "TCP"}])
    if opts.storage_uri:
        container["env"] = [{"name": "STORAGE_URI", "value": opts.storage_uri}]
    # KServe copies these labels to its pods: not the Service's selector, so that Service never
    # sends traffic to them should both be applied
    meta = _metadata(opts, {**_labels(opts), "app.kubernetes.io/name": "allspark-triton-kserve"})
    meta["annotations"] = _scrape_annotations(opts)
    return {
        "apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService", "metadata": meta,
        "spec": {"predictor": {"minReplicas": opts.min_replicas, "maxReplicas": opts.max_replicas,
                               "containers": [container], "volumes": [volume]}},
    }


def k8s_manifests(opts: K8sOptions) -> dict[str, dict]:
    """{file stem: manifest}: deployment, service, hpa (kubectl apply -k) and inferenceservice (KServe)."""
    return {"deployment": deployment(opts), "service": service(opts), "hpa": horizontal_pod_autoscaler(opts),
            "inferenceservice": inference_service(opts)}


KUSTOMIZED = ("deployment", "service", "hpa")
HEADER = "# Generated by `allspark serve --k8s`"
FILES = tuple(f"{stem}.yaml" for stem in (*KUSTOMIZED, "inferenceservice", "kustomization"))
_NOTES = {
    "hpa": "# Needs a Prometheus adapter serving the Pods metric below; its rule (prometheus-adapter `rules:`):\n"
           + "".join(f"#   {line}\n" for line in PROMETHEUS_ADAPTER_RULE.splitlines()),
    "inferenceservice": "# KServe, INSTEAD of deployment/service/hpa: kubectl apply -f inferenceservice.yaml\n",
    "kustomization": "# kubectl apply -k DIR. Not inferenceservice.yaml: that is the KServe alternative to these.\n",
}


def _dump(stem: str, manifest: dict) -> str:
    import yaml

    return (f"{HEADER} ({stem}).\n" + _NOTES.get(stem, "")
            + yaml.safe_dump(manifest, sort_keys=False, default_flow_style=False))


def check_out_dir(out_dir: str | Path) -> None:
    """ConfigError unless `out_dir` is absent, empty, or holds only what `write_k8s` wrote there."""
    out = Path(out_dir)
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"--k8s {out}: expected a directory, found a file")
        foreign = sorted(p.name for p in out.iterdir() if p.name not in FILES)
        kust = out / "kustomization.yaml"
        ours = kust.is_file() and kust.read_text().startswith(HEADER)
        if foreign or (any(out.iterdir()) and not ours):
            raise ConfigError(f"--k8s {out}: exists and was not written by `allspark serve --k8s` "
                              f"({', '.join(foreign) or 'no kustomization.yaml with its header'}); "
                              f"choose another directory or remove it")


def write_k8s(opts: K8sOptions, out_dir: str | Path) -> list[Path]:
    """Write the manifests and a kustomization to `out_dir`, atomically; returns the files written.

    An existing `out_dir` is replaced only if it holds nothing but files this function writes.
    """
    out = Path(out_dir)
    check_out_dir(out)
    manifests = k8s_manifests(opts)
    kustomization = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                     "resources": [f"{stem}.yaml" for stem in KUSTOMIZED]}
    with atomic_directory(out) as tmp:
        for stem, manifest in {**manifests, "kustomization": kustomization}.items():
            (tmp / f"{stem}.yaml").write_text(_dump(stem, manifest))
    return [out / f for f in FILES]
