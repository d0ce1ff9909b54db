"""The package's wiring, read from its source: no module imports a higher layer, no import cycle,
and no code outside a modality's own plug-in names a built-in modality.

Every `import` statement counts, at module level or inside a function. The registries load their
plug-ins by name (`importlib`), which is the point of a plug-in and not an import edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "allspark"

# Lowest first. A module belongs to the layer of its longest matching prefix.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("allspark", "allspark.errors", "allspark.fsutil", "allspark.onnxrt", "allspark.commands", "allspark.plugins",
     "allspark.memory", "allspark.contract"),
    ("allspark.kernels",),
    ("allspark.model",),
    ("allspark.modalities",),  # the built-in modality plug-in
    ("allspark.export",),
    ("allspark.runtime",),
    ("allspark.mapping",),  # whole scenes through a Runtime
    ("allspark.serving",),
    ("allspark.bench",),
    ("allspark.demo",),  # the trainer, evaluation and `allspark demo`
    ("allspark.cli", "allspark.__main__"),
)


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def layer(module: str) -> int:
    best, best_len = None, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            exact_only = p == "allspark"
            if (module == p or (not exact_only and module.startswith(p + "."))) and len(p) > best_len:
                best, best_len = i, len(p)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best


def imports(module: str) -> set[str]:
    """The allspark modules `module` imports (resolved relative imports; `from pkg import mod` -> pkg.mod)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "allspark"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "allspark":
                continue
            subs = {f"{target}.{a.name}" for a in node.names} & set(MODULES)
            found |= subs if subs and len(subs) == len(node.names) else {target} | subs
    return {m for m in found if m in MODULES and m != module}


GRAPH = {m: imports(m) for m in MODULES}


def test_every_module_has_a_layer():
    for m in MODULES:
        layer(m)


def test_no_module_imports_a_higher_layer():
    upward = [f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)})"
              for m, targets in GRAPH.items() for t in sorted(targets) if layer(t) > layer(m)]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    """Tarjan's strongly connected components: any component of more than one module is a cycle."""
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for m in sorted(GRAPH):
        if m not in index:
            visit(m)
    assert not cycles, cycles


def test_kernels_are_a_leaf():
    for m, targets in GRAPH.items():
        if m.startswith("allspark.kernels"):
            assert {t for t in targets if not t.startswith("allspark.kernels")} <= {"allspark.errors"}, m


# Modules allowed to name a built-in modality: its plug-in (with its synthetic data), and three
# benchmarks that are about RGB by design (attention at EVA's shapes; converting a Lynx checkpoint;
# the GPU issue's one EVA-g request at paper size).
MAY_NAME_MODALITIES = ("allspark.modalities", "allspark.bench.kernels", "allspark.bench.convert",
                       "allspark.bench.gpu_paper")


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not m.startswith(MAY_NAME_MODALITIES)))
def test_no_branching_on_modality_names(module):
    from allspark.modalities import Modality

    names = {m.value for m in Modality}
    tree = ast.parse(MODULES[module].read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr)}
    literals = [n.value for n in ast.walk(tree)
                if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in names
                and id(n) not in docstrings]
    assert not literals, f"{module} names built-in modalities {literals}: move that into the modality's spec"


def test_no_private_attribute_of_runtime_is_used_outside_it():
    """`Runtime`'s state is reached through its public names (`device_resident`, `kv_shape`,
    `max_positions`, `detokenize`, ...); a `rt._x` / `runtime._x` elsewhere in the package fails."""
    def holder(node: ast.AST) -> str | None:
        return node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None

    found = []
    for path in ROOT.rglob("*.py"):
        if path == ROOT / "runtime" / "runtime.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and holder(node.value) in ("rt", "runtime")):
                found.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} .{node.attr}")
    assert not found, found
