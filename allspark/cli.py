"""The `allspark` command line: each part contributes its commands (`COMMANDS`) and benchmark
targets (`BENCH_TARGETS`) from its own `cli` module; this module only assembles and dispatches.

    allspark bench TARGET ...     TARGET one of the contributed targets (kernels, build, serve)
    allspark bench BUILD ...      shorthand for `allspark bench build BUILD ...`
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .commands import Command
from .errors import AllSparkError

PARTS = ("allspark.model.cli", "allspark.export.cli", "allspark.runtime.cli", "allspark.mapping.cli",
         "allspark.serving.cli", "allspark.bench.cli", "allspark.demo.cli")
DEFAULT_BENCH_TARGET = "build"


def _contributions() -> tuple[list[Command], dict[str, Command]]:
    commands: list[Command] = []
    targets: dict[str, Command] = {}
    for name in PARTS:
        try:
            part = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and name.startswith(e.name):  # the part itself is absent: skip it
                continue
            raise  # it exists, but a dependency is missing: say so
        commands += getattr(part, "COMMANDS", ())
        targets.update({t.name: t for t in getattr(part, "BENCH_TARGETS", ())})
    return commands, targets


def _global_flags(p: argparse.ArgumentParser, default: object) -> None:
    """-v and --debug, accepted before the command and after it (`allspark client ... --debug`, as
    the error hint says): a subcommand's copy defaults to SUPPRESS so it never resets the top one."""
    p.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging")
    p.add_argument("--debug", action="store_true", default=default, help="show the traceback of any error")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Command]]:
    commands, targets = _contributions()
    p = argparse.ArgumentParser(prog="allspark", description="AllSpark inference runtime")
    _global_flags(p, False)
    common = argparse.ArgumentParser(add_help=False)
    _global_flags(common, argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)
    for c in commands:
        s = sub.add_parser(c.name, help=c.help, description=c.help, parents=[common])
        c.add_arguments(s)
        s.set_defaults(func=c)
    if targets:
        listing = ", ".join(targets)
        s = sub.add_parser("bench", help="benchmarks (results written to files)", parents=[common],
                           description=f"benchmarks: allspark bench {{{listing}}} ... (or BUILD: the "
                                       f"'{DEFAULT_BENCH_TARGET}' target); allspark bench TARGET -h for its options")
        s.add_argument("target", help=f"one of {listing}, or a build directory")
        s.add_argument("rest", nargs=argparse.REMAINDER, help="the target's arguments")
        s.set_defaults(func=lambda a: _bench(a, targets))
    return p, targets


def _bench(args: argparse.Namespace, targets: dict[str, Command]) -> int:
    name, rest = args.target, list(args.rest)
    if name not in targets:  # `allspark bench BUILD ...`
        name, rest = DEFAULT_BENCH_TARGET, [args.target, *rest]
    target = targets[name]
    p = argparse.ArgumentParser(prog=f"allspark bench {name}", description=target.help)
    target.add_arguments(p)
    _global_flags(p, argparse.SUPPRESS)
    inner = p.parse_args(rest)
    for flag in ("verbose", "debug"):  # after the target's arguments: main() reads them from `args`
        setattr(args, flag, getattr(args, flag) or getattr(inner, flag, False))
    return target(inner)


def configure_logging(verbose: bool) -> None:
    """Library code logs under `allspark`; the command line shows it on stderr (tqdm bars stay)."""
    log = logging.getLogger("allspark")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False


def main(argv: list[str] | None = None) -> int:
    parser, _ = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    configure_logging(args.verbose)
    try:
        return args.func(args)
    except AllSparkError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a path the user gave: missing, unreadable, a directory, a full disk
        if args.debug:
            raise
        where = f": {e.filename}" if e.filename else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except Exception as e:  # a case nothing checks yet: a message, not a traceback (unless --debug)
        if args.debug:
            raise
        print(f"error: unexpected {type(e).__name__}: {e} (rerun with --debug for the traceback, and please "
              "report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
