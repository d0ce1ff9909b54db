"""Triton `config.pbtxt` for every model of the repository, built as Triton's own `ModelConfig` protobuf.

The schema is the one `tritonclient` ships (`tritonclient.grpc.model_config_pb2`), so a config that
builds here parses in the server; `read_config` parses a written file back, and `check_config`
adds the rules the protobuf cannot express (names unique, batch sizes in range, reshapes scalar).

Tensor names, dtypes and dims come unchanged from the build manifest (components) and the modality
registry (entries). With `max_batch_size > 0` Triton prepends the batch dim itself, so:

    manifest dims [batch, seq_len, 64]   ->  dims: [-1, 64]            (symbolic -> -1)
    manifest dims [batch]                ->  dims: [1] reshape { shape: [] }
    schema field  text                   ->  TYPE_STRING dims: [1]
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..contract.manifest import artifact
from ..contract.tensors import (
    BATCH,
    FIELD_DTYPES,
    NUMPY_TO_TRITON,
    ONNX,
    WARMUP_DIMS,
    artifact_format,
)
from ..errors import ConfigError
from .layouts import ENTRY_MODEL, RUNTIME_MODEL, STREAM_MODEL, Reach, SharedModel
from .options import RepositoryOptions, Target


def pb():
    """Triton's model-config protobuf module, as shipped in tritonclient."""
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise ConfigError("writing Triton configs needs tritonclient: pip install -e '.[serving]'") from None
    return model_config_pb2


def _dims(dims: Sequence[str | int]) -> list[int]:
    return [-1 if isinstance(d, str) else int(d) for d in dims]


def add_tensor(repeated, name: str, dtype: str, dims: Sequence[str | int], *, batched: bool,
               ragged: bool = False, optional: bool = False, reshape: bool = True) -> Any:
    """Append one ModelInput/ModelOutput. `dims` exclude the batch axis when `batched`; an empty
    shape becomes [1] reshaped to a scalar, which is how Triton spells a per-row scalar. Ensembles
    pass tensors on as they came (`reshape=False`); the model behind them does the reshape."""
    if dtype not in NUMPY_TO_TRITON:
        raise ConfigError(f"tensor {name!r}: dtype {dtype!r} has no Triton type ({sorted(NUMPY_TO_TRITON)})")
    t = repeated.add()
    t.name = name
    t.data_type = pb().DataType.Value(NUMPY_TO_TRITON[dtype])
    d = _dims(dims)
    if d:
        t.dims.extend(d)
    else:
        t.dims.append(1)
        if batched and reshape:
            t.reshape.SetInParent()  # shape: [] -- the model sees [batch]
    if ragged and any(x == -1 for x in d):
        t.allow_ragged_batch = True
    if optional:
        t.optional = True
    return t


def _batch_dims(name: str, dims: list) -> list:
    if not dims or dims[0] != BATCH:
        raise ConfigError(f"tensor {name!r}: expected a leading {BATCH!r} dim in the manifest, got {dims}")
    return dims[1:]


def _set_params(cfg, params: dict[str, Any]) -> None:
    for k, v in params.items():
        cfg.parameters[k].string_value = v if isinstance(v, str) else json.dumps(v)


def _batching(cfg, options: RepositoryOptions) -> None:
    b = options.batching
    if b.enabled:
        cfg.dynamic_batching.preferred_batch_size.extend(b.preferred_batch_sizes)
        cfg.dynamic_batching.max_queue_delay_microseconds = b.max_queue_delay_us
        policy = cfg.dynamic_batching.default_queue_policy  # per-request timeouts (Triton's `timeout`)
        policy.timeout_action = pb().ModelQueuePolicy.REJECT
        policy.default_timeout_microseconds = b.queue_timeout_us
        policy.allow_timeout_override = True


# ---- component models -------------------------------------------------------------------------


