"""Graph skeletons for benchmarks on other machines: an exported graph without its weights, and the
weights made up again (seeded noise of the same shapes and dtypes) where it runs.

A benchmark's timing does not depend on weight values, but a 1.1B-parameter decoder is 4.4 GB and
an exporter may exist only on the machine that made it (the GPU machines' torch cannot export the
decoder; a transfer there carries 64 MiB). The skeleton keeps every node and every small constant
and drops only large floating-point and quantized (uint8/int8) initializers (weights), marked so
`fill` can recreate them: an int4 decoder (MatMulNBits) travels as its graph too.
Never use a filled graph for anything but timing.

A whole build travels the same way (`strip_build` here, `fill_build` there): a base build's graphs
are GBs, its skeleton a few MB. A skeleton build's manifest says so (`skeleton`), and a runtime
refuses it with the command that fills it; a filled build says `synthetic_weights`, and its hashes
are the filled files' (so it loads and serves like any build, for timing only).

    python -m allspark.bench.skeleton strip BUILD SKELETON
    python -m allspark.bench.skeleton fill SKELETON OUT [--seed N]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ..contract.integrity import resolve_inside
from ..contract.manifest import SKELETON_KEY, SYNTHETIC_KEY, validate_manifest
from ..errors import ConfigError
from ..fsutil import atomic_directory, sha256_file

MARK = "allspark:synthetic-weight"
MIN_ELEMENTS = 4096  # smaller tensors are shape constants, norms and biases: kept as they are
_FLOAT_TYPES = {1: np.float32, 10: np.float16}  # onnx.TensorProto.FLOAT, FLOAT16
# UINT8, INT8: quantized weights (MatMulNBits' packed int4 blocks, QMoE's, int8 matrices), refilled
# with random bytes (random int4/int8 values; their float scales are refilled as weights are)
_INT_TYPES = {2: np.uint8, 3: np.int8}


def strip(src: str | Path, dst: str | Path) -> dict:
    """`src`'s graph without its large float initializers, to `dst` (one self-contained file)."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_tensor

    model = onnx.load(str(src), load_external_data=False)
    dropped, kept_bytes = 0, 0
    for init in model.graph.initializer:
        n = int(np.prod(init.dims)) if init.dims else 1
        if (init.data_type in _FLOAT_TYPES or init.data_type in _INT_TYPES) and n >= MIN_ELEMENTS:
            init.ClearField("raw_data")
            init.ClearField("float_data")
            init.ClearField("int32_data")  # where onnx keeps fp16 values not stored raw
            del init.external_data[:]
            init.data_location = onnx.TensorProto.DEFAULT
            init.doc_string = MARK
            dropped += n
        else:
            if init.data_location == onnx.TensorProto.EXTERNAL:  # a small one kept: bring its bytes inline
                load_external_data_for_tensor(init, str(Path(src).parent))
                del init.external_data[:]
                init.data_location = onnx.TensorProto.DEFAULT
            kept_bytes += init.ByteSize()
    onnx.save(model, str(dst))
    return {"dropped_elements": dropped, "kept_bytes": kept_bytes, "bytes": Path(dst).stat().st_size}


def weight_bytes(path: str | Path) -> int:
    """Bytes of a graph's initializers as stored (a skeleton's dropped ones counted at their size):
    what one run of it reads in weights."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    model = onnx.load(str(path), load_external_data=False)
    return sum(int(np.prod(i.dims, dtype=np.int64)) * tensor_dtype_to_np_dtype(i.data_type).itemsize
               for i in model.graph.initializer)


def is_skeleton(path: str | Path) -> bool:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return any(i.doc_string == MARK and i.data_location != onnx.TensorProto.EXTERNAL for i in model.graph.initializer)


POOL = 1 << 22  # noise drawn per dtype, then each weight a rotation of it: drawing 2.3B normals took 40 s


def _noise(rng: np.random.Generator, pools: dict[int, np.ndarray], data_type: int, n: int, scale: float) -> bytes:
    """`n` values of seeded noise of an initializer's type, as bytes."""
    if data_type not in pools:
        if data_type in _INT_TYPES:
            pools[data_type] = rng.integers(0, 256, POOL, dtype=np.uint8).view(_INT_TYPES[data_type])
        else:
            pools[data_type] = (rng.standard_normal(POOL, dtype=np.float32) * scale).astype(_FLOAT_TYPES[data_type])
    pool = pools[data_type]
    start = int(rng.integers(0, POOL))
    return np.resize(np.concatenate([pool[start:], pool[:start]]), n).tobytes()


