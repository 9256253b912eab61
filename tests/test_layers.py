"""The package's layers import one way (docs/ARCHITECTURE.md, "Layers"): a module imports only from its own
floor or the floors below it, and no set of modules imports itself round a cycle. Imports inside functions
and under `if TYPE_CHECKING:` count too: a deferred or type-only import is still a dependency."""

import ast
import shutil
from pathlib import Path

import smat

PACKAGE = Path(smat.__file__).parent

# Bottom to top. A module belongs to the first floor with a prefix of its dotted name.
LAYERS = [
    ("base", ["smat.io", "smat.progress", "smat.device", "smat.config_loader", "smat"]),
    ("data and backbones", ["smat.data", "smat.models"]),
    ("methods", ["smat.methods"]),
    ("training and importers", ["smat.training", "smat.releases"]),
    ("evaluation", ["smat.evaluation"]),
    ("analysis", ["smat.analysis"]),
    ("applications", ["smat.experiment", "smat.rule_args", "smat.cli"]),
]


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def floor(module: str) -> int:
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or (p != "smat" and module.startswith(p + ".")) for p in prefixes):
            return index
    raise AssertionError(f"{module}: on no floor of LAYERS; add it to one")


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the package modules it imports (`from smat.x import y` counts smat.x.y when y is a module)."""
    modules = {module_name(root, path): path for path in root.rglob("*.py")}
    graph = {}
    for module, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names if alias.name.split(".")[0] == "smat"}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "smat":
                submodules = {f"{node.module}.{alias.name}" for alias in node.names} & set(modules)
                targets |= submodules or {node.module}
        graph[module] = {t for t in targets if t in modules and t != module}
    return graph


def upward_imports(root: Path) -> list[str]:
    return sorted(f"{module} ({LAYERS[floor(module)][0]}) imports {target} ({LAYERS[floor(target)][0]})"
                  for module, targets in import_graph(root).items() for target in targets
                  if floor(target) > floor(module))


def cycles(root: Path) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    graph = import_graph(root)
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_imports_one_way_without_cycles():
    assert upward_imports(PACKAGE) == []
    assert cycles(PACKAGE) == []


def test_an_upward_import_and_a_cycle_are_caught(tmp_path):
    copy = tmp_path / "smat"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    head = copy / "methods" / "head.py"
    head.write_text(head.read_text() + "\n\ndef _late():\n    from smat.training.loop import train\n")
    gates = copy / "methods" / "gates.py"
    gates.write_text(gates.read_text() + "\nif False:\n    import smat.methods.experts\n")
    assert upward_imports(copy) == ["smat.methods.head (methods) imports smat.training.loop (training and importers)"]
    assert ["smat.methods.experts", "smat.methods.gates"] in cycles(copy)