def component_config(name: str, comp: dict, options: RepositoryOptions) -> Any:
    """One exported component: on the GPU its artifact's own Triton backend (ONNX: onnxruntime), on
    CPU a python model running the ONNX graph on onnxruntime."""
    m = pb()
    cfg = m.ModelConfig(name=name, max_batch_size=options.batching.max_batch_size)
    gpu = options.target == Target.GPU
    fmt = artifact_format(options.artifact if gpu else ONNX.name)
    artifact(comp, fmt.name, name)  # the component must have it
    cfg.backend = fmt.triton_backend if gpu else "python"
    for t in comp["inputs"]:
        # CPU: the python model pads or groups mixed shapes itself, so let the batcher mix them
        add_tensor(cfg.input, t["name"], t["dtype"], _batch_dims(t["name"], t["dims"]), batched=True, ragged=not gpu)
    for t in comp["outputs"]:
        add_tensor(cfg.output, t["name"], t["dtype"], _batch_dims(t["name"], t["dims"]), batched=True)
    _batching(cfg, options)
    group = cfg.instance_group.add(count=options.instances)
    if gpu:
        group.kind = m.ModelInstanceGroup.KIND_GPU
        group.gpus.extend(options.gpus)
        if fmt.name == "tensorrt":  # an engine's optimization profiles: the instance may use each
            profiles = artifact(comp, fmt.name, name).get("profiles", [])
            group.profile.extend(str(i) for i in range(len(profiles)))
        if options.tensorrt.enabled:
            acc = cfg.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
            acc.parameters.update(options.tensorrt.parameters())
    else:
        group.kind = m.ModelInstanceGroup.KIND_CPU
        dims = {t["name"]: t["dims"] for t in comp["inputs"] + comp["outputs"]}  # symbolic, for batching
        _set_params(cfg, {"component": name, "kind": comp["kind"], "onnx_file": fmt.triton_file,
                          "threads": str(options.threads), "dims": dims, "inputs": comp["inputs"],
                          "providers": list(options.providers),
                          "sha256": artifact(comp, ONNX.name, name)["sha256"][artifact(comp, ONNX.name, name)["file"]]})
    if options.warmup:
        _warmup(cfg, comp)
    return cfg


def _warmup(cfg, comp: dict) -> None:
    """One zero-filled request of batch 1 (zeros are valid ids, categories and masks everywhere)."""
    w = cfg.model_warmup.add(name="zeros", batch_size=1)
    for t in comp["inputs"]:
        body = _batch_dims(t["name"], t["dims"])
        dims = [WARMUP_DIMS[d] if isinstance(d, str) else int(d) for d in body] or [1]
        inp = w.inputs[t["name"]]
        inp.data_type = pb().DataType.Value(NUMPY_TO_TRITON[t["dtype"]])
        inp.dims.extend(dims)
        inp.zero_data = True


# ---- entry models -----------------------------------------------------------------------------
#
# Every modality has an entry named after it: an ensemble of one step that renames its request
# fields onto a python model shared by all modalities of its kind (`image` -> `rgb.image`):
#
#   components layout (the pipeline's graph calls are BLS requests to the component models):
#     rgb, msi, ..., table  (ensembles)  ->  allspark_entry   (python, BLS, dynamic batching)
#     language, code        (ensembles)  ->  allspark_stream  (python, BLS, decoupled)
#
#   runtime layout (ONE process holds every graph, whatever the instance counts):
#     rgb, msi, ..., table  (ensembles)  ->  allspark_entry   (python forwarder: no weights, dynamic
#                                                               batching, HTTP/gRPC infer)  -> BLS ->
#     language, code        (ensembles)  ->  allspark_runtime (python, decoupled, 1 instance: the
#                                                               Runtime; single-pass batches on worker
#                                                               threads, streams in its scheduler)
#
# One process imports the runtime (torch, transformers: ~8 s of CPU each; ten entry processes took
# minutes to start on 2 cores) instead of ten, and the shared model's dynamic batcher hands it
# requests that one `Runtime.predict_batch` serves together. The runtime layout's owner is decoupled
# (one response per token), which Triton's HTTP and unary gRPC infer refuse: single-pass requests
# reach it through the forwarder, one BLS hop, so clients keep one request and one response.

