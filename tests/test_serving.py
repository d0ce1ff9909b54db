"""Triton serving: generated configs against Triton's own schema (both targets), the decoder's
ragged batching, and a real Triton Inference Server (python backend, CPU) started once for the
module from the repository `allspark serve --target cpu` writes: every modality answers as the
in-process runtime over HTTP and gRPC, generation streams the same text, malformed requests get
clear errors without hurting the server, and shutdown leaves no process or shared memory behind."""

from __future__ import annotations

import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from allspark.errors import ConfigError
from allspark.modalities import Modality
from allspark.model.registry import random_inputs
from allspark.runtime import GenerationConfig, Runtime

ALL = [m.value for m in Modality]
GEN_TOKENS = 12
REL_TOL = 1e-5  # regression through the server vs in-process


@pytest.fixture(scope="module")
def rt(build):
    return Runtime.load(build)


@pytest.fixture(scope="module")
def manifest(build):
    return json.loads((Path(build) / "manifest.json").read_text())


@pytest.fixture(scope="module")
def repos(build, tmp_path_factory):
    """The repository for each target; the gpu one with the TensorRT accelerator."""
    from allspark.serving.options import RepositoryOptions, Target, TensorRTOptions
    from allspark.serving.repository import write_repository

    root = tmp_path_factory.mktemp("repos")
    write_repository(build, root / "cpu", RepositoryOptions(target=Target.CPU, layout="components"))
    write_repository(build, root / "cpu_runtime", RepositoryOptions(target=Target.CPU))  # the cpu default
    write_repository(build, root / "gpu", RepositoryOptions(
        target=Target.GPU, tensorrt=TensorRTOptions(enabled=True, fp16=True, engine_cache_dir="/cache/trt")))
    return {"cpu": root / "cpu", "cpu_runtime": root / "cpu_runtime", "gpu": root / "gpu",
            "components": root / "cpu", "runtime": root / "cpu_runtime"}


# ---- configs, without a server ----------------------------------------------------------------


