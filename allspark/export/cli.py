"""`allspark export` and `allspark verify`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..commands import Command, at_least
from ..contract.tensors import STATIC_CACHE
from ..errors import ConfigError


def _export_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("ckpt")
    s.add_argument("--out", required=True, help="build directory (written atomically)")
    s.add_argument("--modalities", nargs="*")
    s.add_argument("--precision", choices=("fp32", "fp16", "int8", "int4"), default=None,
                   help="default: the checkpoint's dtype (fp16/bf16 -> fp16, fp32 -> fp32); int4/int8: weight-only "
                        "block-wise quantization (MatMulNBits, adapter sets QMoE), streamed from the checkpoint a "
                        "tensor at a time, activations fp32")
    s.add_argument("--stream", action="store_true",
                   help="fp32/fp16 too: trace each graph on fake weights and write its weights from the checkpoint a "
                        "tensor at a time (a component's weights are held only for its parity check; always on for "
                        "int4/int8)")
    q = s.add_argument_group("int4 / int8")
    q.add_argument("--block-size", type=at_least(16), default=32, help="weights per quantization block along K "
                   "(a power of two)")
    q.add_argument("--accuracy-level", type=int, default=4, choices=(0, 1, 2, 3, 4),
                   help="MatMulNBits' accuracy_level: 4 lets CPU kernels compute with int8 activations (fast), "
                        "0/1 in fp32 on the dequantized weights")
    q.add_argument("--int8-components", nargs="*", default=None, metavar="COMPONENT",
                   help="components an int4 build keeps at 8 bits (default: point_cloud_encoder, whose answers int4 "
                        "noise moves; the flag with no names keeps none)")
    q.add_argument("--adapter-weights", choices=("quantized", "float"), default="quantized",
                   help="quantized: adapter sets as QMoE; float: MoE with fp32 weights (for comparison)")
    s.add_argument("--opset", type=at_least(18), default=23, help=">= 23 for the fused standard Attention op")
    s.add_argument("--no-fuse", action="store_true", help="plain MatMul/Softmax attention, for comparison")
    s.add_argument("--adapter-impl", choices=("moe", "gather"), default="moe",
                   help="moe: adapters grouped by set (com.microsoft.MoE); gather: per-row weights, for comparison")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("--overwrite", action="store_true", help="replace an existing build at --out")
    s.add_argument("--isolate", choices=("auto", "always", "never"), default="auto",
                   help="run each component's exporter in a forked child, so what it leaves in memory is gone "
                        "before the parity check (auto: components of 256 MB of weights and more)")
    s.add_argument("--parity", choices=("auto", "full", "twin"), default="auto",
                   help="full: every graph checked whole; twin: the decoder through a reduced-depth twin sharing "
                        "its first layers; auto: the twin only where the full check would not fit in memory")
    s.add_argument("--twin-layers", type=at_least(1), default=2, help="decoder layers of the twin")
    s.add_argument("--static-cache", action="store_true",
                   help="also the decoder over a static KV cache (the device decode loop's graph; the LLM's weights "
                        "twice on disk)")
    g = s.add_argument_group("TensorRT engines after the export (a CUDA machine with TensorRT)")
    g.add_argument("--trt", action="store_true", help="also build one TensorRT engine per component")
    _engine_arguments(g)


def _engine_arguments(g) -> None:
    g.add_argument("--trt-precision", choices=("fp32", "fp16", "bf16"), default="fp16")
    g.add_argument("--trt-workspace", type=at_least(1 << 20), default=8 << 30, metavar="BYTES")
    g.add_argument("--profile", action="append", default=[], metavar="DIM=MIN:OPT:MAX",
                   help="override a dim's range in the engines' optimization profiles (repeatable)")
    g.add_argument("--timing-cache", metavar="FILE", help="TensorRT timing cache (default: in the build)")


def _engine_options(args: argparse.Namespace, components: tuple[str, ...] = ()):
    from .tensorrt_engines import EngineOptions

    return EngineOptions(precision=args.trt_precision, workspace_bytes=args.trt_workspace,
                         profile_overrides=tuple(args.profile), components=components, timing_cache=args.timing_cache)


def _print_engines(m: dict) -> None:
    for name, c in m["components"].items():
        e = c["artifacts"].get("tensorrt")
        if e:
            print(f"{name:<22}{e['bytes'] / 1e6:>8.2f} MB  {e['precision']}  profiles "
                  f"{[p['name'] for p in e['profiles']]}  {e['build_seconds']} s")


def check_export_arguments(args: argparse.Namespace) -> bool:
    """Every mistake in the arguments, before torch is imported (< 1 s): the checkpoint, its
    modalities, --out. Returns whether an existing build will be replaced."""
    from ..contract.checkpoint import check_modalities_in, is_build, read_checkpoint_manifest
    from ..fsutil import check_output_directory
    from ..model.cli import check_modalities

    manifest = read_checkpoint_manifest(args.ckpt)
    check_modalities_in(args.ckpt, manifest, check_modalities(args.modalities))
    if Path(args.out).resolve() == Path(args.ckpt).resolve():
        raise ConfigError(f"--out {args.out} is the checkpoint itself; choose another directory for the build")
    return check_output_directory(args.out, args.overwrite, is_build, "build")


def cmd_export(args: argparse.Namespace) -> int:
    replaced = check_export_arguments(args)
    from .build import export_build

    engines = _engine_options(args) if args.trt else None  # bad engine options fail before the export
    if engines is not None and args.adapter_impl == "moe":
        raise ConfigError("--trt: TensorRT's ONNX parser lacks com.microsoft.MoE; add --adapter-impl gather")
    from ..memory import check
    from .build import resolve_precision
    from .memory_plan import export_need

    precision = resolve_precision(args.precision, Path(args.ckpt)).value
    check(export_need(args.ckpt, args.modalities, precision, args.parity, args.twin_layers, stream=args.stream))
    quant = None
    if precision in ("int4", "int8"):
        quant = {"block_size": args.block_size, "accuracy_level": args.accuracy_level,
                 "adapters": args.adapter_weights == "quantized",
                 **({"int8_components": tuple(args.int8_components)} if args.int8_components is not None else {})}
    t0 = time.perf_counter()
    m = export_build(args.ckpt, args.out, modalities=args.modalities, precision=precision, quant=quant,
                     opset=args.opset, fuse=not args.no_fuse, progress=not args.quiet, adapter_impl=args.adapter_impl,
                     isolate={"auto": None, "always": True, "never": False}[args.isolate], parity=args.parity,
                     twin_layers=args.twin_layers, static_cache=args.static_cache,
                     stream=True if args.stream or precision in ("int4", "int8") else None)
    comps = m["components"]
    print(f"exported {len(comps)} graphs to {args.out} in {time.perf_counter() - t0:.1f}s "
          f"({m['precision']}, opset {m['opset']}, {'fused' if m['fused_attention'] else 'unfused'} attention, "
          f"adapters {m['components']['decoder']['adapters']['impl']})"
          + ("; replaced the build that was there" if replaced else ""))
    print(f"{'component':<22}{'MB':>8}{'export s':>10}{'max abs err':>14}  attention ops")
    for name, c in comps.items():
        onnx = c["artifacts"]["onnx"]
        err = max(o["max_abs"] for o in c["parity"]["outputs"].values())
        kept = f"  kept {c['precision']}" if c["precision"] != m["precision"] else ""  # e.g. int8 in an int4 build
        print(f"{name:<22}{onnx['bytes'] / 1e6:>8.2f}{c['export_seconds']:>10.1f}{err:>14.2e}  "
              f"{onnx.get('attention_ops', {})}{kept}")
        static = c["artifacts"].get(STATIC_CACHE.name)
        if static:
            err = max(o["max_abs"] for o in static["parity"]["outputs"].values())
            print(f"{'  static cache':<22}{static['bytes'] / 1e6:>8.2f}{static['export_seconds']:>10.1f}{err:>14.2e}  "
                  f"{static.get('attention_ops', {})}")
    if engines is not None:
        from .tensorrt_engines import build_engines

        _print_engines(build_engines(args.out, engines, progress=not args.quiet))
    return 0


def _trt_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("build")
    s.add_argument("--components", nargs="*", default=[], help="default: every component")
    _engine_arguments(s)
    s.add_argument("--dry-run", action="store_true", help="check the build and print the profiles; build nothing")
    s.add_argument("--quiet", action="store_true")


def cmd_trt_engines(args: argparse.Namespace) -> int:

    from ..contract.manifest import read_manifest
    from .tensorrt_engines import build_engines, plan

    options = _engine_options(args, tuple(args.components))
    if args.dry_run:
        for name, profs in plan(Path(args.build), read_manifest(Path(args.build)), options).items():
            print(f"{name:<22} profiles {[p.name for p in profs]}")
        return 0
    _print_engines(build_engines(args.build, options, progress=not args.quiet))
    return 0


def _verify_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("build")
    s.add_argument("--hashes-only", action="store_true")


def cmd_verify(args: argparse.Namespace) -> int:
    import sys

    from .verify import verify_report

    if not args.hashes_only:
        from ..memory import check
        from .memory_plan import verify_need

        check(verify_need(Path(args.build)))
    reports = verify_report(args.build, parity=not args.hashes_only)
    for r in reports:
        if r.ok:
            print(f"ok    {r.name:<22} {'; '.join(r.checked)}")
        for p in r.problems:
            print(f"FAIL  {r.name:<22} {p}")
            print(f"FAIL  {r.name}: {p}", file=sys.stderr)
    failed = [r.name for r in reports if not r.ok]
    if failed:
        print(f"{len(failed)} of {len(reports)} checked parts failed verification: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"build is intact: {len(reports)} parts checked")
    return 0


def _profiles_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("build")
    s.add_argument("--profile", action="append", default=[], metavar="DIM=MIN:OPT:MAX",
                   help="override a dim's range, e.g. seq_len=1:64:128 (repeatable)")
    s.add_argument("--json", help="also write {component: [profile, ...]} here")


def cmd_profiles(args: argparse.Namespace) -> int:
    import json

    from ..contract.manifest import read_manifest
    from .trt_profiles import parse_overrides, profiles

    m = read_manifest(Path(args.build))
    overrides = parse_overrides(args.profile)
    out = {c: profiles(m, c, overrides) for c in m["components"]}
    for c, ps in out.items():
        for p in ps:
            print(f"{c:<22} {p.name:<8} " + "  ".join(f"{n} {'x'.join(map(str, s[0]))}..{'x'.join(map(str, s[2]))}"
                                                      for n, s in p.shapes.items() if s[0] != s[2]))
    if args.json:
        Path(args.json).write_text(json.dumps({c: [{"name": p.name, "shapes": p.shapes} for p in ps]
                                               for c, ps in out.items()}, indent=1) + "\n")
    return 0


COMMANDS = (
    Command("export", "export a checkpoint's components to ONNX with a manifest", _export_arguments, cmd_export),
    Command("verify", "re-check a build's hashes and parity", _verify_arguments, cmd_verify),
    Command("trt-engines", "TensorRT engines for a build's components (a CUDA machine with TensorRT)",
            _trt_arguments, cmd_trt_engines),
    Command("trt-profiles", "TensorRT optimization profiles (min/opt/max per input) derived from a build's dims",
            _profiles_arguments, cmd_profiles),
)