# (ENTRY_MODEL, STREAM_MODEL, RUNTIME_MODEL: named in layouts.py, which says which a layout writes)
GENERATED = ("text_output", "tokens", "final")  # outputs of a generation entry (`text` is its input)


def field_tensor(modality: str, name: str) -> str:
    """A modality's field on the shared model: `rgb.image`."""
    return f"{modality}.{name}"


def _head(modality: str):
    """The modality's head kind (registry): what its entry answers and whether it streams."""
    from ..model.registry import spec

    return spec(modality).head


def _fields(modality: str, mc) -> list[tuple[str, str, list[int]]]:
    """(name, numpy dtype, dims) of each request field, from the registry schema; ranges -> -1."""
    from ..model.registry import spec

    return [(f.name, FIELD_DTYPES[f.kind], [d.lo if not d.choices and (d.hi is None or d.hi == d.lo) else -1
                                            for d in f.shape]) for f in spec(modality).schema(mc).fields]


def _answer(modality: str, mc) -> list[tuple[str, str, list[int]]]:
    """(name, numpy dtype, dims) of the answer: label + scores, values, or streamed text."""
    head = _head(modality)
    if head.generates:
        return [(GENERATED[0], "object", [1]), (GENERATED[1], "int64", [-1]), (GENERATED[2], "bool", [1])]
    if head.classifies:
        return [("label", "object", [1]), ("scores", "float32", [len(mc.labels)])]
    return [("values", "float32", list(regression_shape(modality, mc)))]


def _is_stream(modality: str) -> bool:
    return _head(modality).generates


def entry_config(modality: str, manifest: dict, options: RepositoryOptions) -> Any:
    """The ensemble named after `modality`: its fields in, its answer out, through the shared model."""
    from ..model.config import AllSparkConfig

    m = pb()
    mc = AllSparkConfig.from_dict(manifest["config"]).modality(modality)
    stream = _is_stream(modality)
    batched = not stream
    cfg = m.ModelConfig(name=modality, platform="ensemble",
                        max_batch_size=0 if stream else options.batching.max_batch_size)
    step = cfg.ensemble_scheduling.step.add(model_name=behind(modality, options), model_version=-1)
    for name, dtype, dims in _fields(modality, mc):
        # optional here, required by the schema: Triton (2.51) answers an ensemble request that
        # lacks a required input with "unexpected deadlock"; the runtime's schema names the field
        add_tensor(cfg.input, name, dtype, dims, batched=batched, reshape=False, optional=True)
        step.input_map[field_tensor(modality, name)] = name
    extra = [("prompt", "object", [1])] + ([("max_new_tokens", "int64", [1])] if stream else [])
    for name, dtype, dims in extra:
        add_tensor(cfg.input, name, dtype, dims, batched=batched, optional=True)
        step.input_map[name] = name
    for name, dtype, dims in _answer(modality, mc):
        add_tensor(cfg.output, name, dtype, dims, batched=batched)
        step.output_map[field_tensor(modality, name)] = name  # what the step asks for names the modality
    params = {"modality": modality, "head": _head(modality).value, "labels": list(mc.labels),
              "allspark_config": json.dumps(manifest["config"], separators=(",", ":"))}
    _set_params(cfg, params)
    return cfg


def behind(modality: str, options: RepositoryOptions) -> str:
    """The shared model a modality's ensemble steps into (its layout says which)."""
    return options.serving_layout.behind(_is_stream(modality))


def serves(shared: SharedModel, manifest: dict) -> list[str]:
    """The build's modalities a shared model takes, in the manifest's order."""
    mods = list(manifest["modalities"])
    if shared.serves == "all":
        return mods
    return [x for x in mods if _is_stream(x) == (shared.serves == "generation")]


