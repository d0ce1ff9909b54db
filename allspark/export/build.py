"""`allspark export`: a checkpoint -> a build directory of ONNX graphs plus `manifest.json`.

    BUILD/manifest.json           the contract (`allspark.contract.manifest`): what the runtime,
                                  Triton configs and benchmarks read
    BUILD/<component>.onnx        (+ .onnx.data when a graph needs external data)
    BUILD/decoder_static.onnx     with --static-cache: the decoder over a static KV cache, recorded as
                                  the decoder's `onnx-static-cache` artifact (export/static_cache.py)
    BUILD/validation/<component>.npz   inputs and PyTorch outputs behind the recorded parity
    BUILD/tokenizer/              copied from the checkpoint

The build is written into a temporary sibling directory and renamed into place only when every
component exported, passed the checker and matched PyTorch: a failed or killed export leaves no
(half-written) BUILD, and an existing BUILD is replaced only by a complete one.
"""

from __future__ import annotations

import datetime as _dt
import gc
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from .. import __version__
from ..contract.manifest import FORMAT, SCHEMA_VERSION, write_manifest
from ..contract.tensors import (
    DECODER_COMPONENT,
    ONNX,
    PRECISION_DTYPES,
    STATIC_CACHE,
    Kind,
    dim_ranges,
)
from ..errors import ConfigError
from ..fsutil import atomic_directory, sha256_file
from ..model.adapters import exported_adapters
from ..model.checkpoint import load_checkpoint, load_llm, read_manifest, stored_dtype
from ..model.skeleton import load_skeleton
from ..model.config import Precision
from ..model.model import AllSpark
from .isolate import ISOLATE_BYTES, can_fork, return_free_memory, run_forked
from .onnx_export import ExportError, export_component
from .quantize import QuantConfig
from .stream_build import StreamedExporter
from .specs import ComponentSpec, component_specs, routes
from .static_cache import static_cache_spec
from .twin import (
    DEFAULT_TWIN_LAYERS,
    PARITY_MODES,
    describe,
    needs_twin,
    reduced_depth,
    weight_bytes,
)
from .validate import ParityError, compare, failed_outputs, fp32_reference, reference, save_cases


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import transformers

    return {"allspark": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "transformers": transformers.__version__}


def _quant_config(prec: Precision, options: dict | None, components: list[str]) -> QuantConfig:
    """The build's quantization; the components kept at int8 default to the encoders whose modality
    asks for 8 bits (the registry's `encoder_min_bits`)."""
    from ..model.registry import spec

    options = dict(options or {})
    if "int8_components" not in options:
        options["int8_components"] = tuple(c for c in components if c.endswith("_encoder")
                                           and spec(c.removesuffix("_encoder")).encoder_min_bits > 4)
    unknown = sorted(set(options["int8_components"]) - set(components))
    if unknown:
        raise ConfigError(f"--int8-components: {unknown} are not components of this build (it has: "
                          f"{', '.join(components)})")
    return QuantConfig.for_precision(prec.value, **options)


