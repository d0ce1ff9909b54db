"""How a build is split into Triton models: one object per layout, registered by name.

    layout = serving_layout(options.layout)       # RepositoryOptions.layout: "runtime" | "components" | ...
    layout.component_models                       # one Triton model per exported component?
    layout.shared_models(options)                 # the shared python models it writes (SharedModel)
    layout.behind(stream)                         # the shared model a modality's ensemble steps into
    layout.copies(options)                        # processes holding the build's weights (memory preflight)
    layout.validate(options)                      # its own option rules (RepositoryOptions calls it)

A layout says what it writes; `repository.py` writes it and `model_config.py` builds each model's
config, by the model's `kind`. The shared python models find out how to reach the graphs from their
`layout` parameter (`Reach`): in this process, or over BLS to the component models. A third layout
is one subclass of `ServingLayout` passed to `register`: the CLI's `--layout` offers it and
`write_repository` writes it, with no other module changed.

This module imports nothing of `allspark.serving` but what the python-backend stubs load anyway
(`models.bls`, inside `Reach.load`): options, configs and the repository import it, not it them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

from ..errors import ConfigError

ENTRY_MODEL, STREAM_MODEL, RUNTIME_MODEL = "allspark_entry", "allspark_stream", "allspark_runtime"


class Layout(str, Enum):
    """The built-in layouts' names (`serving_layout` knows every registered one).

    COMPONENTS: one model per exported component (encoders, bridges, heads, embed_tokens, ONE
    decoder); the shared entry models call them over BLS, so each can scale and batch on its own
    (and, on the GPU target, run on Triton's onnxruntime/TensorRT backends).
    RUNTIME: one python model (`allspark_runtime`, one instance) holds every graph and runs the
    in-process `Runtime`: no hop per component and one copy of the weights whatever the instance
    counts; single-pass requests reach it through a weightless forwarder (`allspark_entry`).
    """

    COMPONENTS = "components"
    RUNTIME = "runtime"


class Reach(str, Enum):
    """How a shared python model reaches the graphs. The value is the `layout` parameter of its
    config (named after the built-in layout that reaches them so), which `EntryContext.load` reads."""

    IN_PROCESS = "runtime"  # the graphs are in the model's version directory: a Runtime on onnxruntime
    BLS = "components"  # a Runtime whose backend calls the component models over BLS

    def load(self, version, manifest: dict, params: dict[str, str], generation: bool):
        """The `Runtime` a python model serves with (inside Triton's stub). Over BLS, the decoder
        outputs fetched per call follow the kind: generation needs everything (the runtime reads the
        last hidden state of every prefill), a head the hidden state only (not logits nor the cache)."""
        import json

        from ..runtime import Runtime

        if self is Reach.IN_PROCESS:
            return Runtime.load(version, backend="onnxruntime", threads=int(params.get("threads", "0")), spin=False,
                                providers=json.loads(params.get("providers", "[]")) or None,
                                # a large batch must not leave the stub at its peak (demo build: RSS 165 MB
                                # after 48 RGB rows -> 133 MB, baseline 118; stays at 165 without); no
                                # measurable cost at batch 1 (p50 4.10 vs 4.11 ms)
                                shrink_arena=True)
        from ..contract.tensors import DECODER_COMPONENT, LAST_HIDDEN_STATE
        from ..model.tokenizer import RuntimeTokenizer
        from .models.bls import BlsBackend

        decoder = [t["name"] for t in manifest["components"][DECODER_COMPONENT]["outputs"]]
        wanted = decoder if generation else [LAST_HIDDEN_STATE]
        return Runtime(manifest, BlsBackend(manifest, wanted, timeout_us=int(params.get("bls_timeout_us", "0"))),
                       RuntimeTokenizer.load(version / manifest["tokenizer"]), version)


@dataclass(frozen=True)
class SharedModel:
    """One shared python model a layout writes.

    kind: which config `model_config.shared_config` builds -- "entry" (single-pass fields, dynamic
    batching), "stream" (generation fields, decoupled), "runtime" (every field, decoupled, one
    instance), "forwarder" (an entry config that passes each request on to `forward_to`).
    serves: which modalities it takes ("single_pass", "generation" or "all"); a model with none
    in the build is not written.
    reach: how it reaches the graphs, and so what its version directory holds: IN_PROCESS the
    graphs of its modalities (with the manifest and tokenizer), BLS the manifest and tokenizer; a
    forwarder nothing but its shim.
    module / what / role: the class its shim imports, the shim's docstring, its role in the marker.
    warmup: one seeded request per modality (`model_config.shared_warmup`) before it is ready.
    """

    name: str
    kind: str
    serves: str
    reach: Reach
    module: str
    what: str
    role: str
    warmup: bool = False
    forward_to: str = ""

    @property
    def holds(self) -> str:
        """"nothing" | "manifest" | "graphs": what `write_repository` puts next to its shim."""
        if self.kind == "forwarder":
            return "nothing"
        return "graphs" if self.reach is Reach.IN_PROCESS else "manifest"


def entry_model(reach: Reach) -> SharedModel:
    return SharedModel(ENTRY_MODEL, "entry", "single_pass", reach, "allspark.serving.models.entry",
                       "Every single-pass modality, through its components (BLS).", "entry")


def stream_model(reach: Reach) -> SharedModel:
    return SharedModel(STREAM_MODEL, "stream", "generation", reach, "allspark.serving.models.stream",
                       "Every generation modality, streaming tokens (decoupled).", "stream")


def runtime_model(serves: str, warmup: bool) -> SharedModel:
    return SharedModel(RUNTIME_MODEL, "runtime", serves, Reach.IN_PROCESS, "allspark.serving.models.runtime_model",
                       "The whole build in one process: single-pass batches and token streams (decoupled).",
                       "runtime", warmup=warmup)


def forwarder_model(to: str) -> SharedModel:
    return SharedModel(ENTRY_MODEL, "forwarder", "single_pass", Reach.IN_PROCESS, "allspark.serving.models.forward",
                       f"Single-pass requests, forwarded to {to} (BLS).", "forwarder", forward_to=to)


ARTIFACT_NEEDS_COMPONENTS = ("artifact {!r}: served by Triton's own backend on the GPU: "
                             "use --target gpu --layout components")


class ServingLayout:
    """A layout: which models the repository holds and how a request reaches the graphs."""

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""  # one clause of `--layout`'s help
    component_models: ClassVar[bool] = False  # one Triton model per exported component (Triton's backends)

    def shared_models(self, options) -> list[SharedModel]:
        """The shared python models, in the order they are written."""
        raise NotImplementedError

    def behind(self, stream: bool) -> str:
        """The shared model a modality's ensemble steps into (`stream`: a generation modality)."""
        raise NotImplementedError

    def copies(self, options) -> int:
        """How many processes hold the build's weights (the memory preflight's multiplier)."""
        return options.instances if self.component_models else 1

    def validate(self, options) -> None:
        """Option rules of this layout (raise ConfigError, saying what to fix). Without component
        models there is nothing for Triton's own backends to run: no accelerator, ONNX only."""
        if self.component_models:
            return
        if options.tensorrt.enabled:
            raise ConfigError("tensorrt: the TensorRT accelerator runs component models: use --layout components")
        if options.artifact != "onnx":
            raise ConfigError(ARTIFACT_NEEDS_COMPONENTS.format(options.artifact))

    def watched(self, modality_entry: str) -> tuple[str, ...]:
        """The models whose batch statistics `allspark bench serve` reads for a modality."""
        return (modality_entry, "decoder") if self.component_models else (modality_entry,)


class ComponentsLayout(ServingLayout):
    name = Layout.COMPONENTS.value
    help = ("components: one model per component, called over BLS (each scales and batches on its own; "
            "TensorRT)")
    component_models = True

    def shared_models(self, options) -> list[SharedModel]:
        return [entry_model(Reach.BLS), stream_model(Reach.BLS)]  # (components: Triton warms the component models)

    def behind(self, stream: bool) -> str:
        return STREAM_MODEL if stream else ENTRY_MODEL


class RuntimeLayout(ServingLayout):
    name = Layout.RUNTIME.value
    help = ("runtime: one process holds every graph, one copy of the weights whatever the instance counts "
            "(no hop per component)")

    def shared_models(self, options) -> list[SharedModel]:
        return [runtime_model("all", options.warmup), forwarder_model(RUNTIME_MODEL)]

    def behind(self, stream: bool) -> str:
        return RUNTIME_MODEL if stream else ENTRY_MODEL


LAYOUTS: dict[str, ServingLayout] = {}


def register(layout: type[ServingLayout] | ServingLayout) -> ServingLayout:
    """Add a layout (a class or an instance) under its `name`; returns what it was given, so it
    decorates a class."""
    obj = layout() if isinstance(layout, type) else layout
    if not obj.name:
        raise ConfigError(f"{type(obj).__name__}: a serving layout needs a name")
    LAYOUTS[obj.name] = obj
    return layout


def unregister(name: str) -> None:
    if name in (x.value for x in Layout):
        raise ConfigError(f"layout {name!r} is built in")
    LAYOUTS.pop(name, None)


register(ComponentsLayout)
register(RuntimeLayout)


def serving_layout(name: str | Layout) -> ServingLayout:
    """The registered layout called `name`."""
    key = name.value if isinstance(name, Layout) else str(name)
    if key not in LAYOUTS:
        raise ConfigError(f"layout {key!r}: not one of {sorted(LAYOUTS)}")
    return LAYOUTS[key]


def default_layout(target: Any) -> str:
    """RUNTIME on the CPU target (measured faster), COMPONENTS on the GPU."""
    return (Layout.RUNTIME if getattr(target, "value", target) == "cpu" else Layout.COMPONENTS).value