def shared_config(shared: SharedModel, manifest: dict, options: RepositoryOptions) -> Any:
    """The config of one shared python model of the layout (by its kind); None when the build has
    none of the modalities it serves."""
    mods = serves(shared, manifest)
    if not mods:
        return None
    if shared.kind == "runtime":
        return runtime_model_config(manifest, options, mods, shared.reach.value)
    if shared.kind not in ("entry", "stream", "forwarder"):
        raise ConfigError(f"{shared.name}: no config for a shared model of kind {shared.kind!r}")
    cfg = shared_entry_config(manifest, options, shared.kind == "stream", mods, shared.reach.value, shared.name)
    if shared.forward_to:
        _set_params(cfg, {"forward_to": shared.forward_to})
    return cfg


def shared_models(manifest: dict, options: RepositoryOptions) -> list[Any]:
    """The configs of the layout's shared python models (`ServingLayout.shared_models`) that the
    build needs: components -> allspark_entry and/or allspark_stream (each with a Runtime over BLS);
    runtime -> allspark_runtime (the one Runtime) and, when the build has single-pass modalities,
    the allspark_entry forwarder."""
    return [c for _, c in shared_model_configs(manifest, options)]


def shared_model_configs(manifest: dict, options: RepositoryOptions) -> list[tuple[SharedModel, Any]]:
    """(model, config) for each shared python model the layout writes for this build."""
    pairs = [(s, shared_config(s, manifest, options)) for s in options.serving_layout.shared_models(options)]
    return [(s, c) for s, c in pairs if c is not None]


def runtime_model_config(manifest: dict, options: RepositoryOptions, mods: list[str] | None = None,
                         reach: str = Reach.IN_PROCESS.value) -> Any:
    """`allspark_runtime`: its modalities' (default every one's) fields and answers, decoupled, one
    instance; `reach` is its `layout` parameter (`layouts.Reach`). Single-pass
    modalities keep an explicit batch dim (the forwarder sends each request's rows as they came;
    a decoupled model takes no Triton batch dim); the prompt is [rows] for both kinds."""
    from ..model.config import AllSparkConfig

    m = pb()
    config = AllSparkConfig.from_dict(manifest["config"])
    mods = list(manifest["modalities"]) if mods is None else list(mods)
    rows = [x for x in mods if not _is_stream(x)]
    cfg = m.ModelConfig(name=RUNTIME_MODEL, backend="python", max_batch_size=0)
    for mod in mods:
        lead = [-1] if mod in rows else []
        for name, dtype, dims in _fields(mod, config.modality(mod)):
            add_tensor(cfg.input, field_tensor(mod, name), dtype, lead + dims, batched=False, optional=True)
        for name, dtype, dims in _answer(mod, config.modality(mod)):
            add_tensor(cfg.output, field_tensor(mod, name), dtype, lead + dims, batched=False)
    add_tensor(cfg.input, "prompt", "object", [-1], batched=False, optional=True)
    add_tensor(cfg.input, "max_new_tokens", "int64", [1], batched=False, optional=True)
    cfg.model_transaction_policy.decoupled = True
    # one instance, always: the weights are held once; concurrency is threads inside
    cfg.instance_group.add(count=1, kind=m.ModelInstanceGroup.KIND_CPU)
    _set_params(cfg, {"modalities": mods, "batched_modalities": rows, "layout": reach,
                      "threads": str(options.threads), "providers": list(options.providers),
                      "max_request_bytes": str(int(options.max_request_mb * 2**20)),
                      "max_new_tokens": str(options.max_new_tokens),
                      "max_generation_threads": str(options.max_generation_threads),
                      # single-pass batches answered at once (what entry instances were)
                      "single_pass_workers": str(options.entry_instances),
                      "max_batch_rows": str(options.batching.max_batch_size)})
    return cfg


