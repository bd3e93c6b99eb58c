"""The suite passes on any CPU: no test expects the exact text a real model generates.

llama.cpp's CPU kernels differ by instruction set (AVX2, AVX512, AMX, repacked or not) and by
batch size, and so do the tokens a model picks at temperature 0 (README "Determinism"). A test may
compare generated text with a literal only when a grammar forces that text (the test then says
``grammar``), and compare two generations only where the runtime guarantees equality (a cached
prefix; one request at a time). This module checks the first rule over every test file.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

# Names under which a test holds what a model generated (response fields and the tests' own helpers).
GENERATED = ("content", "text", "delta", "reply", "answer", "completion", "output", "generated")


def _looks_like_prose(value: object) -> bool:
    """A literal that reads like model output: some words, not a key, a status or an id."""
    return isinstance(value, str) and len(value) >= 6 and " " in value.strip() and any(c.isalpha() for c in value)


def _mentions_generated(node: ast.AST) -> bool:
    names = {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}
    names |= {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
    return any(word in name.lower() for name in names for word in GENERATED)


def _marked_model(node: ast.AST, source: str) -> bool:
    return "pytest.mark.model" in (ast.get_source_segment(source, node) or "")


def violations(source: str, filename: str = "<test>") -> list[str]:
    """``file:line`` of each assertion that compares generated text with a prose literal in a test
    that runs a real model (marked ``model``) and forces no text with a grammar."""
    module = ast.parse(source, filename)
    whole_module = any(
        isinstance(node, ast.Assign)
        and any(getattr(t, "id", "") == "pytestmark" for t in node.targets)
        and _marked_model(node, source)
        for node in module.body
    )
    found = []
    for function in ast.walk(module):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef) or not function.name.startswith("test"):
            continue
        if not whole_module and not any(_marked_model(d, source) for d in function.decorator_list):
            continue
        if "grammar" in ast.get_source_segment(source, function):
            continue  # the text is forced, whatever the kernels
        for node in ast.walk(function):
            if not isinstance(node, ast.Compare) or not any(isinstance(op, ast.Eq | ast.NotEq) for op in node.ops):
                continue
            sides = [node.left, *node.comparators]
            literals = [s for s in sides if isinstance(s, ast.Constant) and _looks_like_prose(s.value)]
            others = [s for s in sides if not isinstance(s, ast.Constant)]
            if literals and any(_mentions_generated(side) for side in others):
                found.append(f"{filename}:{node.lineno}")
    return found


def test_no_test_expects_a_model_generated_literal():
    found = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        found += violations(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    assert not found, "tests comparing generated text with a literal (force it with a grammar): " + ", ".join(found)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        pytest.param(
            "pytestmark = pytest.mark.model\n"
            "def test_a(s):\n    reply = ask(s)\n    assert reply.choices[0].message.content == 'Paris is the capital.'\n",
            ["t.py:4"],
            id="content-against-prose-is-caught",
        ),
        pytest.param(
            "@pytest.mark.model\ndef test_a(s):\n    text = run(s)\n    assert 'red, yellow and blue' == text\n",
            ["t.py:4"],
            id="literal-on-the-left-is-caught",
        ),
        pytest.param(
            "pytestmark = pytest.mark.model\ndef test_a(s):\n    reply = ask(s, grammar='root ::= \"Yes, warm.\"')\n"
            "    assert reply.content == 'Yes, warm.'\n",
            [],
            id="text-forced-by-a-grammar-is-allowed",
        ),
        pytest.param(
            "pytestmark = pytest.mark.model\ndef test_a(s):\n    reply = ask(s)\n    assert reply.finish_reason == 'stop'\n",
            [],
            id="a-status-is-not-prose",
        ),
        pytest.param(
            "pytestmark = pytest.mark.model\ndef test_a(s):\n    error = ask(s)\n    assert error.message == 'no tool support here'\n",
            [],
            id="an-error-message-is-not-generated",
        ),
        pytest.param(
            "def test_a(tmp_path):\n    text = render(tmp_path)\n    assert text == 'a manifest line'\n",
            [],
            id="a-test-without-a-model-is-not-checked",
        ),
    ],
)
def test_the_check_itself(source, expected):
    assert violations(source, "t.py") == expected


def test_the_check_reads_every_test_file():
    files = list(Path(ROOT / "tests").glob("test_*.py"))
    assert len(files) > 30 and Path(__file__) in files
