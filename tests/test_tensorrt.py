"""TensorRT (issue 16, item 2) without TensorRT: the engine builder's calls checked against a fake
`tensorrt` module (profiles, precision, timing cache, atomic writes, the manifest record), the clear
errors where TensorRT or a GPU is missing, `--trt-plans` configs parsed with Triton's schema, and
ONNX Runtime's TensorRT provider options. No engine is built or run here (`trt` tests on a GPU)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path

import onnx
import pytest
import torch

from allspark.contract.integrity import verify_files
from allspark.contract.manifest import read_manifest
from allspark.errors import AllSparkError, BackendError, ConfigError
from allspark.export.tensorrt_engines import (
    TIMING_CACHE,
    EngineBuildError,
    EngineOptions,
    TensorRTUnavailable,
    build_engines,
    import_tensorrt,
    plan,
)
from allspark.export.trt_profiles import ort_trt_provider_options, profiles


class _Fake:
    """Just enough of the tensorrt API, recording what the builder was asked."""

    def __init__(self, fail_on: str = ""):
        self.calls: list[tuple] = []
        self.fail_on = fail_on
        fake = self

        class Logger:
            WARNING = 2

            def __init__(self, level):
                pass

        class Network:
            def __init__(self):
                self.names: list[str] = []

            @property
            def num_inputs(self):
                return len(self.names)

            def get_input(self, i):
                return types.SimpleNamespace(name=self.names[i])

        class Parser:
            def __init__(self, network, logger):
                self.network, self.num_errors = network, 0

            def parse_from_file(self, path):
                fake.calls.append(("parse", Path(path).name))
                if fake.fail_on and fake.fail_on in path:
                    self.num_errors = 1
                    return False
                self.network.names = [i.name for i in onnx.load(path, load_external_data=False).graph.input]
                return True

            def get_error(self, i):
                return "unsupported node (fake)"

        class Cache:
            def __init__(self, data):
                self.data = data

            def serialize(self):
                return self.data + b"+"

        class Config:
            def __init__(self):
                self.profiles, self.flags = [], []

            def set_memory_pool_limit(self, pool, size):
                fake.calls.append(("workspace", size))

            def set_flag(self, flag):
                self.flags.append(flag)

            def create_timing_cache(self, data):
                fake.calls.append(("timing_in", bytes(data)))
                return Cache(bytes(data))

            def set_timing_cache(self, cache, ignore_mismatch):
                pass

            def add_optimization_profile(self, p):
                self.profiles.append(p)

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, lo, opt, hi):
                self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                fake.calls.append(("build", tuple(network.names), [p.shapes for p in config.profiles], config.flags))
                return b"ENGINE:" + ",".join(network.names).encode()

        self.module = types.SimpleNamespace(
            __version__="10.fake", Logger=Logger, Builder=Builder, OnnxParser=Parser,
            MemoryPoolType=types.SimpleNamespace(WORKSPACE="ws"),
            BuilderFlag=types.SimpleNamespace(FP16="fp16", BF16="bf16"))


@pytest.fixture
def gather_build(build, tmp_path):
    """A copy of the session build whose decoder says it uses gathered adapters (the fake parses
    any graph; the MoE refusal is tested on the real manifest)."""
    out = tmp_path / "b"
    shutil.copytree(build, out)
    m = json.loads((out / "manifest.json").read_text())
    m["components"]["decoder"]["adapters"]["impl"] = "gather"
    (out / "manifest.json").write_text(json.dumps(m, indent=2))
    return out


def _install(monkeypatch, fake: _Fake) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", fake.module)


def test_without_tensorrt_the_error_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails as if not installed
    with pytest.raises(TensorRTUnavailable, match="pip install tensorrt-cu13"):
        import_tensorrt()
    assert issubclass(TensorRTUnavailable, AllSparkError)


def test_moe_decoder_int8_and_bad_options_are_refused_before_building(build):
    m = read_manifest(build)
    with pytest.raises(ConfigError, match="--adapter-impl gather"):
        plan(build, m, EngineOptions())
    with pytest.raises(ConfigError, match="unknown"):
        plan(build, m, EngineOptions(components=("nope",)))
    with pytest.raises(ConfigError, match="precision"):
        EngineOptions(precision="int4")
    with pytest.raises(ConfigError, match="seq_len=1:64:256"):
        plan(build, m, EngineOptions(components=("embed_tokens",), profile_overrides=("seq_len=big",)))
    assert list(plan(build, m, EngineOptions(components=("embed_tokens",)))) == ["embed_tokens"]


def test_engines_are_built_with_the_manifests_profiles_and_recorded(gather_build, monkeypatch):
    fake = _Fake()
    _install(monkeypatch, fake)
    (gather_build / TIMING_CACHE).write_bytes(b"old")
    m = build_engines(gather_build, EngineOptions(precision="bf16", workspace_bytes=1 << 30), progress=False)
    comps = m["components"]
    builds = [c for c in fake.calls if c[0] == "build"]
    assert len(builds) == len(comps)
    for name, c in comps.items():
        e = c["artifacts"]["tensorrt"]
        assert (gather_build / e["file"]).read_bytes().startswith(b"ENGINE:")
        assert e["precision"] == "bf16" and e["tensorrt"] == "10.fake"
        want = profiles(m, name)
        assert [p["name"] for p in e["profiles"]] == [p.name for p in want]
    dec = next(b for b in builds if "past_key.0" in b[1] or any(n.startswith("past") for n in b[1]))
    prefill, decode = dec[2]  # two profiles: prefill (past 0) and decode (seq 1)
    past = next(n for n in prefill if n.startswith("past"))
    assert prefill[past][0][2] == 0 and decode["inputs_embeds"][2][1] == 1
    assert all(b[3] == ["bf16"] for b in builds)
    timing_in = [c[1] for c in fake.calls if c[0] == "timing_in"]
    assert timing_in[0] == b"old" and timing_in[1] == b"old+"  # one cache carried through every engine
    assert (gather_build / TIMING_CACHE).read_bytes().startswith(b"old+")
    verify_files(gather_build, read_manifest(gather_build))  # engines hashed like every other file
    assert not list(gather_build.glob(".trt.tmp-*"))


def test_a_failed_engine_leaves_the_build_as_it_was(gather_build, monkeypatch):
    before = (gather_build / "manifest.json").read_bytes()
    _install(monkeypatch, _Fake(fail_on="decoder"))
    with pytest.raises(EngineBuildError, match="decoder: TensorRT cannot parse .*unsupported node"):
        build_engines(gather_build, progress=False)
    assert (gather_build / "manifest.json").read_bytes() == before
    assert not list(gather_build.glob("*.plan")) and not list(gather_build.glob(".trt.tmp-*"))


def test_trt_plans_repository_parses_with_tritons_schema(gather_build, monkeypatch, tmp_path):
    pytest.importorskip("tritonclient")
    from allspark.serving.model_config import read_config
    from allspark.serving.options import RepositoryOptions, TensorRTOptions
    from allspark.serving.repository import write_repository

    with pytest.raises(Exception, match="tensorrt"):  # no engines yet
        write_repository(gather_build, tmp_path / "r0", RepositoryOptions(target="gpu", artifact="tensorrt"))
    _install(monkeypatch, _Fake())
    build_engines(gather_build, progress=False)
    write_repository(gather_build, tmp_path / "r", RepositoryOptions(target="gpu", artifact="tensorrt"))
    dec = read_config(tmp_path / "r" / "decoder" / "config.pbtxt")
    assert dec.backend == "tensorrt" and list(dec.instance_group[0].profile) == ["0", "1"]
    assert (tmp_path / "r" / "decoder" / "1" / "model.plan").read_bytes().startswith(b"ENGINE:")
    emb = read_config(tmp_path / "r" / "embed_tokens" / "config.pbtxt")
    assert list(emb.instance_group[0].profile) == ["0"]
    with pytest.raises(ConfigError, match="choose one"):
        RepositoryOptions(target="gpu", artifact="tensorrt", tensorrt=TensorRTOptions(enabled=True))
    with pytest.raises(ConfigError, match="--target gpu --layout components"):
        RepositoryOptions(target="cpu", artifact="tensorrt")


def test_tensorrt_backend_needs_tensorrt(build, monkeypatch):
    from allspark.runtime import Runtime

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(TensorRTUnavailable):
        Runtime.load(build, backend="tensorrt", verify=False)


def test_tensorrt_backend_needs_a_gpu(build, monkeypatch):
    from allspark.runtime.tensorrt_backend import TrtBackend

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.setitem(sys.modules, "tensorrt", _Fake().module)
    with pytest.raises(BackendError, match="needs a CUDA GPU"):
        TrtBackend.load(build, read_manifest(build))


def test_ort_tensorrt_provider_options_carry_every_profile(build):
    m = read_manifest(build)
    opts = ort_trt_provider_options(profiles(m, "decoder"), "/cache/trt", fp16=True)
    assert opts["trt_engine_cache_enable"] == "1" and opts["trt_engine_cache_path"] == "/cache/trt"
    assert opts["trt_timing_cache_path"] == "/cache/trt" and opts["trt_fp16_enable"] == "1"
    mins = opts["trt_profile_min_shapes"].split(",")
    assert sum(s.startswith("inputs_embeds:") for s in mins) == 2  # once per profile: prefill, decode
    from allspark.runtime.onnxruntime_backend import _with_trt_options

    got = _with_trt_options(["tensorrt", "cuda"], Path("/b"), m, "decoder", None, True, ())
    assert got[0][0] == "tensorrt" and got[0][1]["trt_engine_cache_path"] == "/b/trt_cache" and got[1] == "cuda"
    assert _with_trt_options(["cuda"], Path("/b"), m, "decoder", None, True, ()) == ["cuda"]
    with pytest.raises(BackendError, match="TensorrtExecutionProvider"):
        from allspark.onnxrt import resolve_providers

        resolve_providers([("tensorrt", {})])  # this onnxruntime (CPU build) has no TensorRT provider


# ---- with TensorRT and a GPU: engines built and run against onnxruntime -------------------------------

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.mark.trt
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRT or not torch.cuda.is_available(), reason="needs TensorRT and a CUDA GPU")
def test_trt_engines_match_onnxruntime(ckpt, tmp_path):
    """Every modality through fp32 engines against the same graphs on onnxruntime."""
    import numpy as np

    from allspark.export.build import export_build
    from allspark.model.registry import random_inputs
    from allspark.runtime import GenerationConfig, Request, Runtime

    b = tmp_path / "b"
    export_build(ckpt, b, adapter_impl="gather", progress=False)
    m = build_engines(b, EngineOptions(precision="fp32"), progress=False)
    assert all("tensorrt" in c["artifacts"] for c in m["components"].values())
    ort, trt = Runtime.load(b), Runtime.load(b, backend="tensorrt")
    rng = np.random.default_rng(0)
    reqs = [Request(x, random_inputs(ort.config.modality(x), rng)) for x in ort.modalities]
    gen = GenerationConfig(max_new_tokens=8, ignore_eos=True)
    for want, got in zip(ort.predict_batch(reqs, gen), trt.predict_batch(reqs, gen)):
        assert got.label == want.label and got.tokens == want.tokens, want.modality
        if want.values is not None:
            np.testing.assert_allclose(got.values, want.values, rtol=1e-3, atol=1e-3)
