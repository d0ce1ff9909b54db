"""What `allspark export` will hold at its peak, estimated from the checkpoint's shapes before any
weight is read (the model is built on the meta device: no memory).

    fp32 / fp16 (whole modules)   every pack in the export dtype (loaded up front), then the decoder
                                  (LLM + adapter sets) x 1.3 -- exporter, graph and parity session
                                  (measured 1.18-1.32x, docs/benchmarks/scale.md); a full parity check
                                  of a decoder adds its onnxruntime session (fp32 weights)
    int4 / int8 (streamed)        the largest of: one tensor being quantized (~10 bytes/element),
                                  the fp32 module a parity check materializes (a pack component; the
                                  decoder whole, or its 2-layer twin when the whole would not fit),
                                  the onnxruntime session of a written graph (1.5x its bytes)
plus the process itself (torch, onnx: ~0.6 GB).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..memory import Need, available_bytes
from .quantize import QUANTIZED_PRECISIONS

BASE = 600_000_000  # the exporting process before any weight: torch, onnx, onnxruntime, transformers


class Shapes:
    """Parameter counts of a checkpoint's components, from its skeleton (no weights)."""

    def __init__(self, ckpt: str | Path, modalities: Sequence[str] | None = None):
        from ..model.skeleton import load_skeleton

        model, _ = load_skeleton(ckpt, modalities, verify=False)  # shapes only: the export verifies
        self.stored = next(model.llm.parameters()).element_size()
        n = lambda mod: 0 if mod is None else sum(p.numel() for p in mod.parameters())  # noqa: E731
        self.pack = {m: {"encoder": n(p.encoder), "bridge": n(p.bridge), "head": n(p.head)}
                     for m, p in model.packs.items()}
        self.adapters = n(model.adapters)
        self.embed = n(model.llm.get_input_embeddings())
        self.decoder = n(model.llm) - self.embed + self.adapters
        layers = model.llm.model.layers
        self.layer = n(layers[0])
        self.num_layers = len(layers)
        self.adapter_layer = n(model.adapters[0]) if len(model.adapters) else 0
        self.adapter_layer_ids = tuple(model.config.llm.adapter_layers)
        self.largest_tensor = max(p.numel() for p in model.parameters())
        self.modalities = tuple(model.modalities)

    def twin(self, layers: int = 2) -> int:
        """Parameters of the decoder's reduced-depth twin: its layers, lm_head, norm, their adapters."""
        kept = sum(1 for i in self.adapter_layer_ids if i < layers)
        return self.decoder - self.adapters - self.layer * (self.num_layers - layers) + self.adapter_layer * kept

    def pack_components(self) -> list[int]:
        return [c for p in self.pack.values() for c in p.values() if c]


def export_need(ckpt: str | Path, modalities: Sequence[str] | None, precision: str, parity: str = "auto",
                twin_layers: int = 2, shapes: Shapes | None = None, offer: bool = True, stream: bool = False) -> Need:
    s = shapes or Shapes(ckpt, modalities)
    if precision in QUANTIZED_PRECISIONS or stream:
        per_weight = QUANTIZED_PRECISIONS[precision] / 8 + 4 / 32 if precision in QUANTIZED_PRECISIONS else \
            (2.2 if precision == "fp16" else 4.4)  # a session of fp16 weights holds fp32 copies
        graph = int(s.decoder * per_weight)  # (quantized: packed weights + one fp32 scale per 32)
        full = max(s.decoder * 4, int(graph * 1.5))
        twin = parity == "twin" or (parity == "auto" and full * 1.1 > available_bytes())
        check = (s.twin(twin_layers) if twin else s.decoder) * 4
        parts = {"quantizing the largest tensor": s.largest_tensor * 10,
                 "largest pack component in fp32 (parity)": max(s.pack_components() or [0]) * 4,
                 f"decoder {'twin ' if twin else ''}in fp32 (parity)": check,
                 "onnxruntime session of the decoder": int((graph * twin_layers / s.num_layers if twin else graph) *
                                                           (1.5 if precision in QUANTIZED_PRECISIONS else 1.0))}
        what, peak = max(parts.items(), key=lambda kv: kv[1])
        need = Need("allspark export", BASE + peak, (("process", BASE), (what, peak)))
    else:
        d = 4 if precision == "fp32" else 2
        packs = sum(sum(p.values()) for p in s.pack.values()) + s.adapters
        decoder = int((s.decoder + s.embed) * d * 1.3)
        session = 0  # the full check's session holds fp32 weights (fp16 graphs too: inserted Casts)
        if parity == "full" or (parity == "auto" and s.decoder * 4 * 1.1 <= available_bytes() + s.decoder * d):
            session = s.decoder * 4  # (the torch weights are freed before it opens)
        peak = max(packs * d, decoder, session)
        need = Need("allspark export", BASE + peak,
                    (("process", BASE), (f"packs in {precision}", packs * d), (f"decoder in {precision} x1.3", decoder),
                     *((("decoder parity session", session),) if session else ())))
    if not offer:
        return need
    fits = []
    for alt in ("fp16", "int8", "int4"):
        if alt != precision:
            fits.append((f"--precision {alt}", export_need(ckpt, modalities, alt, parity, twin_layers, s, False,
                                                            stream).bytes))
    if precision not in QUANTIZED_PRECISIONS and not stream:
        fits.append((f"--precision {precision} --stream",
                     export_need(ckpt, modalities, precision, parity, twin_layers, s, False, True).bytes))
        if parity != "twin":
            fits.append((f"--precision {precision} --parity twin",
                         export_need(ckpt, modalities, precision, "twin", twin_layers, s, False).bytes))
    if len(s.modalities) > 1:
        fits.append((f"--modalities {s.modalities[0]} (one at a time)",
                     export_need(ckpt, s.modalities[:1], precision, parity, twin_layers, None, False, stream).bytes))
    return Need(need.command, need.bytes, need.parts, tuple(fits))


def verify_need(build: Path) -> Need:
    """`allspark verify` re-runs one graph at a time: its largest onnxruntime session (a decoder
    checked through its twin: the twin's graph)."""
    from ..contract.manifest import read_manifest
    from ..memory import RUNTIME_BASE, SESSION_FACTOR

    m = read_manifest(build)
    factor = SESSION_FACTOR.get(m.get("precision", "fp32"), 2.2)
    sizes = {}
    for name, c in m["components"].items():
        twin = c.get("parity", {}).get("twin_graph")
        path = build / twin if twin else None
        size = sum(q.stat().st_size for q in (path, Path(f"{path}.data")) if q.is_file()) if path else \
            c["artifacts"].get("onnx", {}).get("bytes", 0)
        sizes[name] = int(size * factor)
    name, peak = max(sizes.items(), key=lambda kv: kv[1]) if sizes else ("nothing", 0)
    return Need("allspark verify", RUNTIME_BASE + peak, (("process", RUNTIME_BASE), (f"{name}'s session", peak)),
                (("--hashes-only", 150_000_000),))  # hashing needs neither onnxruntime nor a session
