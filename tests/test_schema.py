"""The JSON schema is generated from the pydantic models, committed, and agrees with them."""

from __future__ import annotations

import json
import tomllib

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from deployer.manifest import Manifest
from tests.conftest import ROOT

SCHEMA_PATH = ROOT / "schema" / "manifest.schema.json"


def _committed() -> dict:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def test_schema_command_equals_committed_file_byte_for_byte(cli):
    result = cli("schema")
    assert result.code == 0
    assert result.out == SCHEMA_PATH.read_text(encoding="utf-8"), (
        "schema/manifest.schema.json drifted from the models: run `gguf-deploy schema > schema/manifest.schema.json`"
    )


def test_committed_schema_is_a_valid_json_schema():
    jsonschema.Draft202012Validator.check_schema(_committed())


@pytest.mark.parametrize("path", sorted((ROOT / "manifests").glob("*.toml")), ids=lambda p: p.name)
def test_every_manifest_validates_against_the_committed_schema(path):
    text = path.read_text(encoding="utf-8")
    assert text.startswith("#:schema ../schema/manifest.schema.json\n")
    jsonschema.validate(tomllib.loads(text), _committed(), cls=jsonschema.Draft202012Validator)


def _accepted_by_schema(data: dict) -> bool:
    return jsonschema.Draft202012Validator(_committed()).is_valid(data)


def _accepted_by_models(data: dict) -> bool:
    try:
        Manifest.model_validate(data)
    except ValidationError:
        return False
    return True


_text = st.one_of(
    st.text(max_size=80),
    st.from_regex(r"[A-Za-z0-9._/\\:-]{1,30}", fullmatch=True),
    st.sampled_from(
        ["a/b", "../x.gguf", "x.gguf", "/abs.gguf", "d/e/f.gguf", "a--b/c", "H100", "A10:5", "h100", "main"]
    ),
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    repo=_text,
    file=_text,
    name=st.one_of(st.none(), _text),
    revision=st.one_of(st.none(), _text),
    gpu=st.one_of(st.none(), _text, st.lists(_text, max_size=3)),
    secret=st.one_of(st.none(), _text),
)
def test_schema_and_models_agree_on_every_string_field(repo, file, name, revision, gpu, secret):
    """An editor (JSON schema) and `gguf-deploy validate` (pydantic) accept the same strings.

    Semantic, cross-field rules (app name length with the prefix, n_ubatch <= n_batch) are the
    validator's alone; this property covers the per-field rules, where the two must agree.
    """
    data: dict = {"repo": repo, "file": file, "quant": "Q8_0", "context": 4096, "name": name or "x"}
    if revision is not None:
        data["revision"] = revision
    if gpu is not None:
        data["gpu"] = gpu
    if secret is not None:
        data["auth"] = {"secret": secret}
    assert _accepted_by_schema(data) == _accepted_by_models(data), data
