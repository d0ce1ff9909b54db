"""Kubernetes deployment (`allspark serve --k8s`, allspark.serving.k8s, the Dockerfile), without a cluster
or docker: every manifest deserialises into the official Kubernetes client's API models and
serialises back to exactly itself (so no field is misspelled or misplaced: the models drop what they
do not know), probes, ports, selectors and the HPA's target agree with each other and with the
Dockerfile, bad options are refused naming what was expected, and the output directory is written
atomically."""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from allspark.errors import ConfigError
from allspark.serving.k8s import (
    FILES,
    GPU_RESOURCE,
    PROMETHEUS_ADAPTER_RULE,
    QUEUE_METRIC,
    K8sOptions,
    k8s_manifests,
    quantity,
    triton_args,
    write_k8s,
)

ROOT = Path(__file__).resolve().parents[1]
GPU, CPU = K8sOptions(), K8sOptions(name="allspark-cpu", namespace="serving", gpus=0, replicas=2)
KSERVE_EXTENSION = ("minReplicas", "maxReplicas")  # PredictorSpec = PodSpec inline + these (KServe's)


@pytest.fixture(scope="module")
def api():
    kubernetes = pytest.importorskip("kubernetes", reason="the test extra: pip install -e '.[test]'")
    return kubernetes.client.ApiClient()


def round_trip(api, obj: dict, kind: str) -> dict:
    """`obj` through the client's model `kind` and back. The client (37.x) deserialises JSON text;
    an unknown key is silently dropped, which the caller's equality check then catches."""
    model = api.deserialize(json.dumps(obj), kind, "application/json")
    assert type(model).__name__ == kind
    return api.sanitize_for_serialization(model)


def container(manifest: dict) -> dict:
    spec = manifest["spec"]["template"]["spec"] if manifest["kind"] == "Deployment" else manifest["spec"]["predictor"]
    [c] = spec["containers"]
    return c


# ---- the manifests against the API models -----------------------------------------------------


@pytest.mark.parametrize("opts", [GPU, CPU], ids=["gpu", "cpu"])
def test_every_manifest_round_trips_through_the_api_models(api, opts):
    m = k8s_manifests(opts)
    assert set(m) == {"deployment", "service", "hpa", "inferenceservice"}
    for stem, kind in (("deployment", "V1Deployment"), ("service", "V1Service"),
                       ("hpa", "V2HorizontalPodAutoscaler")):
        assert round_trip(api, m[stem], kind) == m[stem], stem
    isvc = m["inferenceservice"]  # a CRD: its metadata and its predictor's pod spec, piece by piece
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    assert set(isvc) == {"apiVersion", "kind", "metadata", "spec"} and set(isvc["spec"]) == {"predictor"}
    assert round_trip(api, isvc["metadata"], "V1ObjectMeta") == isvc["metadata"]
    predictor = isvc["spec"]["predictor"]
    pod = {k: v for k, v in predictor.items() if k not in KSERVE_EXTENSION}
    assert round_trip(api, pod, "V1PodSpec") == pod
    assert round_trip(api, container(isvc), "V1Container") == container(isvc)
    assert predictor["minReplicas"] == opts.min_replicas and predictor["maxReplicas"] == opts.max_replicas


def test_a_misspelled_field_fails_the_round_trip(api):
    """The check above is not vacuous: the models drop unknown keys instead of refusing them."""
    good = k8s_manifests(GPU)["deployment"]
    for path, typo in ((("spec",), "replica"), (("spec", "template", "spec", "containers", 0), "livenesProbe"),
                       (("metadata",), "label")):
        bad = copy.deepcopy(good)
        node = bad
        for key in path:
            node = node[key]
        node[typo] = node.get(typo + "s", 1)
        assert round_trip(api, bad, "V1Deployment") != bad, typo
    bad = copy.deepcopy(good)
    container(bad)["resources"]["limits"]["cpu"] = 8  # a quantity must be a string in the models
    with pytest.raises(ValueError, match="limits.cpu"):  # pydantic's ValidationError
        round_trip(api, bad, "V1Deployment")


# ---- what the manifests say -------------------------------------------------------------------