def export_build(ckpt: str | Path, out: str | Path, modalities: Sequence[str] | None = None,
                 precision: str | None = None, opset: int = 23, fuse: bool = True,
                 progress: bool = True, adapter_impl: str = "moe", isolate: bool | None = None,
                 parity: str = "auto", twin_layers: int = DEFAULT_TWIN_LAYERS, static_cache: bool = False,
                 quant: dict | None = None, stream: bool | None = None) -> dict:
    """Export every component of `ckpt` (or of the given modalities) into directory `out`; the
    decoder computes its adapter sets as `adapter_impl` ("moe": grouped; "gather": per row).
    `isolate`: run each component's exporter in a forked child (None: components of at least
    `ISOLATE_BYTES` of weights, where Linux can fork), so its leftovers never meet the parity check.
    `parity`: "full" checks every graph whole; "twin" checks the decoder through a reduced-depth twin
    of `twin_layers` real layers (twin.py); "auto" uses the twin only where the full check would not
    fit in the memory available. `static_cache`: also the decoder's static-cache graph (the device
    decode loop's; a second copy of the LLM's weights on disk), checked like the decoder.
    `precision` None follows the checkpoint's dtype (fp16/bf16 -> fp16, else fp32); int4/int8 are
    streamed from the checkpoint a tensor at a time (stream_build.py), `quant` their options
    (`QuantConfig`: block_size, accuracy_level, adapters); `stream` streams fp32/fp16 exports too
    (bounded memory: a component's weights are never held but for its parity check; None: only
    int4/int8)."""
    ckpt, out = Path(ckpt), Path(out)
    prec = resolve_precision(precision, ckpt)
    if parity not in PARITY_MODES:
        raise ConfigError(f"parity: expected one of {list(PARITY_MODES)}, got {parity!r}")
    if twin_layers < 1:
        raise ConfigError(f"twin_layers: expected >= 1, got {twin_layers}")
    if quant and not prec.quantized:
        raise ConfigError(f"quantization options apply to --precision int4/int8, not {prec.value}")
    stream = prec.quantized if stream is None else stream
    if prec.quantized and not stream:
        raise ConfigError(f"--precision {prec.value} is always streamed from the checkpoint")
    if stream:
        if prec.quantized and adapter_impl != "moe":
            raise ConfigError(f"--precision {prec.value} quantizes the adapter sets as QMoE: --adapter-impl must be moe")
        model, tensors = load_skeleton(ckpt, list(modalities) if modalities else None)
    else:
        # fp16: the checkpoint's own dtype (an fp16 7B stays 13.5 GB; references are computed in fp32
        # block by block, validate.fp32_reference). The LLM stays on the meta device until the first
        # component that uses it: the packs' components are exported (and their weights freed) first
        model = load_checkpoint(ckpt, list(modalities) if modalities else None,
                                dtype=None if prec == Precision.FP16 else torch.float32, lazy_llm=True)
    specs = component_specs(model)
    if stream:
        q = _quant_config(prec, quant, [s.name for s in specs]) if prec.quantized else None
        streamed = StreamedExporter(model, tensors, prec.value, q, opset, fuse, progress)
    if static_cache:  # last: the decoder's weights are released only after it (_releaser)
        specs.append(static_cache_spec(model))
    with atomic_directory(out) as tmp:
        (tmp / "validation").mkdir()
        components, failures = {}, []
        bar = tqdm(specs, desc="export", unit="component", disable=not progress, leave=False)
        for i, spec in enumerate(bar):
            bar.set_postfix_str(spec.name)
            if stream:
                check = (lambda s: _adapter_parity(s, model)) if spec.name == DECODER_COMPONENT else None
                with exported_adapters(adapter_impl):
                    components[spec.name], ok = streamed.export(spec, tmp, parity, twin_layers, check)
                if spec.name == DECODER_COMPONENT:
                    components[spec.name]["adapters"] = {"impl": adapter_impl, **components[spec.name].get("adapters", {})}
                if not ok:
                    failures.append(f"{spec.name} ({failed_outputs(components[spec.name]['parity'])})")
                continue
            if any(p.is_meta for p in spec.module.parameters()):
                load_llm(model, ckpt)
            # checked in fp32, before an fp16 export casts the module in place
            adapters = ({"impl": adapter_impl, **_adapter_parity(spec, model)} if spec.name == DECODER_COMPONENT
                        else None)
            # weights no later component uses are freed before onnxruntime loads the graph for its
            # parity check, so the torch and onnxruntime copies never coexist (isolate.py says why
            # the exporter must run in a child for that)
            release = _releaser(spec, specs[i + 1:])
            twin = None
            if spec.kind == Kind.DECODER and (parity == "twin" or (
                    parity == "auto" and needs_twin(spec.module, weight_bytes(spec.module)))):
                twin = (model, twin_layers)
            with exported_adapters(adapter_impl):
                components[spec.name], ok = _export_one(spec, tmp, prec, opset, fuse, release, isolate, twin)
            if adapters is not None:
                components[spec.name]["adapters"] = adapters
            if not ok:
                failures.append(f"{spec.name} ({failed_outputs(components[spec.name]['parity'])})")
        if static_cache:
            components[DECODER_COMPONENT]["artifacts"][STATIC_CACHE.name] = _as_artifact(components.pop(specs[-1].name))
        if failures:
            raise ParityError(f"parity against PyTorch failed for: {'; '.join(failures)}")
        if (ckpt / "tokenizer").is_dir():
            shutil.copytree(ckpt / "tokenizer", tmp / "tokenizer")
        others = sorted(p.relative_to(tmp).as_posix() for d in ("tokenizer", "validation") for p in (tmp / d).rglob("*")
                        if p.is_file())
        manifest = {
            "format": FORMAT, "schema_version": SCHEMA_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "precision": prec.value, "opset": opset, "fused_attention": fuse,
            **({"quantization": q.to_json()} if prec.quantized else {}),
            "config": model.config.to_dict(),
            "modalities": list(model.modalities),
            "adapter_index": {m: i for i, m in enumerate(model.modalities)},
            "routes": routes(model, specs),
            "dims": {k: r.to_json() for k, r in _dim_ranges(model, specs).items()},
            "tokenizer": "tokenizer" if (tmp / "tokenizer").is_dir() else None,
            "sha256": {f: sha256_file(tmp / f) for f in others},
            "components": components,
            "provenance": {**_versions(), "checkpoint": str(ckpt.resolve()),
                           "checkpoint_manifest_sha256": sha256_file(ckpt / "manifest.json")},
        }
        write_manifest(tmp, manifest)
    return manifest


