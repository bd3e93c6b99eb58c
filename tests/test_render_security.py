"""No manifest can inject code: a hostile string in any string field either fails validation or
renders to a file whose Python AST is the template's except for the value of PLAN, and that
value reads back (``ast.literal_eval``) as exactly the plan's data.

Two layers are tested separately: validation (real manifest bytes through the loader), and
rendering on its own (manifests built with validation bypassed), so that either one alone
keeps the generated code fixed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deployer.errors import ManifestInvalid
from deployer.loading import LoadedManifest, parse_manifest
from deployer.manifest import AuthSettings, Manifest, ServerSettings
from deployer.render import Provenance, plan_value, render, skeleton
from tests.plans import BASE, make_plan

TEMPLATE = Path(__file__).resolve().parent.parent / "templates" / "modal_app.py"
TEMPLATE_SKELETON = skeleton(ast.parse(TEMPLATE.read_text(encoding="utf-8")))
HEADER_LINES = 5

# Strings that would break out of a naive paste into code, a string literal or a comment.
ATTACKS = [
    "'); import os; os.system('id'); ('",
    '"); import os; os.system("id"); ("',
    '"""\nimport os\n"""',
    "\\",
    "x\ny = 1",
    "x\r\nimport os",
    "x\u2028import os",
    "x\x0cimport os",
    "}\nimport os\nPLAN = {",
    "# comment\nimport os",
    "{PLAN}",
    "$(id)",
    "../../etc/passwd",
    "\x00",
    "\N{RIGHT-TO-LEFT OVERRIDE}gguf",
]
FIELD_ALPHABET = "abcXYZ019._-/+@=,()[] "

printable = st.text(st.characters(blacklist_categories=("Cs",)), max_size=60)
attack = st.one_of(
    st.sampled_from(ATTACKS),
    printable,
    st.builds(lambda a, b, c: a + b + c, st.text(FIELD_ALPHABET, max_size=10), st.sampled_from(ATTACKS), printable),
)

# Per key, values the validator may accept, so that rendering is exercised and not only refusals.
FIELDS = {
    "name": st.text("abcdef0123-", min_size=1, max_size=20),
    "repo": st.builds(
        lambda a, b: f"{a}/{b}",
        st.text("aZ09._-", min_size=1, max_size=12),
        st.text("aZ09._-", min_size=1, max_size=12),
    ),
    "file": st.builds(lambda a: f"{a}.gguf", st.text(FIELD_ALPHABET.replace("/", ""), min_size=1, max_size=20)),
    "quant": st.sampled_from(["Q8_0", "Q4_K_M", "F16"]),
    "revision": st.text("abc019._-/", min_size=1, max_size=20),
    "gpu": st.sampled_from(["H100", "A100-80GB", "L4"]),
    "server.kv_cache_type": st.sampled_from(["f16", "q8_0"]),
    "server.chat_format": st.sampled_from(["chatml", "gemma"]),
    "auth.secret": st.text("abcXYZ019._-", min_size=1, max_size=20),
    "auth.hf_token_secret": st.text("abcXYZ019._-", min_size=1, max_size=20),
}


def _manifest_bytes(key: str, value: str) -> bytes:
    data: dict = {**BASE}
    table, _, leaf = key.rpartition(".")
    if table:
        data[table] = {leaf: value}
        if leaf == "kv_cache_type":
            data[table]["flash_attn"] = True
    else:
        data[leaf] = value
    return tomli_w.dumps(data).encode("utf-8")


def _assert_only_plan_differs(loaded: LoadedManifest, manifest_path: str = "manifests/m.toml") -> None:
    plan = make_plan(loaded)
    app = render(plan, Provenance(manifest_path, "deadbeef"))
    module = ast.parse(app.text)
    assert skeleton(module) == TEMPLATE_SKELETON
    assert ast.literal_eval(plan_value(module)) == app.data
    header = app.text.splitlines()[:HEADER_LINES]
    assert all(line.startswith("# ") for line in header), header
    assert app.text.splitlines()[HEADER_LINES] == "", "the header is exactly its lines: nothing leaked past it"


@pytest.mark.parametrize("key", list(FIELDS), ids=[f"{k}-validated" for k in FIELDS])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_hostile_value_fails_validation_or_renders_as_data(key, data):
    value = data.draw(st.one_of(attack, FIELDS[key]), label=key)
    try:
        loaded = parse_manifest(_manifest_bytes(key, value), "manifests/m.toml")
    except ManifestInvalid as exc:
        assert exc.problems, "a refusal names the problem"
        return
    _assert_only_plan_differs(loaded)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=attack,
    repo=attack,
    file=attack,
    quant=attack,
    revision=attack,
    kv=attack,
    chat=attack,
    secret=attack,
    hf_secret=attack,
    path=attack,
)
def test_render_alone_keeps_code_fixed_even_if_validation_were_bypassed(
    name, repo, file, quant, revision, kv, chat, secret, hf_secret, path
):
    manifest = Manifest.model_construct(
        **{**BASE, "name": name, "repo": repo, "file": file, "quant": quant, "revision": revision},
        server=ServerSettings.model_construct(kv_cache_type=kv, chat_format=chat),
        auth=AuthSettings.model_construct(secret=secret, hf_token_secret=hf_secret),
    )
    loaded = LoadedManifest(path, manifest)
    _assert_only_plan_differs(loaded, manifest_path=path)


def test_the_checks_would_catch_a_naive_paste():
    """The assertions above are not vacuous: pasting a name as code is caught by one or the other."""
    text = TEMPLATE.read_text(encoding="utf-8")
    as_code = text.replace('"name": "gguf-gemma-3-270m"', '"name": __import__("os").getcwd()')
    with pytest.raises(ValueError):
        ast.literal_eval(plan_value(ast.parse(as_code)))  # code inside the literal does not read back
    after = text.replace("# ## The app\n", "# ## The app\nimport os\n")
    assert after != text
    assert skeleton(ast.parse(after)) != TEMPLATE_SKELETON  # code outside it changes the skeleton