def fill(src: str | Path, dst: str | Path, seed: int = 0, scale: float = 0.02) -> Path:
    """A runnable graph at `dst` (weights in `dst`.data): every marked initializer becomes seeded
    noise of its shape and dtype."""
    import onnx

    dst = Path(dst)
    model = onnx.load(str(src), load_external_data=False)
    rng = np.random.default_rng(seed)
    data = dst.with_suffix(dst.suffix + ".data")
    offset = 0
    pools: dict[int, np.ndarray] = {}
    with open(data, "wb") as f:
        for init in model.graph.initializer:
            if init.doc_string != MARK:
                continue
            raw = _noise(rng, pools, init.data_type, int(np.prod(init.dims)), scale)
            f.write(raw)
            init.data_location = onnx.TensorProto.EXTERNAL
            del init.external_data[:]
            for k, v in (("location", data.name), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = init.external_data.add()
                entry.key, entry.value = k, v
            offset += len(raw)
            pad = (-offset) % 4096  # aligned, as onnx writes external data for mmap
            f.write(b"\0" * pad)
            offset += pad
    onnx.save(model, str(dst))
    return dst


def _graphs(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Every ONNX artifact of the build (the decoder's static-cache graph too)."""
    return [a for c in manifest["components"].values() for a in c["artifacts"].values()
            if str(a.get("file", "")).endswith(".onnx")]


def _read(build: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((build / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{build}: not a build (manifest.json: {e})") from None
    validate_manifest(manifest, build / "manifest.json")
    return manifest


def _copy_others(src: Path, dst: Path, manifest: dict[str, Any]) -> None:
    """The build's files that are not graphs (tokenizer, validation cases), as they are."""
    for name in manifest["sha256"]:
        path = resolve_inside(src, name)
        if path is None or not path.is_file():
            raise ConfigError(f"{src}: manifest names {name!r}, which is not a file in the build")
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dst / name)


def _check_destination(src: Path, dst: Path) -> None:
    """`dst` is replaced whole: never the source, a folder around or inside it, or something that
    is not a build (a mistyped path must not delete a directory)."""
    s, d = src.resolve(), dst.resolve()
    if d == s or d.is_relative_to(s) or s.is_relative_to(d):
        raise ConfigError(f"{dst}: the output would replace {src} (or a folder around it): choose another path")
    if d.exists() and (not d.is_dir() or (any(d.iterdir()) and not (d / "manifest.json").is_file())):
        raise ConfigError(f"{dst} exists and is not a build: refusing to replace it")


def strip_build(build: str | Path, dst: str | Path) -> dict:
    """`build` without its weights, at `dst` (written atomically): every graph a skeleton, every
    other artifact (TensorRT engines) dropped, the manifest marked `skeleton`."""
    build = Path(build)
    manifest = _read(build)
    _check_destination(build, Path(dst))
    if manifest.get(SKELETON_KEY):
        raise ConfigError(f"{build} is a skeleton already")
    # parity cases and twin graphs cannot hold on seeded weights, and at paper size they are most of a
    # skeleton (a 330 MB twin): dropped (`allspark verify` on a filled build says they are missing)
    parity = [x for c in manifest["components"].values() for x in (c, *c["artifacts"].values())]
    cases = {x["validation"] for x in parity if isinstance(x.get("validation"), str)}
    twins = [t for x in parity if isinstance(t := (x.get("parity") or {}).get("twin_graph"), str)]
    manifest["sha256"] = {f: h for f, h in manifest["sha256"].items()
                          if f not in cases and not any(f == t or f.startswith(t + ".") for t in twins)}
    with atomic_directory(dst) as tmp:
        _copy_others(build, tmp, manifest)
        for c in manifest["components"].values():
            c["artifacts"] = {f: a for f, a in c["artifacts"].items() if str(a.get("file", "")).endswith(".onnx")}
        dropped = 0
        for art in _graphs(manifest):
            src = resolve_inside(build, art["file"])
            if src is None:
                raise ConfigError(f"{build}: a graph outside the build: {art['file']!r}")
            dropped += strip(src, tmp / art["file"])["dropped_elements"]
            art.update(sha256={art["file"]: sha256_file(tmp / art["file"])}, bytes=(tmp / art["file"]).stat().st_size,
                       external_data=False)
        manifest[SKELETON_KEY] = {"dropped_elements": dropped, "from": str(build.resolve()),
                                  "fill": "python -m allspark.bench.skeleton fill SKELETON OUT"}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        size = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
    return {"out": str(dst), "dropped_elements": dropped, "bytes": size}


def is_skeleton_build(build: str | Path) -> bool:
    try:
        return bool(json.loads((Path(build) / "manifest.json").read_text()).get(SKELETON_KEY))
    except (OSError, ValueError):
        return False


def fill_build(skeleton: str | Path, dst: str | Path, seed: int = 0) -> Path:
    """A runnable build at `dst` (written atomically) from a skeleton build: seeded weights in every
    graph, the manifest's hashes the filled files', marked `synthetic_weights` (timing only)."""
    skeleton = Path(skeleton)
    manifest = _read(skeleton)
    if not manifest.get(SKELETON_KEY):
        raise ConfigError(f"{skeleton} is not a skeleton build (`python -m allspark.bench.skeleton strip` makes one)")
    _check_destination(skeleton, Path(dst))
    with atomic_directory(dst) as tmp:
        _copy_others(skeleton, tmp, manifest)
        for i, art in enumerate(_graphs(manifest)):
            src = resolve_inside(skeleton, art["file"])
            if src is None:
                raise ConfigError(f"{skeleton}: a graph outside the build: {art['file']!r}")
            if is_skeleton(src):
                graph = fill(src, tmp / art["file"], seed=seed + i)
                files = [graph, graph.with_suffix(graph.suffix + ".data")]
            else:  # nothing was dropped (a small head): as it is
                files = [Path(shutil.copy2(src, tmp / art["file"]))]
            art.update(sha256={f.relative_to(tmp).as_posix(): sha256_file(f) for f in files},
                       bytes=sum(f.stat().st_size for f in files), external_data=len(files) > 1)
        del manifest[SKELETON_KEY]
        manifest[SYNTHETIC_KEY] = {"seed": seed, "note": "seeded noise (allspark.bench.skeleton): timing only"}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return Path(dst)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="build skeletons: a build's graphs without weights, and back with "
                                 "seeded weights (timing only)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("strip", help="BUILD -> SKELETON (no weights; a few MB)")
    s.add_argument("build")
    s.add_argument("out")
    f = sub.add_parser("fill", help="SKELETON -> a runnable build with seeded weights")
    f.add_argument("skeleton")
    f.add_argument("out")
    f.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.cmd == "strip":
        r = strip_build(a.build, a.out)
        print(f"wrote {r['out']}: {r['bytes'] / 2**20:.1f} MiB, {r['dropped_elements']:,} weights dropped")
    else:
        print(f"wrote {fill_build(a.skeleton, a.out, a.seed)} (synthetic weights: timing only)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