@pytest.mark.parametrize("stem", ["deployment", "inferenceservice"])
def test_probes_and_ports(stem):
    m = k8s_manifests(GPU)[stem]
    c = container(m)
    paths = {probe: (c[probe]["httpGet"]["path"], c[probe]["httpGet"]["port"]) for probe in ("readinessProbe", "startupProbe")}
    assert paths == {"readinessProbe": ("/v2/health/ready", 8000), "startupProbe": ("/v2/health/ready", 8000)}
    # liveness: Triton's /v2/health/live stays 200 with a dead stub; `allspark probe` counts them too
    repo = next(a.split("=", 1)[1] for a in c["args"] if a.startswith("--model-repository="))
    assert c["livenessProbe"]["exec"]["command"] == ["allspark", "probe", repo, "--url", "127.0.0.1:8000"]
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= GPU.startup_timeout_s  # slow model loading
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    if stem == "deployment":
        assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
        annotations = m["spec"]["template"]["metadata"]["annotations"]
    else:
        assert ports == {"http1": 8000}  # Knative routes one port
        annotations = m["metadata"]["annotations"]
    assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": "8002",
                           "prometheus.io/path": "/metrics"}
    assert c["args"] == triton_args(GPU) and c["args"][0] == "tritonserver"
    assert {"--model-repository=/models", "--strict-readiness=true", "--http-port=8000", "--grpc-port=8001",
            "--metrics-port=8002"} <= set(c["args"])
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]