def shared_entry_config(manifest: dict, options: RepositoryOptions, stream: bool, mods: list[str] | None = None,
                        reach: str = Reach.BLS.value, name: str = "") -> Any:
    """`allspark_entry` (every single-pass modality's fields, all optional) or `allspark_stream`
    (decoupled; the generation modalities' fields, one response per token); `mods` defaults to
    every modality of that kind, `reach` is its `layout` parameter (`layouts.Reach`)."""
    from ..model.config import AllSparkConfig

    m = pb()
    config = AllSparkConfig.from_dict(manifest["config"])
    mods = [x for x in manifest["modalities"] if _is_stream(x) == stream] if mods is None else list(mods)
    if not mods:
        return None
    batched = not stream
    cfg = m.ModelConfig(name=name or (STREAM_MODEL if stream else ENTRY_MODEL), backend="python",
                        max_batch_size=0 if stream else options.batching.max_batch_size)
    for mod in mods:
        for name, dtype, dims in _fields(mod, config.modality(mod)):
            add_tensor(cfg.input, field_tensor(mod, name), dtype, dims, batched=batched, ragged=batched, optional=True)
    add_tensor(cfg.input, "prompt", "object", [1], batched=batched, optional=True)
    params: dict[str, Any] = {"modalities": mods, "layout": reach, "threads": str(options.threads),
                              "providers": list(options.providers),
                              "max_request_bytes": str(int(options.max_request_mb * 2**20)),
                              "bls_timeout_us": str(1000 * options.bls_timeout_ms)}
    for mod in mods:
        for name, dtype, dims in _answer(mod, config.modality(mod)):
            add_tensor(cfg.output, field_tensor(mod, name), dtype, dims, batched=batched)
    if stream:
        add_tensor(cfg.input, "max_new_tokens", "int64", [1], batched=False, optional=True)
        cfg.model_transaction_policy.decoupled = True
        params.update(max_new_tokens=str(options.max_new_tokens),
                      max_generation_threads=str(options.max_generation_threads))
    else:
        _batching(cfg, options)
    cfg.instance_group.add(count=options.entry_instances, kind=m.ModelInstanceGroup.KIND_CPU)
    _set_params(cfg, params)
    return cfg


def shared_warmup(cfg, manifest: dict) -> dict[str, bytes]:
    """Triton `model_warmup` for a shared model: one seeded valid request per modality, read from
    `warmup/<modality>.<field>` files (what this returns). A warmup request goes through `execute`
    like a client's, so the python stub's first-request cost is paid before the model is ready --
    measured: the first request after ready took 5-7x the tenth when only the graphs were warmed."""
    import numpy as np

    from ..model.config import AllSparkConfig
    from ..model.registry import random_inputs

    config = AllSparkConfig.from_dict(manifest["config"])
    batched = cfg.max_batch_size > 0
    # allspark_runtime: no Triton batch dim, single-pass rows carry their own (one row here)
    rows = set(json.loads(cfg.parameters["batched_modalities"].string_value)) if "batched_modalities" in cfg.parameters else set()
    files: dict[str, bytes] = {}
    for i, mod in enumerate(json.loads(cfg.parameters["modalities"].string_value)):
        mc = config.modality(mod)
        sample = random_inputs(mc, np.random.default_rng(i))
        w = cfg.model_warmup.add(name=mod, batch_size=1)
        extra = [] if batched or mod in rows else [("max_new_tokens", "int64", np.array([2], np.int64))]
        for name, dtype, _ in _fields(mod, mc):
            a = np.asarray(sample[name])
            if dtype == "float32" and a.dtype.kind in "iu":  # an 8-bit image: send it scaled, as floats in [0, 1]
                a = a / np.iinfo(a.dtype).max
            a = a if dtype == "object" else a.astype(dtype)
            extra.append((field_tensor(mod, name), dtype, a[None] if mod in rows else a))
        for tensor, dtype, a in extra:
            if dtype == "object":  # BYTES: 4-byte little-endian length, then the UTF-8 bytes
                raw = str(a.reshape(-1)[0]).encode("utf-8")
                data, dims = len(raw).to_bytes(4, "little") + raw, [1]
            else:
                data, dims = np.ascontiguousarray(a).tobytes(), list(a.shape) or [1]
            inp = w.inputs[tensor]
            inp.data_type = pb().DataType.Value(NUMPY_TO_TRITON[dtype])
            inp.dims.extend(dims)
            inp.input_data_file = tensor
            files[tensor] = data
    return files


