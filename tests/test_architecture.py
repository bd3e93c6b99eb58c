"""The import graph of the package outside the serving runtime: imports go one way.

Every import counts, wherever it is written: at the top, inside a function (imported on first use
is still a dependency) and under ``if TYPE_CHECKING:`` (a type from a module is a dependency on it).
The one exception is the facade ``deployer/__init__.py``: it re-exports the library lazily (PEP 562)
and modules import only ``__version__`` from it, so its own imports are no edges.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "deployer"
FACADE = "deployer"
# the modules whose graph is checked: everything but the runtime (its own restructuring, its own rules)
FOLDERS = (PACKAGE, PACKAGE / "cli", PACKAGE / "conversion")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _all_modules() -> set[str]:
    return {_module_name(path) for path in PACKAGE.rglob("*.py")}


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The ``deployer`` modules ``path`` imports, anywhere in the file (functions and TYPE_CHECKING too)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package this file is in, up level - 1
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            # `from deployer.x import y`: y is a module when there is one by that name, else a name in x
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import deployer.x.y` of a name: its module
                target = target.rpartition(".")[0]
            if target.split(".")[0] == "deployer":
                found.add(target)
    return found - {name}


def _graph() -> dict[str, set[str]]:
    modules = _all_modules()
    checked = {_module_name(path): path for folder in FOLDERS for path in folder.glob("*.py")}
    return {
        name: set() if name == FACADE else {m for m in _imports(path, modules) if m in checked}
        for name, path in checked.items()
    }


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that starts and ends at the same module, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for after in sorted(graph[node]):
            if state.get(after) == 1:
                return [*path[path.index(after) :], after]
            if after not in state:
                found = visit(after)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_is_read_whole():
    graph = _graph()
    assert {"deployer.hub", "deployer.conversion.resolve", "deployer.cli.plan"} <= set(graph)
    assert not any(name.startswith("deployer.runtime") for name in graph)
    # a function-level import and a TYPE_CHECKING import are both edges
    assert "deployer.conversion.local" in graph["deployer.local_model"]  # inside find_model_file
    assert "deployer.conversion.resolve" in graph["deployer.cli.plan"]  # inside the command


def test_a_cycle_is_found():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_imports_outside_the_runtime_have_no_cycle():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " → ".join(cycle or ())


def test_hub_knows_nothing_of_conversion():
    """The conversion package depends on the hub's client; the hub is given conversions, never imports them."""
    imported = _imports(PACKAGE / "hub.py", _all_modules())
    assert not {m for m in imported if m == "deployer.conversion" or m.startswith("deployer.conversion.")}


def test_the_facade_is_imported_for_its_version_only():
    """Why the facade's own imports are no edges: nothing imports it for anything but ``__version__``."""
    for folder in FOLDERS:
        for path in folder.glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and node.module == FACADE and not node.level:
                    assert [a.name for a in node.names] == ["__version__"], path


def test_the_conversion_package_init_imports_nothing():
    """The quantizer's child process (``python -m deployer.conversion.converter``) and the Modal app's
    conversion container load it: it stays a docstring."""
    tree = ast.parse((PACKAGE / "conversion" / "__init__.py").read_text(encoding="utf-8"))
    assert [type(node) for node in tree.body] == [ast.Expr]