def test_service_selects_the_deployments_pods_and_not_kserves():
    m = k8s_manifests(CPU)
    dep, svc = m["deployment"], m["service"]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"] == pod_labels == svc["spec"]["selector"]
    assert svc["spec"]["type"] == "ClusterIP"
    named = {p["name"] for p in container(dep)["ports"]}
    assert {(p["name"], p["port"], p["targetPort"]) for p in svc["spec"]["ports"]} == {
        ("http", 8000, "http"), ("grpc", 8001, "grpc"), ("metrics", 8002, "metrics")}
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= named
    kserve_labels = m["inferenceservice"]["metadata"]["labels"]  # KServe copies them to its pods
    assert not all(kserve_labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    for manifest in m.values():
        assert manifest["metadata"]["name"] == "allspark-cpu" and manifest["metadata"]["namespace"] == "serving"


def test_hpa_scales_the_deployment_on_queue_time():
    opts = K8sOptions(min_replicas=2, replicas=3, max_replicas=8, target_queue_time_us=20_000)
    m = k8s_manifests(opts)
    spec = m["hpa"]["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                      "name": m["deployment"]["metadata"]["name"]}
    assert (spec["minReplicas"], spec["maxReplicas"], m["deployment"]["spec"]["replicas"]) == (2, 8, 3)
    [metric] = spec["metrics"]
    assert metric == {"type": "Pods", "pods": {"metric": {"name": QUEUE_METRIC},
                                               "target": {"type": "AverageValue", "averageValue": "20000"}}}


def test_the_adapter_rule_builds_the_metric_from_tritons_counters():
    [rule] = yaml.safe_load(PROMETHEUS_ADAPTER_RULE)
    assert rule["name"]["as"] == QUEUE_METRIC
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    query = rule["metricsQuery"]
    assert "rate(nv_inference_queue_duration_us{" in query and "rate(nv_inference_request_success{" in query
    numerator, denominator = query.index("nv_inference_queue_duration_us"), query.index("nv_inference_request_success")
    assert numerator < query.index("/") < denominator


@pytest.mark.parametrize("gpus", [0, 1, 2])
def test_gpu_limits_iff_gpus(gpus):
    m = k8s_manifests(K8sOptions(gpus=gpus))
    for stem in ("deployment", "inferenceservice"):
        res = container(m[stem])["resources"]
        assert GPU_RESOURCE not in res["requests"]
        assert res["limits"].get(GPU_RESOURCE) == (str(gpus) if gpus else None), stem
        assert set(res["requests"]) == {"cpu", "memory"} and {"cpu", "memory"} <= set(res["limits"])


def test_kserve_downloads_a_storage_uri_to_mnt_models():
    c = container(k8s_manifests(K8sOptions(storage_uri="s3://bucket/allspark/repo"))["inferenceservice"])
    assert c["name"] == "kserve-container"  # the name KServe reads STORAGE_URI from
    assert c["env"] == [{"name": "STORAGE_URI", "value": "s3://bucket/allspark/repo"}]
    assert "--model-repository=/mnt/models" in c["args"]
    assert "env" not in container(k8s_manifests(GPU)["inferenceservice"])


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"name": "AllSpark"}, "name: expected a DNS-1035 label"),
    ({"name": "9lives"}, "starting with a letter"),
    ({"namespace": "a_b"}, "namespace: expected a DNS-1123 label"),
    ({"image": ""}, "image: expected an image reference"),
    ({"image_pull_policy": "Sometimes"}, "IfNotPresent, Always, Never"),
    ({"gpus": -1}, "gpus: expected GPUs per pod >= 0"),
    ({"replicas": 0}, "replicas: expected an integer >= 1"),
    ({"replicas": 5}, "min_replicas <= replicas <= max_replicas, got 1 <= 5 <= 4"),
    ({"min_replicas": 3, "replicas": 3, "max_replicas": 2}, "got 3 <= 3 <= 2"),
    ({"target_queue_time_us": 0}, "target_queue_time_us: expected an integer >= 1"),
    ({"grpc_port": 8000}, "three different ports"),
    ({"metrics_port": 70000}, "metrics_port: expected a port in 1..65535"),
    ({"cpu_request": "4", "cpu_limit": "2"}, "cpu_request: expected at most cpu_limit"),
    ({"memory_request": "lots"}, "memory_request: expected a Kubernetes quantity"),
    ({"memory_limit": "16GB"}, "memory_limit: expected a Kubernetes quantity"),
    ({"cpu_request": "0"}, "cpu_request: expected more than 0"),
    ({"model_repository": "models"}, "model_repository: expected an absolute path"),
    ({"storage_uri": "ftp://host/repo"}, "storage_uri: expected a KServe storage URI"),
])
def test_bad_options_say_what_was_expected(kwargs, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        K8sOptions(**kwargs)


def test_quantities():
    assert quantity("500m", "cpu") == pytest.approx(0.5) and quantity("2", "cpu") == 2
    assert quantity("16Gi", "m") == 16 << 30 and quantity("1e3", "m") == 1000 and quantity("1.5G", "m") == 1.5e9
    assert quantity("2", "cpu") > quantity("1500m", "cpu")


# ---- writing ----------------------------------------------------------------------------------


def test_write_k8s_writes_yaml_that_parses_back_to_the_manifests(tmp_path):
    out = tmp_path / "k8s"
    files = write_k8s(GPU, out)
    assert sorted(p.name for p in files) == sorted(FILES) == sorted(p.name for p in out.iterdir())
    for stem, manifest in k8s_manifests(GPU).items():
        text = (out / f"{stem}.yaml").read_text()
        assert text.startswith("# Generated by `allspark serve --k8s`")
        assert yaml.safe_load(text) == manifest
    kust = yaml.safe_load((out / "kustomization.yaml").read_text())
    assert kust == {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                    "resources": ["deployment.yaml", "service.yaml", "hpa.yaml"]}  # KServe's is the alternative
    hpa = (out / "hpa.yaml").read_text()
    rule = "\n".join(line[4:] for line in hpa.splitlines() if line.startswith("#   "))
    assert yaml.safe_load(rule) == yaml.safe_load(PROMETHEUS_ADAPTER_RULE)  # the adapter rule, as a comment
    write_k8s(CPU, out)  # replaces its own output
    assert yaml.safe_load((out / "deployment.yaml").read_text()) == k8s_manifests(CPU)["deployment"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left


def test_write_k8s_refuses_a_directory_it_did_not_write(tmp_path):
    foreign = tmp_path / "manifests"
    foreign.mkdir()
    (foreign / "deployment.yaml").write_text("precious: true\n")
    with pytest.raises(ConfigError, match="was not written by `allspark serve --k8s`.*no kustomization.yaml"):
        write_k8s(GPU, foreign)
    assert [p.name for p in foreign.iterdir()] == ["deployment.yaml"]
    assert (foreign / "deployment.yaml").read_text() == "precious: true\n"
    ours = tmp_path / "ours"
    write_k8s(GPU, ours)
    (ours / "patch.yaml").write_text("mine: true\n")  # the user's own file would be lost: refused
    with pytest.raises(ConfigError, match="patch.yaml"):
        write_k8s(GPU, ours)
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="expected a directory"):
        write_k8s(GPU, tmp_path / "file")
    (tmp_path / "empty").mkdir()
    write_k8s(GPU, tmp_path / "empty")  # an empty directory is fine


def test_a_failed_write_leaves_nothing_half_written(tmp_path, monkeypatch):
    from allspark.serving import k8s

    dump = k8s._dump

    def failing(stem, manifest):
        if stem == "hpa":  # after deployment and service were written
            raise OSError("disk full")
        return dump(stem, manifest)

    monkeypatch.setattr(k8s, "_dump", failing)
    with pytest.raises(OSError, match="disk full"):
        write_k8s(GPU, tmp_path / "new")
    assert list(tmp_path.iterdir()) == []  # neither the directory nor its temporary sibling
    monkeypatch.setattr(k8s, "_dump", dump)
    write_k8s(GPU, tmp_path / "old")
    before = {p.name: p.read_text() for p in (tmp_path / "old").iterdir()}
    monkeypatch.setattr(k8s, "_dump", failing)
    with pytest.raises(OSError):
        write_k8s(CPU, tmp_path / "old")
    assert {p.name: p.read_text() for p in (tmp_path / "old").iterdir()} == before  # the old output intact
    assert [p.name for p in tmp_path.iterdir()] == ["old"]


# ---- the Dockerfile ---------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, rest = pending.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends in a continuation"
    return out


def test_dockerfile_serves_the_manifests_ports_and_arguments():
    ins = dockerfile()
    first_from = next(i for i, (word, _) in enumerate(ins) if word == "FROM")
    assert {word for word, _ in ins[:first_from]} <= {"ARG"}  # FROM first: only its ARGs before it
    assert [word for word, _ in ins].count("FROM") == 1
    args = dict(a.split("=", 1) for word, a in ins if word == "ARG" and "=" in a)
    assert re.fullmatch(r"\d\d\.\d\d", args["TRITON_TAG"])
    assert ins[first_from][1] == "nvcr.io/nvidia/tritonserver:${TRITON_TAG}-py3"

    exposed = {int(p) for word, a in ins if word == "EXPOSE" for p in a.split()}
    opts, m = K8sOptions(), k8s_manifests(K8sOptions())
    assert exposed == {opts.http_port, opts.grpc_port, opts.metrics_port}
    assert exposed == {p["containerPort"] for p in container(m["deployment"])["ports"]}
    assert exposed == {p["port"] for p in m["service"]["spec"]["ports"]}

    [cmd] = [json.loads(a) for word, a in ins if word == "CMD"]  # exec form
    assert cmd == triton_args(opts) == container(m["deployment"])["args"]
    assert cmd[0] == "tritonserver" and "--model-repository=/models" in cmd
    assert not [word for word, _ in ins if word == "ENTRYPOINT"]  # NGC's entrypoint runs the CMD
    copies = [shlex.split(a) for word, a in ins if word == "COPY"]
    assert ["${REPO}", opts.model_repository] in copies and ["allspark", "./allspark"] in copies


def test_dockerfile_installs_the_package_without_cuda_torch():
    ins = dockerfile()
    runs = [a for word, a in ins if word == "RUN"]
    args = dict(a.split("=", 1) for word, a in ins if word == "ARG" and "=" in a)
    pin = re.search(r'"torch==([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert args["TORCH_VERSION"] == pin and args["TORCH_INDEX"].endswith("/whl/cpu")
    torch_run = next(i for i, r in enumerate(runs) if "torch==${TORCH_VERSION}" in r)
    package_run = next(i for i, r in enumerate(runs) if '".[${EXTRAS}]"' in r)
    assert torch_run < package_run and "--index-url ${TORCH_INDEX}" in runs[torch_run]
    assert "serving" in args["EXTRAS"].split(",")
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", ".git", "**/__pycache__", "build"} <= ignored
    assert not ignored & {"allspark", "pyproject.toml", "README.md", "repo"}  # what the image copies


# ---- the command line -------------------------------------------------------------------------


@pytest.fixture
def fake_repository(monkeypatch):
    """`write_repository` replaced by a stub (a real one needs an exported build: a minute here; the
    slow test below uses one). Records its calls."""
    from allspark.serving import repository

    calls = []

    def write(build, out, options=None):
        calls.append((build, out, options))
        Path(out).mkdir(parents=True)
        return {"models": {"allspark_entry": "entry"}}

    monkeypatch.setattr(repository, "write_repository", write)
    return calls


def _deployment(out: Path) -> dict:
    return yaml.safe_load((out / "deployment.yaml").read_text())


def test_serve_k8s_writes_the_manifests_gpus_following_the_target(fake_repository, tmp_path, capsys):
    from allspark.cli import main

    k8s = tmp_path / "k8s"
    assert main(["serve", "b", "--repo", str(tmp_path / "r"), "--k8s", str(k8s), "--k8s-image",
                 "registry.example/allspark-triton:1", "--k8s-name", "rs", "--replicas", "6"]) == 0
    out = capsys.readouterr().out
    assert f"wrote Kubernetes manifests (image registry.example/allspark-triton:1, GPUs per pod: 1) to {k8s}" in out
    assert "kubectl apply -k" in out and "docker build" in out
    dep = _deployment(k8s)
    assert dep["metadata"]["name"] == "rs" and dep["spec"]["replicas"] == 6
    assert container(dep)["image"] == "registry.example/allspark-triton:1"
    assert container(dep)["resources"]["limits"][GPU_RESOURCE] == "1"  # the default target is gpu
    assert yaml.safe_load((k8s / "hpa.yaml").read_text())["spec"]["maxReplicas"] == 6

    assert main(["serve", "b", "--repo", str(tmp_path / "c"), "--target", "cpu", "--k8s", str(k8s)]) == 0
    assert GPU_RESOURCE not in container(_deployment(k8s))["resources"]["limits"]
    assert main(["serve", "b", "--repo", str(tmp_path / "g"), "--gpus", "0", "1", "--k8s", str(k8s)]) == 0
    assert container(_deployment(k8s))["resources"]["limits"][GPU_RESOURCE] == "2"  # KIND_GPU ids 0 and 1
    assert len(fake_repository) == 3


def test_serve_k8s_refuses_bad_options_before_writing_anything(fake_repository, tmp_path, capsys):
    from allspark.cli import main

    assert main(["serve", "b", "--repo", str(tmp_path / "r"), "--k8s", str(tmp_path / "k"),
                 "--k8s-name", "My_Model"]) == 2
    assert "name: expected a DNS-1035 label" in capsys.readouterr().err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["serve", "b", "--repo", str(tmp_path / "r"), "--k8s", str(foreign)]) == 2
    assert "not written by `allspark serve --k8s` (notes.txt)" in capsys.readouterr().err
    assert main(["serve", "b", "--start", "--k8s", str(tmp_path / "k")]) == 2
    assert "--k8s needs --repo" in capsys.readouterr().err
    assert fake_repository == [] and not (tmp_path / "r").exists() and not (tmp_path / "k").exists()


@pytest.mark.slow
def test_serve_k8s_on_a_real_build(build, tmp_path, capsys):
    """The same with the real `write_repository` (needs the session's exported build: about a minute)."""
    from allspark.cli import main
    from allspark.serving.repository import read_repository

    assert main(["serve", str(build), "--repo", str(tmp_path / "repo"), "--target", "cpu",
                 "--k8s", str(tmp_path / "k8s")]) == 0
    assert "wrote Kubernetes manifests" in capsys.readouterr().out
    assert read_repository(tmp_path / "repo")["options"]["target"] == "cpu"
    assert sorted(p.name for p in (tmp_path / "k8s").iterdir()) == sorted(FILES)
    assert GPU_RESOURCE not in container(_deployment(tmp_path / "k8s"))["resources"]["limits"]