def regression_shape(modality: str, mc) -> tuple[int, ...]:
    """The shape `postprocess` gives a regression head's output, found by running it on one sample."""
    import numpy as np

    from ..model.registry import random_inputs, spec

    s = spec(modality)
    _, ctx = s.preprocess(mc, s.schema(mc).validate(modality, random_inputs(mc, np.random.default_rng(0))))
    return tuple(np.shape(s.postprocess(mc, np.zeros(s.out_dim(mc), np.float32), ctx)))


# ---- text, parsing, checks --------------------------------------------------------------------


def to_text(cfg) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(cfg, use_short_repeated_primitives=True)


def read_config(path: str | Path) -> Any:
    """Parse a config.pbtxt into Triton's ModelConfig; a malformed file raises ConfigError."""
    from google.protobuf import text_format

    try:
        return text_format.Parse(Path(path).read_text(), pb().ModelConfig())
    except text_format.ParseError as e:
        raise ConfigError(f"{path}: not a valid Triton model config: {e}") from None


def check_config(cfg, where: str = "") -> None:
    """Rules beyond the protobuf schema that the server would reject the model for."""
    at = where or cfg.name
    m = pb()
    if not cfg.name or not (cfg.backend or cfg.platform):
        raise ConfigError(f"{at}: a model needs a name and a backend or platform")
    for kind, tensors in (("input", cfg.input), ("output", cfg.output)):
        names = [t.name for t in tensors]
        if len(set(names)) != len(names) or not names:
            raise ConfigError(f"{at}: {kind} names must be present and distinct, got {names}")
        for t in tensors:
            if t.data_type == m.TYPE_INVALID or not t.dims or any(d < -1 or d == 0 for d in t.dims):
                raise ConfigError(f"{at}: {kind} {t.name!r} needs a data type and dims of -1 or > 0, "
                                  f"got {m.DataType.Name(t.data_type)} {list(t.dims)}")
            if t.HasField("reshape") and (list(t.reshape.shape) or list(t.dims) != [1]):
                raise ConfigError(f"{at}: {kind} {t.name!r}: only [1] -> [] reshapes are generated")
    if cfg.HasField("dynamic_batching"):
        if cfg.max_batch_size < 1:
            raise ConfigError(f"{at}: dynamic batching needs max_batch_size >= 1")
        if any(not 1 <= b <= cfg.max_batch_size for b in cfg.dynamic_batching.preferred_batch_size):
            raise ConfigError(f"{at}: preferred batch sizes must lie in 1..{cfg.max_batch_size}")
    if cfg.model_transaction_policy.decoupled and cfg.max_batch_size:
        raise ConfigError(f"{at}: decoupled generation entries take no batch dim (max_batch_size 0)")


def check_repository(configs: dict[str, Any]) -> None:
    """Across configs: every ensemble step names a model of the repository, and each mapped tensor
    exists on both sides with the same data type (what the server checks when it loads them)."""
    for name, cfg in configs.items():
        if cfg.platform != "ensemble":
            continue
        outer = {t.name: t.data_type for t in (*cfg.input, *cfg.output)}
        for step in cfg.ensemble_scheduling.step:
            inner = configs.get(step.model_name)
            if inner is None:
                raise ConfigError(f"{name}: ensemble step names {step.model_name!r}, which is not in the repository")
            ins = {t.name: t.data_type for t in inner.input}
            outs = {t.name: t.data_type for t in inner.output}
            for side, mapping, tensors in (("input", step.input_map, ins), ("output", step.output_map, outs)):
                for inner_name, outer_name in mapping.items():
                    if inner_name not in tensors or outer_name not in outer:
                        raise ConfigError(f"{name}: {side} map {inner_name!r} -> {outer_name!r} names a tensor "
                                          f"missing from {step.model_name!r} or the ensemble")
                    if tensors[inner_name] != outer[outer_name]:
                        raise ConfigError(f"{name}: {inner_name!r} and {outer_name!r} differ in data type")