def resolve_precision(precision: str | None, ckpt: Path) -> Precision:
    """The export precision: as asked, or the checkpoint's own (fp16 in, fp16 out; bf16 -> fp16, which
    ONNX Runtime's kernels have; fp32 -> fp32)."""
    if precision is None:
        return Precision.FP16 if stored_dtype(read_manifest(ckpt)) != torch.float32 else Precision.FP32
    try:
        return Precision(precision)
    except ValueError:
        raise ConfigError(f"precision: expected one of {[p.value for p in Precision]}, got {precision!r}") from None


def _as_artifact(entry: dict) -> dict:
    """The static-cache graph's component entry as an artifact of the decoder: its file, and what
    `allspark verify` and the runtime need (its own tensors, cache names, parity record)."""
    keep = ("inputs", "outputs", "precision", "export_seconds", "export_process", "validation", "parity")
    return {**entry["artifacts"][ONNX.name], **{k: entry[k] for k in keep},
            "cache": {"past": entry["cache"]["past"], "new": entry["cache"]["present"]}}


def _adapter_parity(spec: ComponentSpec, model: AllSpark) -> dict[str, float]:
    """The PyTorch reference computes adapters grouped by set; check it against the per-row gather
    form on the decoder's validation inputs (mixed adapter sets, left padding): max abs difference."""
    worst = 0.0
    for b, v in ((3, 1), (1, 2)):
        values = spec.example(b, v)
        outs = {}
        for impl in ("grouped", "gather"):
            for a in model.adapters:
                a.impl = impl
            with torch.no_grad(), fp32_reference(spec.module):
                outs[impl] = spec.module(*spec.forward_args(values))[:2]  # logits, last hidden state
        for a in model.adapters:
            a.impl = "grouped"
        mask = values["attention_mask"][:, -outs["grouped"][1].shape[1]:].bool()  # real tokens only
        worst = max(worst, *(float((g - h).abs()[mask].max()) for g, h in zip(outs["grouped"], outs["gather"])))
    return {"torch_grouped_vs_gather_max_abs": worst}