@pytest.mark.parametrize("target", ["cpu", "cpu_runtime", "gpu"])
def test_every_config_parses_into_tritons_model_config(repos, manifest, target):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    repo = repos[target]
    names = sorted(p.name for p in repo.iterdir() if p.is_dir())
    shared = {"allspark_entry", "allspark_stream"}
    if target == "cpu_runtime":  # no component models: ONE process holds every graph, a forwarder none
        assert set(names) == set(manifest["modalities"]) | {"allspark_entry", "allspark_runtime"}
        own = json.loads((repo / "allspark_runtime" / "1" / "manifest.json").read_text())
        assert own["modalities"] == manifest["modalities"] and own["adapter_index"] == manifest["adapter_index"]
        assert all((repo / "allspark_runtime" / "1" / f).is_file() for c in own["components"].values()
                   for a in c["artifacts"].values() for f in a["sha256"])
        assert sorted(f.name for f in (repo / "allspark_entry" / "1").iterdir()) == ["model.py"]  # no weights
        cfg = text_format.Parse((repo / "allspark_runtime" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        # warmed with one valid request per modality, from files Triton reads
        assert [w.name for w in cfg.model_warmup] == manifest["modalities"]
        assert all((repo / "allspark_runtime" / "warmup" / i.input_data_file).is_file()
                   for w in cfg.model_warmup for i in w.inputs.values())
        assert cfg.instance_group[0].count == 1 and cfg.model_transaction_policy.decoupled
        assert cfg.parameters["single_pass_workers"].string_value == "2"  # entry_instances: threads, not copies
        fwd = text_format.Parse((repo / "allspark_entry" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        assert fwd.instance_group[0].count == 2 and fwd.parameters["forward_to"].string_value == "allspark_runtime"
        for m in manifest["modalities"]:
            ens = text_format.Parse((repo / m / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
            want = "allspark_runtime" if m in ("language", "code") else "allspark_entry"
            assert ens.ensemble_scheduling.step[0].model_name == want, m
    else:
        assert set(names) == set(manifest["components"]) | set(manifest["modalities"]) | shared
    types = {v: k for k, v in model_config_pb2.DataType.items()}
    for name in names:
        cfg = text_format.Parse((repo / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        assert cfg.name == name
        if name in manifest["components"]:  # same tensor names, dtypes and dims as the manifest
            comp = manifest["components"][name]
            assert cfg.backend == ("onnxruntime" if target == "gpu" else "python")
            assert (repo / name / "1" / "model.onnx").is_file()
            assert [w.name for w in cfg.model_warmup] == ["zeros"]  # warmed before ready, on every target
            policy = cfg.dynamic_batching.default_queue_policy
            assert policy.allow_timeout_override and policy.timeout_action == policy.REJECT
            for declared, tensors in ((cfg.input, comp["inputs"]), (cfg.output, comp["outputs"])):
                assert [t.name for t in declared] == [t["name"] for t in tensors]
                for t, m in zip(declared, tensors):
                    want = [-1 if isinstance(d, str) else d for d in m["dims"][1:]] or [1]
                    assert list(t.dims) == want, (name, t.name)
                    assert types[t.data_type] == {"float32": "TYPE_FP32", "int64": "TYPE_INT64"}[m["dtype"]]
        elif name in manifest["modalities"]:
            assert cfg.platform == "ensemble" and len(cfg.ensemble_scheduling.step) == 1


def test_gpu_decoder_config(repos, build, tmp_path):
    from allspark.serving.model_config import read_config
    from allspark.serving.options import BatchingOptions, RepositoryOptions, Target
    from allspark.serving.repository import write_repository

    cfg = read_config(repos["gpu"] / "decoder" / "config.pbtxt")
    assert cfg.backend == "onnxruntime" and cfg.max_batch_size == 32
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8, 16, 32]
    assert [g.kind for g in cfg.instance_group] == [cfg.instance_group[0].KIND_GPU]
    (acc,) = cfg.optimization.execution_accelerators.gpu_execution_accelerator
    assert acc.name == "tensorrt"
    assert acc.parameters["precision_mode"] == "FP16" and acc.parameters["trt_engine_cache_path"] == "/cache/trt"
    assert cfg.model_warmup and cfg.input[3].name == "adapter_ids" and list(cfg.input[3].dims) == [1]

    write_repository(build, tmp_path / "plain", RepositoryOptions(
        target=Target.GPU, batching=BatchingOptions(enabled=False), warmup=False))
    plain = read_config(tmp_path / "plain" / "decoder" / "config.pbtxt")
    assert not plain.HasField("dynamic_batching") and not plain.HasField("optimization") and not plain.model_warmup


def test_serve_cli_writes_the_repository_it_is_asked_for(build, tmp_path, capsys):
    from allspark.cli import main
    from allspark.serving.model_config import read_config

    assert main(["serve", str(build), "--repo", str(tmp_path / "r"), "--max-batch-size", "8", "--trt",
                 "--trt-engine-cache", "/cache/trt", "--instances", "2", "--gpus", "0", "1"]) == 0
    assert "ensemble" in capsys.readouterr().out
    cfg = read_config(tmp_path / "r" / "rgb_encoder" / "config.pbtxt")
    assert cfg.max_batch_size == 8 and list(cfg.dynamic_batching.preferred_batch_size) == [4, 8]
    assert cfg.instance_group[0].count == 2 and list(cfg.instance_group[0].gpus) == [0, 1]
    assert cfg.optimization.execution_accelerators.gpu_execution_accelerator[0].name == "tensorrt"
    assert main(["serve", str(build), "--repo", str(tmp_path / "bad"), "--target", "cpu", "--trt"]) == 2
    assert "needs --target gpu" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_options_validate():
    from allspark.serving.options import (
        BatchingOptions,
        RepositoryOptions,
        TensorRTOptions,
    )

    with pytest.raises(ConfigError, match="needs --target gpu"):
        RepositoryOptions(target="cpu", tensorrt=TensorRTOptions(enabled=True))
    with pytest.raises(ConfigError, match="preferred_batch_sizes"):
        BatchingOptions(max_batch_size=8, preferred_batch_sizes=(4, 16))
    with pytest.raises(ValueError):
        RepositoryOptions(target="tpu")


def test_repository_is_replaced_only_when_ours(build, tmp_path):
    from allspark.serving.repository import (
        RepositoryError,
        read_repository,
        write_repository,
    )

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(RepositoryError, match="not an allspark model repository"):
        write_repository(build, foreign)
    assert (foreign / "precious.txt").read_text() == "keep me"
    first = write_repository(build, tmp_path / "repo")
    second = write_repository(build, tmp_path / "repo")  # replaces its own
    assert read_repository(tmp_path / "repo")["written"] == second["written"]
    assert first["models"] == second["models"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_decoder_batching_merges_ragged_requests(rt):
    """Requests of different modalities, prompt lengths and cache lengths in one decoder call give
    what each gives alone (left padding is masked)."""
    from allspark.runtime.runtime import Request, _Timer
    from allspark.serving.batching import merge_ragged, split_ragged

    comp = rt.manifest["components"]["decoder"]
    dims = {t["name"]: t["dims"] for t in comp["inputs"] + comp["outputs"]}
    sess = rt.backend.sessions["decoder"]
    names = [o.name for o in sess.get_outputs()]
    rng = np.random.default_rng(7)
    feeds = []
    for m in ("sar", "language", "table"):
        row = rt._prepare(Request(m, random_inputs(rt.config.modality(m), rng)))
        bridged = rt._encode_and_bridge([row], _Timer(), {})
        prompt = rt._embed([row.prompt_ids])[0]
        feeds.append(rt._left_pad([np.concatenate([bridged[0], prompt]) if bridged else prompt],
                                  [rt.adapter_index[m]]))
    prefill = dict(zip(names, sess.run(None, feeds[2])))
    step = {"inputs_embeds": rt.backend.embed(np.array([[5]])),
            "attention_mask": np.concatenate([feeds[2]["attention_mask"], [[1]]], 1),
            "position_ids": feeds[2]["position_ids"][:, -1:] + 1, "adapter_ids": feeds[2]["adapter_ids"],
            **dict(zip(rt.cache.past, (prefill[n] for n in rt.cache.present)))}
    group = [feeds[0], feeds[1], step]  # two prefills of different lengths + a decode step
    merged, layout = merge_ragged(group, dims)
    assert layout.S == max(f["inputs_embeds"].shape[1] for f in group) and layout.P == step["past_key.0"].shape[2]
    for f, got in zip(group, split_ragged(dict(zip(names, sess.run(None, merged))), layout, dims)):
        alone = dict(zip(names, sess.run(None, f)))
        for n in names:
            assert got[n].shape == alone[n].shape, n
            np.testing.assert_allclose(got[n], alone[n], atol=2e-5, err_msg=n)


# ---- a real server ----------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["runtime", "components"])
def server(repos, request):
    """One Triton server per layout of the CPU target (the tests below run against each). Skips only
    where the server cannot run here at all."""
    from allspark.serving.server import ServerError, TritonServer, triton_home

    try:
        triton_home()
    except (ImportError, ServerError) as e:
        pytest.skip(f"no Triton server on this machine: {e}")
    s = TritonServer(repos[request.param])
    s.layout, s.repo_dir = request.param, repos[request.param]
    s.shm_before = {p.name for p in Path("/dev/shm").iterdir()} if Path("/dev/shm").is_dir() else set()
    try:
        s.start()
    except ServerError as e:
        if "error while loading shared libraries" in str(e) or "cannot execute" in str(e):
            pytest.skip(f"tritonserver cannot run on this machine: {e}")
        raise
    yield s
    s.stop()


@pytest.fixture(scope="module")
def clients(server):
    from allspark.serving.client import ServingClient

    return {"http": ServingClient(server.http_url, "http"), "grpc": ServingClient(server.grpc_url, "grpc")}


@pytest.fixture(scope="module")
def requests_(rt):
    rng = np.random.default_rng(21)
    return {m: [random_inputs(rt.config.modality(m), rng, v) for v in range(2)] for m in ALL}


def assert_same(served, local, what):
    assert served.modality == local.modality, what
    assert served.label == local.label, what
    assert served.text == local.text and served.tokens == local.tokens, what
    if local.scores is not None:
        assert list(served.scores) == list(local.scores), what
        assert max(abs(served.scores[k] - local.scores[k]) for k in local.scores) < 1e-6, what
    if local.values is not None:
        assert served.values.shape == np.shape(local.values), what
        np.testing.assert_allclose(served.values, local.values, rtol=REL_TOL, atol=1e-6, err_msg=what)


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("modality", ALL)
def test_server_answers_as_in_process(clients, rt, requests_, modality, protocol):
    gen = GenerationConfig(max_new_tokens=GEN_TOKENS)
    for v, x in enumerate(requests_[modality]):
        served = clients[protocol].predict(modality, x, max_new_tokens=GEN_TOKENS)
        assert_same(served, rt.predict(modality, x, generation=gen), f"{modality}[{v}] over {protocol}")
    prompt = "describe this input briefly"  # the optional prompt input
    x = requests_[modality][0]
    assert_same(clients[protocol].predict(modality, x, prompt=prompt, max_new_tokens=GEN_TOKENS),
                rt.predict(modality, x, prompt=prompt, generation=gen), f"{modality} with a prompt")


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_streaming_generation_matches_runtime_generate(clients, rt, requests_, protocol):
    x = requests_["code"][1]
    events = list(clients[protocol].stream("code", x, max_new_tokens=GEN_TOKENS))
    want = rt.generate("code", x, config=GenerationConfig(max_new_tokens=GEN_TOKENS))
    *steps, final = events
    assert final.final and not any(e.final for e in steps)
    assert [t for e in steps for t in e.tokens] == want.tokens == final.tokens
    assert len(steps) == len(want.tokens)  # one response per token
    assert final.text == want.text
    assert "".join(e.text for e in steps).strip() == want.text


@pytest.mark.server
def test_concurrent_requests_of_all_modalities(server, rt, requests_):
    """Many modalities at once: Triton batches them (shared entry, shared decoder) and every answer
    still matches its in-process one (labels, tokens; values and scores to mixed-batch precision)."""
    from allspark.serving.client import ServingClient

    jobs = [(m, x) for m in ALL for x in requests_[m]] * 2

    def one(job):
        m, x = job
        with ServingClient(server.grpc_url, "grpc") as c:
            return c.predict(m, x, max_new_tokens=GEN_TOKENS)

    with ThreadPoolExecutor(8) as pool:
        served = list(pool.map(one, jobs))
    gen = GenerationConfig(max_new_tokens=GEN_TOKENS)
    for (m, x), p in zip(jobs, served):
        local = rt.predict(m, x, generation=gen)
        assert p.label == local.label and p.tokens == local.tokens, m
        if local.values is not None:
            np.testing.assert_allclose(p.values, local.values, rtol=1e-4, atol=1e-4, err_msg=m)


def _raw(server, protocol):
    import tritonclient.grpc as tg
    import tritonclient.http as th

    mod = th if protocol == "http" else tg
    return mod, mod.InferenceServerClient(server.http_url if protocol == "http" else server.grpc_url)


def _tensor(mod, name, a, triton):
    t = mod.InferInput(name, list(a.shape), triton)
    t.set_data_from_numpy(a)
    return t


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_malformed_requests_get_clear_errors(server, clients, requests_, rt, protocol):
    from tritonclient.utils import InferenceServerException

    from allspark.serving.client import ServingError

    mod, raw = _raw(server, protocol)
    img = requests_["rgb"][0]["image"][None].astype(np.float32)
    cases = {
        "wrong dtype": ("rgb", [_tensor(mod, "image", img.astype(np.int32), "INT32")], "data-type|datatype|data type"),
        "wrong shape": ("rgb", [_tensor(mod, "image", np.zeros((1, 28, 28, 4), np.float32), "FP32")],
                        "unexpected shape"),
        "missing input": ("rgb", [_tensor(mod, "prompt", np.array([[b"hi"]], dtype=object), "BYTES")],
                          "rgb: input 'image': expected a value, got nothing \\(missing field\\)"),
        "unknown model": ("video", [_tensor(mod, "image", img, "FP32")], "unknown model|not found|unavailable"),
        "too large a batch": ("rgb", [_tensor(mod, "image", np.repeat(img, 33, 0), "FP32")], "batch-size must be <="),
        "NaN": ("hsi", [_tensor(mod, "spectrum", np.full((1, 103), np.nan, np.float32), "FP32")],
                "hsi: input 'spectrum': expected finite values, got NaN"),
        "oversize point cloud": ("point_cloud", [_tensor(mod, "points", np.zeros((1, 100_001, 3), np.float32), "FP32")],
                                 "point_cloud: input 'points': expected shape"),
        "image too small": ("sar", [_tensor(mod, "image", np.ones((1, 4, 4, 2), np.float32), "FP32")],
                            "sar: input 'image': expected shape"),
        "category out of range": ("table", [_tensor(mod, "discrete", np.array([[99, 0, 0]], np.int64), "INT64"),
                                            _tensor(mod, "continuous", np.zeros((1, 9), np.float32), "FP32")],
                                  "table: input 'discrete\\[0\\]': expected a category"),
    }
    for what, (model, inputs, pattern) in cases.items():
        with pytest.raises(InferenceServerException, match=pattern) as err:
            raw.infer(model, inputs)
        if protocol == "http":
            assert str(err.value.status()) in ("400", "404"), (what, err.value.status())
    client = clients[protocol]
    with pytest.raises(ServingError, match="language: input 'text': expected at most 100000 characters"):
        client.predict("language", {"text": "a" * 100_001}, max_new_tokens=2)
    for bad in (0, -3, rt.max_positions + 1):
        with pytest.raises(ServingError, match=rf"max_new_tokens'?: expected 1\.\.{rt.max_positions} \(the build's maximum"):
            client.predict("code", {"text": "def f(): pass"}, max_new_tokens=bad)
    if server.layout == "components":  # component models check what they are sent against the manifest
        with pytest.raises(InferenceServerException, match=r"embed_tokens: input 'input_ids': expected values in \[0, \d+\]"):
            raw.infer("embed_tokens", [_tensor(mod, "input_ids", np.array([[-5, 3]], np.int64), "INT64")])
        dec = rt.manifest["components"]["decoder"]
        feed = [_tensor(mod, "inputs_embeds", np.zeros((1, 1, 64), np.float32), "FP32"),
                _tensor(mod, "attention_mask", np.ones((1, 1), np.int64), "INT64"),
                _tensor(mod, "position_ids", np.zeros((1, 1), np.int64), "INT64"),
                _tensor(mod, "adapter_ids", np.array([[99]], np.int64), "INT64"),
                *(_tensor(mod, n, np.zeros((1, 4, 0, 16), np.float32), "FP32") for n in dec["cache"]["past"])]
        with pytest.raises(InferenceServerException, match=r"decoder: input 'adapter_ids': expected values in \[0, 9\]"):
            raw.infer("decoder", feed)
    else:  # no component is exposed
        with pytest.raises(InferenceServerException, match="unknown model|not found|unavailable"):
            raw.infer("embed_tokens", [_tensor(mod, "input_ids", np.array([[1, 3]], np.int64), "INT64")])
    with pytest.raises(ServingError, match="rgb: input 'image': expected integer values"):
        client._call(lambda: client._client.infer("rgb", [_tensor(mod, "image", img + 0.5, "FP32")],
                                                  parameters={"dtype:image": "uint8"}))
    assert server.is_ready()
    good = requests_["rgb"][0]
    assert client.predict("rgb", good).label == rt.predict("rgb", good).label
    raw.close()


@pytest.mark.server
def test_a_bad_request_does_not_fail_its_batch(server, rt, requests_):
    """Good and bad requests sent together: the dynamic batcher mixes them, only the bad ones fail."""
    from allspark.serving.client import ServingClient, ServingError

    good = requests_["sar"][0]
    bad = {"image": np.full((32, 32, 2), np.inf, np.float32)}
    want = rt.predict("sar", good).label

    def one(i):
        with ServingClient(server.grpc_url, "grpc") as c:
            try:
                return c.predict("sar", bad if i % 2 else good).label
            except ServingError as e:
                return e

    with ThreadPoolExecutor(8) as pool:
        out = list(pool.map(one, range(16)))
    assert all(o == want for o in out[::2])
    assert all(isinstance(o, ServingError) and "finite values" in str(o) for o in out[1::2])
    assert server.is_ready()


@pytest.mark.server
def test_client_cli_prints_what_run_prints(server, build, tmp_path, capsys):
    from PIL import Image

    from allspark.cli import main

    img = np.random.default_rng(4).integers(0, 256, (37, 41, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "scene.png")
    assert main(["run", str(build), "--modality", "rgb", "--input", str(tmp_path / "scene.png")]) == 0
    local = capsys.readouterr().out.splitlines()[0]
    for extra in ([server.http_url], [server.grpc_url, "--grpc"]):
        assert main(["client", *extra[:1], "--modality", "rgb", "--input", str(tmp_path / "scene.png"),
                     *extra[1:]]) == 0
        assert capsys.readouterr().out.splitlines()[0] == local
    assert main(["client", server.http_url, "--modality", "rgb", "--input", str(tmp_path / "scene.png"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["label"] == local.split()[1]


def _layouts(rt) -> list[tuple[str, str, np.ndarray]]:
    """(modality, what, array) for every layout the README allows besides the canonical one."""
    rng = np.random.default_rng(30)
    msi, sar, rgb = (rt.config.modality(m).encoder for m in ("msi", "sar", "rgb"))
    side = msi.image_size + 3
    bands = rng.uniform(0.0, 0.4, (msi.channels, side, side)).astype(np.float32)
    sar_side = sar.image_size + 5
    sar2 = rng.gamma(1.0, 1.0, (sar.channels, sar_side, sar_side)).astype(np.float32)
    hsi = rng.uniform(0, 1, rt.config.modality("hsi").encoder.bands).astype(np.float32)
    return [("msi", "bands first", bands),
            ("sar", "bands first", sar2),
            ("sar", "one band first", sar2[:1]),
            ("sar", "H x W", sar2[0]),
            ("rgb", "bands first uint8", rng.integers(0, 256, (3, rgb.image_size + 4, rgb.image_size + 9), np.uint8)),
            ("rgb", "bands first float", rng.uniform(0, 1, (3, rgb.image_size, rgb.image_size + 2)).astype(np.float32)),
            ("hsi", "1 x 1 x C", hsi.reshape(1, 1, -1)),
            ("hsi", "C x 1 x 1", hsi.reshape(-1, 1, 1))]


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_served_contract_takes_every_layout_run_takes(clients, rt, protocol):
    """One contract: bands-first MSI/RGB/SAR, an H x W SAR and HSI pixels as 1 x 1 x C are
    answered through the real server exactly as in-process (the client puts them in the entry's
    canonical layout, as Runtime.predict does before validating)."""
    for m, what, a in _layouts(rt):
        field = "spectrum" if m == "hsi" else "image"
        local = rt.predict(m, {field: a})
        served = clients[protocol].predict(m, {field: a})
        assert_same(served, local, f"{m} {what} over {protocol}")


@pytest.mark.server
def test_client_cli_takes_the_layouts_run_takes(server, build, rt, tmp_path, capsys):
    """`allspark client` (HTTP and gRPC) on .npy files of every layout prints what `allspark run` prints."""
    from allspark.cli import main

    for i, (m, what, a) in enumerate(_layouts(rt)):
        f = tmp_path / f"{i}.npy"
        np.save(f, a)
        assert main(["run", str(build), "--modality", m, "--input", str(f)]) == 0, what
        local = capsys.readouterr().out.splitlines()[0]
        for extra in ([server.http_url], [server.grpc_url, "--grpc"]):
            assert main(["client", extra[0], "--modality", m, "--input", str(f), *extra[1:]]) == 0, (m, what)
            assert capsys.readouterr().out.splitlines()[0] == local, (m, what, extra)


@pytest.mark.server
def test_runtime_layout_holds_the_weights_once(server, build, manifest):
    """The runtime layout: one process holds the build (allspark_runtime, 1 stub) whatever the
    instance counts; the two forwarder stubs hold no graph (a fraction of the owner's memory)."""
    from allspark.serving.memory_plan import copies
    from allspark.serving.options import RepositoryOptions, Target
    from allspark.serving.supervisor import STUB, live_stubs

    if server.layout != "runtime":
        pytest.skip("components layout: one copy per component instance, by design")
    assert live_stubs(server.shm_prefix) == {"allspark_runtime": 1, "allspark_entry": 2}
    assert copies(manifest, RepositoryOptions(target=Target.CPU, entry_instances=8)) == 1
    pss = {}
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if len(argv) > 2 and argv[0].endswith(STUB.encode()) and server.shm_prefix in argv[2].decode():
                model = Path(argv[1].decode()).parent.parent.name
                kb = [int(x.split()[1]) for x in (proc / "smaps_rollup").read_text().splitlines() if x.startswith("Pss:")][0]
                pss.setdefault(model, []).append(kb)
        except (OSError, IndexError):
            continue
    graphs_mb = sum(f.stat().st_size for f in Path(build).glob("*.onnx*")) / 2**20
    assert max(pss["allspark_entry"]) < min(pss["allspark_runtime"]) / 2, pss
    assert max(pss["allspark_entry"]) / 1024 < 100 + graphs_mb / 2, (pss, graphs_mb)  # no copy of the graphs


def _through(server, model: str, *calls) -> tuple[list, int]:
    """Each call's answer, and how many requests Triton counted on `model` meanwhile (it counts a
    request after its response has left: waited for, then a moment more for any late one)."""
    import tritonclient.http as th

    stats = th.InferenceServerClient(server.http_url)

    def count() -> int:
        return sum(int(s["inference_stats"]["success"]["count"])
                   for s in stats.get_inference_statistics(model)["model_stats"])

    before = count()
    answers = [call() for call in calls]
    deadline = time.monotonic() + 5
    while count() == before and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    return answers, count() - before


@pytest.mark.server
def test_grpc_client_goes_past_the_forwarder_http_through_it(server, clients, requests_):
    """Runtime layout: `ServingClient` over gRPC sends single-pass requests on its kept stream
    straight to `allspark_runtime` (one BLS hop less); HTTP goes through the ensemble and the
    `allspark_entry` forwarder. Triton's per-model counts say which way each went."""
    if server.layout != "runtime":
        pytest.skip("components layout: no forwarder")
    x = requests_["sar"][0]
    (a, b), forwarded = _through(server, "allspark_entry", lambda: clients["grpc"].predict("sar", x),
                                 lambda: clients["http"].predict("sar", x))
    assert forwarded == 1  # the HTTP request, not the gRPC one
    assert a.label == b.label and np.allclose(list(a.scores.values()), list(b.scores.values()), atol=1e-6)


@pytest.mark.server
def test_grpc_generation_goes_past_the_ensemble(server, clients, requests_):
    """Runtime layout: a gRPC generation goes on the kept stream straight to `allspark_runtime`
    (the ensemble step less), HTTP's `generate_stream` through the modality's ensemble; both give
    the same tokens."""
    if server.layout != "runtime":
        pytest.skip("components layout: generation goes through its ensemble")
    x = requests_["code"][0]
    (a, b), ensembled = _through(server, "code", lambda: clients["grpc"].predict("code", x, max_new_tokens=GEN_TOKENS),
                                 lambda: clients["http"].predict("code", x, max_new_tokens=GEN_TOKENS))
    assert ensembled == 1  # the HTTP request, not the gRPC one
    assert a.tokens == b.tokens and a.text == b.text


@pytest.mark.server
def test_components_generation_embeds_each_token_once(server, clients, requests_):
    """Components layout: the BLS backend keeps generated tokens' embeddings (and prompts'), so a
    generation seen before calls `embed_tokens` no more (each stream instance keeps its own: a
    repeat may land on a cold one first)."""
    if server.layout != "components":
        pytest.skip("runtime layout: no embed_tokens model")
    x = requests_["code"][1]
    call = lambda: clients["grpc"].predict("code", x, max_new_tokens=GEN_TOKENS)  # noqa: E731
    (first,), _ = _through(server, "embed_tokens", call)
    calls = []
    for _ in range(4):
        (again,), n = _through(server, "embed_tokens", call)
        assert again.tokens == first.tokens
        calls.append(n)
        if n == 0:
            break
    assert calls[-1] == 0, calls  # before: the prompt alone was kept, each token was a call


@pytest.mark.server
def test_concurrent_token_streams_each_get_their_own_tokens_in_order(server, rt, requests_):
    """Eight streams at once, token by token, sharing decode steps (so their responses may leave
    from the stream model's response queue rather than the scheduler's thread): each stream still
    gets one response per token, in order, with exactly the tokens and text it gets alone."""
    from allspark.serving.client import ServingClient

    jobs = [(m, x) for m in ("code", "language") for x in requests_[m]] * 2

    def one(job):
        m, x = job
        with ServingClient(server.grpc_url, "grpc") as c:
            return list(c.stream(m, x, max_new_tokens=GEN_TOKENS))

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, jobs))
    for (m, x), events in zip(jobs, got):
        want = rt.generate(m, x, config=GenerationConfig(max_new_tokens=GEN_TOKENS))
        *steps, final = events
        assert final.final and not any(e.final for e in steps), m
        assert [t for e in steps for t in e.tokens] == want.tokens == final.tokens, m
        assert "".join(e.text for e in steps).strip() == want.text == final.text, m


@pytest.mark.server
def test_an_idle_kept_stream_is_closed_and_reopened(server, clients, requests_):
    """The gRPC client keeps its stream open between requests and closes it once idle (so a
    server's shutdown does not wait for it); the next request opens a new one."""
    from allspark.serving.client import STREAM_IDLE_S, ServingClient

    x = requests_["code"][0]
    with ServingClient(server.grpc_url, "grpc") as c:
        first = c.predict("code", x, max_new_tokens=GEN_TOKENS)
        assert c._stream_events is not None  # kept
        deadline = time.monotonic() + STREAM_IDLE_S + 5
        while c._stream_events is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c._stream_events is None, "the idle stream was not closed"
        with c._stream_lock:  # the watcher is done closing it
            pass
        assert c.predict("code", x, max_new_tokens=GEN_TOKENS).tokens == first.tokens
        assert c._stream_events is not None


@pytest.mark.server
def test_shutdown_leaves_nothing_behind(server):
    """Last: stop the module's server and check nothing had to be killed or cleaned up."""
    pgid = server.pgid
    stubs = _stubs(server.repo_dir)
    assert len(stubs) >= len([p for p in server.repo_dir.iterdir() if (p / "1" / "model.py").is_file()])
    report = server.stop()
    assert report == {"killed": [], "shm_removed": []}, "the server needed force to stop"
    from allspark.serving.server import group_pids

    assert group_pids(pgid) == [] and _stubs(server.repo_dir) == []
    new_shm = {p.name for p in Path("/dev/shm").iterdir()} - server.shm_before
    assert not [n for n in new_shm if n.startswith(server.shm_prefix)]


def _stubs(repo: Path) -> list[str]:
    r = subprocess.run(["pgrep", "-f", f"triton_python_backend_stub {repo}"], capture_output=True, text=True,
                       check=False)  # pgrep exits 1 when nothing matches
    return r.stdout.split()


@pytest.mark.server
@pytest.mark.slow
def test_server_dies_with_a_killed_allspark_serve(build, tmp_path):
    """SIGKILL of `allspark serve --start` (no handler can run) still stops its tritonserver."""
    import os
    import signal
    import sys
    import time

    from allspark.serving.server import ServerError, triton_home

    try:
        triton_home()
    except (ImportError, ServerError) as e:
        pytest.skip(f"no Triton server on this machine: {e}")
    proc = subprocess.Popen([sys.executable, "-m", "allspark", "serve", str(build), "--start", "--http-port", "0",
                             "--grpc-port", "0", "--metrics-port", "0", "--repo", str(tmp_path / "repo")],
                            stdout=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("ready:"):
                break
        children = subprocess.run(["pgrep", "-P", str(proc.pid), "tritonserver"], capture_output=True,
                                  text=True).stdout.split()
        assert children, "no tritonserver child"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 30
        while time.time() < deadline and any(Path(f"/proc/{c}").exists() for c in children):
            time.sleep(0.2)
        alive = [c for c in children if Path(f"/proc/{c}").exists()
                 and "Z" not in Path(f"/proc/{c}/stat").read_text().split()[2]]
        assert not alive, f"tritonserver {alive} outlived its parent"
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.server
def test_startup_failure_shows_the_log(tmp_path):
    """A model that cannot load: the server exits and the error carries its log tail."""
    from allspark.serving.server import ServerError, TritonServer, triton_home

    try:
        triton_home()
    except (ImportError, ServerError) as e:
        pytest.skip(f"no Triton server on this machine: {e}")
    (tmp_path / "broken" / "1").mkdir(parents=True)
    (tmp_path / "broken" / "config.pbtxt").write_text('name: "broken"\nbackend: "python"\nmax_batch_size: 0\n'
                                                      'input { name: "x" data_type: TYPE_FP32 dims: [1] }\n'
                                                      'output { name: "y" data_type: TYPE_FP32 dims: [1] }\n')
    (tmp_path / "broken" / "1" / "model.py").write_text(
        "class TritonPythonModel:\n    def initialize(self, args):\n        raise RuntimeError('weights are missing')\n")
    server = TritonServer(tmp_path)
    with pytest.raises(ServerError, match="(?s)exited with status.*weights are missing"):
        server.start()
    assert server.process is None


def test_providers_reach_the_python_models_and_only_there(build, tmp_path):
    """`--providers cuda`: the CPU target's python models open their onnxruntime sessions on those
    execution providers (the python backend on a GPU; run by `make gpu-check`)."""
    import json

    from allspark.serving.model_config import read_config
    from allspark.serving.options import RepositoryOptions, Target
    from allspark.serving.repository import write_repository

    write_repository(build, tmp_path / "r", RepositoryOptions(target=Target.CPU, layout="components", providers=("cuda",)))
    comp = read_config(tmp_path / "r" / "decoder" / "config.pbtxt")
    assert json.loads(comp.parameters["providers"].string_value) == ["cuda"]
    entry = read_config(tmp_path / "r" / "allspark_entry" / "config.pbtxt")
    assert json.loads(entry.parameters["providers"].string_value) == ["cuda"]
    with pytest.raises(ConfigError, match="providers"):
        RepositoryOptions(target=Target.GPU, providers=("cuda",))


@pytest.fixture(scope="module")
def fp16_build(ckpt, tmp_path_factory):
    """language and rgb exported in fp16 (the demo's precision)."""
    from allspark.export.build import export_build

    out = tmp_path_factory.mktemp("b16") / "b16"
    export_build(ckpt, out, modalities=["language", "rgb"], precision="fp16", progress=False)
    return out


@pytest.mark.slow
@pytest.mark.server
def test_components_layout_serves_an_fp16_build(fp16_build, tmp_path):
    """An fp16 build: the wire carries float32 (the manifest's dtypes), the component models hand
    their fp16 graphs fp16. Before, every component's warmup failed and the server did not start."""
    from allspark.serving.client import ServingClient
    from allspark.serving.options import RepositoryOptions, Target
    from allspark.serving.repository import write_repository
    from allspark.serving.server import ServerError, TritonServer, triton_home

    try:
        triton_home()
    except (ImportError, ServerError) as e:
        pytest.skip(f"no Triton server on this machine: {e}")
    write_repository(fp16_build, tmp_path / "r", RepositoryOptions(target=Target.CPU, layout="components"))
    rt = Runtime.load(fp16_build, verify=False)
    x = random_inputs(rt.config.modality("rgb"), np.random.default_rng(5))
    gen = GenerationConfig(max_new_tokens=GEN_TOKENS)
    with TritonServer(tmp_path / "r") as server, ServingClient(server.grpc_url, "grpc") as client:
        assert_same(client.predict("rgb", x), rt.predict("rgb", x), "rgb, fp16 build")
        text = {"text": "describe the scene"}
        assert_same(client.predict("language", text, max_new_tokens=GEN_TOKENS),
                    rt.predict("language", text, generation=gen), "language, fp16 build")


@pytest.mark.slow
def test_gpu_repository_of_an_fp16_build_names_each_graphs_dtypes(fp16_build, tmp_path):
    """The GPU target (Triton's own onnxruntime backend, not run here): every component's config and
    what the BLS entries send it name the graph's own dtypes, as that backend checks at load."""
    pytest.importorskip("tritonclient.grpc")
    import onnxruntime as ort

    from allspark.contract.tensors import NUMPY_TO_TRITON, ONNX_TO_NUMPY
    from allspark.serving.model_config import pb, read_config
    from allspark.serving.options import RepositoryOptions, Target
    from allspark.serving.repository import write_repository

    triton_to_numpy = {v: k for k, v in NUMPY_TO_TRITON.items()}
    write_repository(fp16_build, tmp_path / "g", RepositoryOptions(target=Target.GPU))
    entry = json.loads((tmp_path / "g" / "allspark_entry" / "1" / "manifest.json").read_text())
    fp16 = 0
    for name, comp in entry["components"].items():
        sess = ort.InferenceSession(str(tmp_path / "g" / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        graph = {v.name: ONNX_TO_NUMPY[v.type] for v in [*sess.get_inputs(), *sess.get_outputs()]}
        cfg = read_config(tmp_path / "g" / name / "config.pbtxt")
        config = {t.name: triton_to_numpy[pb().DataType.Name(t.data_type)] for t in [*cfg.input, *cfg.output]}
        assert config == graph, name
        assert {t["name"]: t["dtype"] for t in comp["inputs"] + comp["outputs"]} == graph, name
        fp16 += sum(d == "float16" for d in graph.values())
    assert fp16  # an fp16 build: some graph takes or gives fp16


def test_gpu_components_name_their_graphs_own_dtypes(tmp_path):
    """Triton's onnxruntime/TensorRT backends take a graph's tensors in its own dtypes: an fp16
    graph's config (and what the BLS entries send it) says FP16, where the manifest says float32 (the
    host's side of `OrtBackend`'s cast)."""
    import onnx
    from onnx import TensorProto, helper

    from allspark.serving.repository import with_graph_dtypes

    g = helper.make_graph([helper.make_node("Cast", ["hidden"], ["values"], to=TensorProto.FLOAT),
                           helper.make_node("Identity", ["ids"], ["ids_out"])], "g",
                          [helper.make_tensor_value_info("hidden", TensorProto.FLOAT16, ["batch", 4]),
                           helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch"])],
                          [helper.make_tensor_value_info("values", TensorProto.FLOAT, ["batch", 4]),
                           helper.make_tensor_value_info("ids_out", TensorProto.INT64, ["batch"])])
    onnx.save(helper.make_model(g), tmp_path / "rgb_head.onnx")

    def tensors(*pairs):
        return [{"name": n, "dtype": d, "dims": ["batch"]} for n, d in pairs]

    manifest = {"components": {"rgb_head": {
        "inputs": tensors(("hidden", "float32"), ("ids", "int64")),
        "outputs": tensors(("values", "float32"), ("ids_out", "int64")),
        "artifacts": {"onnx": {"file": "rgb_head.onnx", "sha256": {"rgb_head.onnx": "0" * 64}}}}}}
    served = with_graph_dtypes(tmp_path, manifest)["components"]["rgb_head"]
    assert [t["dtype"] for t in served["inputs"]] == ["float16", "int64"]
    assert [t["dtype"] for t in served["outputs"]] == ["float32", "int64"]
    assert manifest["components"]["rgb_head"]["inputs"][0]["dtype"] == "float32"  # the build's is untouched
