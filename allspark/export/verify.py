"""`allspark verify`: re-check a build without its checkpoint — every file (inside the build, present,
non-empty, sha256 as recorded), and each graph's parity against the PyTorch outputs stored at
export (`validation/<component>.npz`). Every component is reported, failures collected, nothing
raised for a damaged file: a damaged build is what this command is for."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..contract.integrity import artifact_paths, check_files, resolve_inside
from ..contract.manifest import artifact, read_manifest
from ..contract.tensors import ONNX, STATIC_CACHE, TensorSpec
from ..errors import AllSparkError
from .validate import compare, load_cases, tolerance_of


@dataclass(frozen=True)
class StoredSpec:
    """The part of an export spec that `compare` needs, rebuilt from the manifest."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    tolerance: dict[str, float]


@dataclass
class ComponentReport:
    name: str
    checked: list[str] = field(default_factory=list)  # what passed, in words
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_report(build: str | Path, parity: bool = True) -> list[ComponentReport]:
    """One report per component (and one named "build" for the tokenizer and validation files)."""
    build = Path(build)
    m = read_manifest(build)
    reports = {name: ComponentReport(name) for name in [*m["components"], "build"]}
    files: dict[str, int] = {}
    for check in check_files(build, m):
        r = reports[check.component]
        if check.ok:
            files[check.component] = files.get(check.component, 0) + 1
        else:
            r.problems.append(f"{check.file}: {check.problem}")
    for name, n in files.items():
        if not reports[name].problems:
            reports[name].checked.append(f"{n} file{'s' if n > 1 else ''}: sha256 as recorded")
    if parity:
        for name, c in m["components"].items():
            if not reports[name].problems:
                _parity(build, name, c, reports[name])
                static = c["artifacts"].get(STATIC_CACHE.name)
                if static is not None:  # the decoder's static-cache graph, checked against its own cases
                    _parity(build, name, static, reports[name], art=static, label="static cache ")
    return [r for r in reports.values() if r.checked or r.problems]


def _parity(build: Path, name: str, c: dict, report: ComponentReport, art: dict | None = None,
            label: str = "") -> None:
    """`c`: a component entry, or an artifact with its own tensors and parity record (`art`)."""
    cases = resolve_inside(build, c["validation"])
    if cases is None or not cases.is_file():
        report.problems.append(f"{label}parity: validation cases {c['validation']!r} missing or outside the build")
        return
    try:
        tensors = c["parity"].get("tensors", c)  # a twin's own inputs/outputs, when checked in slices
        spec = StoredSpec(name, tuple(TensorSpec.from_json(t) for t in tensors["inputs"]),
                          tuple(TensorSpec.from_json(t) for t in tensors["outputs"]),
                          {c["precision"]: tolerance_of(c["parity"])[1]})
        graph = c["parity"].get("twin_graph")  # a twin's: checked in slices
        # otherwise the graph the runtime opens, by the same verified path
        path = resolve_inside(build, graph) if graph else artifact_paths(build, name, art or artifact(c, ONNX.name, name)).main
        if path is None or not path.is_file():
            report.problems.append(f"{label}parity: graph {graph or path.name!r} missing or outside the build")
            return
        r = compare(spec, path, load_cases(cases), c["precision"], metric=tolerance_of(c["parity"])[0])
    except AllSparkError as e:
        report.problems.append(f"{label}parity: {e}")
        return
    except Exception as e:  # a damaged cases file or graph: reported, never raised
        report.problems.append(f"{label}parity could not run: {type(e).__name__}: {e}")
        return
    metric, tol = tolerance_of(r)
    what = {"max_abs": "max abs error", "max_rel": "max relative error",
            "max_scaled": "max error / max(1, |reference|)",
            "rel_rms": "relative RMS error"}[metric]
    if r["passed"]:
        worst = max((o[metric] for o in r["outputs"].values()), default=0.0)
        ref = c["parity"].get("reference", "PyTorch (recorded before references were described)")
        scope = c["parity"].get("scope", "full depth")
        report.checked.append(f"{label}parity: {len(r['outputs'])} outputs on {len(r['validation_shapes'])} cases ({scope}), "
                              f"{what} {worst:.1e} <= {tol:g} against {ref}")
    else:
        worst = {o: r["outputs"][o][metric] for o in r["failed"]}
        report.problems.append(f"{label}parity drifted beyond {what} {tol:g}: {worst}")


def verify_build(build: str | Path, parity: bool = True) -> list[str]:
    """Problems, one line each as "<component>: <problem>"; empty means the build is intact."""
    return [f"{r.name}: {p}" for r in verify_report(build, parity) for p in r.problems]
