"""What loading a build holds, estimated from its manifest before any session opens: each
component's onnxruntime session (`allspark.memory.SESSION_FACTOR` times its graph's bytes). The
static-cache decoder opens only device-resident (CUDA), so a CPU load does not count it.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..contract.tensors import DECODER_COMPONENT, ONNX, STATIC_CACHE
from ..memory import RUNTIME_BASE as BASE
from ..memory import SESSION_FACTOR, Need


def session_bytes(manifest: dict, names: Iterable[str] | None = None, device: bool = False) -> dict[str, int]:
    """Per component (all, or `names`): the bytes its onnxruntime session holds."""
    factor = SESSION_FACTOR.get(manifest.get("precision", "fp32"), 2.2)
    out = {}
    for name, c in manifest["components"].items():
        if names is not None and name not in names:
            continue
        arts = c.get("artifacts", {})
        size = arts.get(ONNX.name, {}).get("bytes", 0)
        if device and name == DECODER_COMPONENT and STATIC_CACHE.name in arts:
            size = arts[STATIC_CACHE.name].get("bytes", size)
        out[name] = int(size * factor)
    return out


def components_for(manifest: dict, modalities: Iterable[str] | None) -> set[str] | None:
    """The components requests of `modalities` go through (None: all)."""
    if modalities is None:
        return None
    from ..contract.tensors import EMBED_COMPONENT

    names = {DECODER_COMPONENT, EMBED_COMPONENT}
    for m in modalities:
        names |= {c for c in manifest.get("routes", {}).get(m, {}).values() if c}
    return names


def runtime_need(manifest: dict, command: str = "loading the build", copies: int = 1,
                 modalities: Iterable[str] | None = None, device: bool = False) -> Need:
    """The peak of `copies` runtimes over the build (a server's instances), each holding every
    component (or those of `modalities`)."""
    per = session_bytes(manifest, components_for(manifest, modalities), device)
    biggest = sorted(per.items(), key=lambda kv: -kv[1])
    parts = [("process", BASE), *biggest[:3]]
    if len(biggest) > 3:
        parts.append((f"{len(biggest) - 3} other components", sum(n for _, n in biggest[3:])))
    total = BASE + copies * sum(per.values())
    if copies > 1:
        parts.append((f"x{copies} copies", 0))
    fits = []
    if manifest.get("precision") in ("fp32", "fp16"):
        raw = sum(c["artifacts"].get(ONNX.name, {}).get("bytes", 0) for c in manifest["components"].values())
        per_param = 4 if manifest["precision"] == "fp32" else 2
        fits.append(("a build exported with `allspark export CKPT --precision int4`",
                     BASE + copies * int(raw / per_param * 0.5625 * SESSION_FACTOR["int4"])))
    if copies > 1:
        fits.append(("one copy (one instance)", BASE + sum(per.values())))
    return Need(command, total, tuple(parts), tuple(fits))


def checkpoint_need(ckpt, modalities: Iterable[str], command: str) -> Need:
    """A checkpoint loaded whole in fp32 (the torch backend, `allspark eval` on a checkpoint): its
    files' bytes scaled to 4 bytes a parameter, +10% for the model's own buffers and the arena."""
    import json
    from pathlib import Path

    ckpt = Path(ckpt)
    man = json.loads((ckpt / "manifest.json").read_text())
    per = {"float16": 2, "bfloat16": 2}.get(man.get("dtype", ""), 4)
    llm = sum(f.stat().st_size for f in (ckpt / "llm").glob("*.safetensors"))
    packs = sum((ckpt / "packs" / f"{m}.safetensors").stat().st_size for m in modalities
                if (ckpt / "packs" / f"{m}.safetensors").is_file())
    size = int((llm + packs) * 4 / per * 1.1)
    return Need(command, BASE + 300_000_000 + size, (("process (torch)", BASE + 300_000_000),
                                                      ("checkpoint in fp32", size)),
                (("a build on onnxruntime: `allspark export CKPT --precision int4`, then the default backend",
                  BASE + int((llm + packs) / per * 0.5625 * SESSION_FACTOR["int4"])),))
