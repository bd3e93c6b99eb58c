"""The runtime's rooms and the one way their arrows point, read from the source (every import,
function-level ones included; ``if TYPE_CHECKING:`` imports are types only and left out)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from deployer.runtime.engine.model import ModelInterface, members
from tests.test_architecture import _cycle

RUNTIME = Path(__file__).resolve().parent.parent / "deployer" / "runtime"
PACKAGE = "deployer.runtime"


def _module_name(path: Path) -> str:
    parts = path.relative_to(RUNTIME.parent.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, *, types_too: bool = False) -> set[str]:
    """Every module ``path`` imports (absolute names), at any depth."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child) and not types_too:
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module:
                for alias in child.names:  # `from package import module` imports the module
                    submodule = f"{child.module}.{alias.name}"
                    found.add(submodule if submodule in MODULES else child.module)
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


MODULES = {_module_name(path): path for path in sorted(RUNTIME.rglob("*.py"))}


def _internal(name: str) -> set[str]:
    """The runtime modules ``name`` imports (a ``from package import module`` counts as the module)."""
    return {m for m in _imports(MODULES[name]) if m in MODULES and m != name}


def test_llama_cpp_is_imported_by_one_module():
    importers = sorted(
        name
        for name, path in MODULES.items()
        if any(m.split(".")[0] == "llama_cpp" for m in _imports(path, types_too=True))
    )
    assert importers == [f"{PACKAGE}.llama"]


def test_only_the_server_names_the_llama_cpp_edge():
    importers = sorted(name for name in MODULES if f"{PACKAGE}.llama" in _internal(name))
    assert importers == [f"{PACKAGE}.server"]


ROOMS = {
    # room: what its modules may import besides their own room
    "engine": {"config", "errors", "logs", "metrics"},
    "chat": {"errors"},
    "media": {"errors"},
    "protocols": {"errors", "engine", "chat", "media", "prepare"},
}


@pytest.mark.parametrize("room", sorted(ROOMS))
def test_arrows_point_one_way(room: str):
    allowed = {f"{PACKAGE}.{r}" for r in {room, *ROOMS[room]}}
    wrong = {
        name: sorted(m for m in _internal(name) if not any(m == a or m.startswith(a + ".") for a in allowed))
        for name in MODULES
        if name.startswith(f"{PACKAGE}.{room}.") or name == f"{PACKAGE}.{room}"
    }
    assert {name: bad for name, bad in wrong.items() if bad} == {}


def test_the_runtime_has_no_import_cycle():
    assert _cycle({name: _internal(name) for name in MODULES}) is None


def test_the_fake_model_has_every_member_of_the_model_interface():
    from deployer.runtime.config import RuntimeConfig
    from tests.fakemodel import FakeModel

    fake = FakeModel(RuntimeConfig(model_path="fake.gguf", model_name="fake", n_ctx=256))
    assert sorted(name for name in members(ModelInterface) if not hasattr(fake, name)) == []


def test_llama_cpp_model_defines_every_member_of_the_model_interface():
    """Read from its source, so that the pull-request check (no llama.cpp) holds it too."""
    tree = ast.parse(MODULES[f"{PACKAGE}.llama"].read_text(encoding="utf-8"))
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    defined: set[str] = set()
    chain = [classes["Model"]]  # and its bases defined in the module (the Vocabulary)
    while chain:
        model = chain.pop()
        chain += [classes[base.id] for base in model.bases if isinstance(base, ast.Name) and base.id in classes]
        defined |= {node.name for node in model.body if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)}
        for node in ast.walk(model):
            if isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    for leaf in ast.walk(target):
                        if (
                            isinstance(leaf, ast.Attribute)
                            and isinstance(leaf.value, ast.Name)
                            and leaf.value.id == "self"
                        ):
                            defined.add(leaf.attr)
                        elif isinstance(leaf, ast.Name):
                            defined.add(leaf.id)
    assert "Vocabulary" in classes and sorted(members(ModelInterface) - defined) == []