def _dim_ranges(model: AllSpark, specs: list[ComponentSpec]):
    media = [int(s.outputs[0].dims[1]) for s in specs if s.kind == Kind.ENCODER] or [1]
    c = model.config
    return dim_ranges(c.max_prompt_tokens, c.bridge.num_latents, c.llm.max_position_embeddings, max(media))


def _releaser(spec: ComponentSpec, later: Sequence[ComponentSpec]):
    """A function that frees `spec`'s parameters which no `later` spec shares (None if none)."""
    shared = {p.data_ptr() for s in later for p in s.module.parameters()}
    own = [p for p in spec.module.parameters() if p.data_ptr() not in shared]
    if not own:
        return None

    def release() -> None:
        for p in own:
            p.data = torch.empty(0, dtype=p.dtype)  # the module is never called again

    return release


def _export_one(spec: ComponentSpec, tmp: Path, prec: Precision, opset: int, fuse: bool,
                release=None, isolate: bool | None = None,
                twin: tuple[AllSpark, int] | None = None) -> tuple[dict, bool]:
    """Export `spec` into `tmp` and check it; `twin` = (model, layers): check the decoder through its
    reduced-depth twin instead of whole (twin.py)."""
    dtype = getattr(torch, PRECISION_DTYPES[prec.value])
    path = tmp / f"{spec.name}{ONNX.suffix}"
    if isolate is None:
        isolate = weight_bytes(spec.module) >= ISOLATE_BYTES
    isolate = isolate and can_fork()

    def write(s: ComponentSpec, p: Path) -> dict:
        return export_component(s, p, opset=opset, fuse=fuse, dtype=dtype)

    def run(s: ComponentSpec, p: Path) -> dict:
        return run_forked(lambda: write(s, p), s.name, ExportError) if isolate else write(s, p)

    checked, scope = spec, None
    if twin is None:
        cases, how = reference(spec)  # fp32 PyTorch outputs, before any cast
    else:
        model, layers = twin
        with reduced_depth(model, layers) as keep:
            checked = spec.rebuild(model)
            cases, how = reference(checked)
        scope = describe(keep, model.config.llm.num_layers)
    if prec != Precision.FP32:
        spec.module.to(dtype)  # in place: never two copies of the weights
    twin_path = tmp / "validation" / f"{spec.name}.twin{ONNX.suffix}"
    if twin is not None:
        with reduced_depth(model, layers):
            run(checked, twin_path)
    t0 = time.perf_counter()
    facts = run(spec, path)
    export_s = time.perf_counter() - t0
    if release is not None:
        release()
        gc.collect()
        return_free_memory()
    parity = {**compare(checked, twin_path if twin else path, cases, prec.value), "reference": how}
    if scope is not None:
        parity.update(scope=scope, twin_graph=twin_path.relative_to(tmp).as_posix(),
                      tensors={"inputs": [t.to_json() for t in checked.inputs],  # the twin's, for verify
                               "outputs": [t.to_json() for t in checked.outputs]})
    save_cases(tmp / "validation" / f"{spec.name}.npz", cases)
    files = [path.name] + ([path.name + ".data"] if (tmp / (path.name + ".data")).exists() else [])
    entry = {
        "kind": spec.kind.value, "modality": spec.modality,
        "artifacts": {ONNX.name: {"file": path.name, "sha256": {f: sha256_file(tmp / f) for f in files},
                                  "bytes": sum((tmp / f).stat().st_size for f in files), **facts}},
        "inputs": [t.to_json() for t in spec.inputs], "outputs": [t.to_json() for t in spec.outputs],
        "opset": opset, "precision": prec.value, "export_seconds": round(export_s, 2),
        "export_process": "forked child" if isolate else "in process",
        "validation": f"validation/{spec.name}.npz", "parity": parity,
    }
    if spec.cache is not None:
        entry["cache"] = {"past": list(spec.cache.past), "present": list(spec.cache.present)}
    return entry, parity["passed"]
