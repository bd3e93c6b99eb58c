"""`gguf-deploy validate`: one line per problem naming file, line and key; exit 1; no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import ROOT

GOOD = """\
#:schema ../schema/manifest.schema.json
repo = "owner/model-GGUF"
file = "model-Q8_0.gguf"
quant = "Q8_0"
context = 4096
"""


def _write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def _good(**replace: str) -> str:
    text = GOOD
    for key, value in replace.items():
        lines = [line for line in text.splitlines() if not line.startswith(f"{key} =")]
        text = "\n".join(lines) + "\n" + (f"{key} = {value}\n" if value else "")
    return text


# (id, manifest content, key named in the message ("" = whole file), line or None, text in the message)
BROKEN = [
    pytest.param("x = [1,\n", "", 1, "invalid TOML", id="malformed-toml"),
    pytest.param("", "", None, "empty", id="empty-file"),
    pytest.param(b"\x00\x9f\x92\x96GGUF\x03\x00", "", None, "binary", id="binary-junk"),
    pytest.param(b'repo = "a/b"\nfile = "\xff\xfe.gguf"\n', "", 2, "not UTF-8", id="not-utf8"),
    pytest.param(_good(context='"4096"'), "context", 5, "expected an integer, got a string ('4096')", id="wrong-type"),
    pytest.param(_good(context="100"), "context", 5, "must be at least 256, got 100", id="context-too-small"),
    pytest.param(GOOD + "[server]\nn_batch = 0\n", "server.n_batch", 7, "must be at least 1", id="out-of-range"),
    pytest.param(GOOD + "contxt = 5\n", "contxt", 6, "unknown key; did you mean 'context'?", id="unknown-key"),
    pytest.param(
        GOOD + "[server]\nflash_atn = true\n",
        "server.flash_atn",
        7,
        "did you mean 'flash_attn'",
        id="unknown-nested-key",
    ),
    pytest.param(_good(quant='"Q9_K"'), "quant", 5, "unknown quant 'Q9_K'", id="unknown-quant"),
    pytest.param(_good(gpu='"H800"'), "gpu", 6, "unknown GPU type 'H800'", id="unknown-gpu"),
    pytest.param(_good(gpu='"A10:8"'), "gpu", 6, "A10 allows at most 4 GPUs per container, not 8", id="bad-gpu-count"),
    pytest.param(
        _good(gpu='"H100:two"'), "gpu", 6, "GPU count 'two' must be a whole number", id="gpu-count-not-a-number"
    ),
    pytest.param(_good(gpu='["H100", "H100"]'), "gpu", 6, "listed twice", id="gpu-duplicate-fallback"),
    pytest.param(_good(file='"../x.gguf"'), "file", 5, "must not leave the repo", id="file-escapes-repo"),
    pytest.param(_good(file='"/etc/x.gguf"'), "file", 5, "not an absolute path", id="file-absolute"),
    pytest.param(_good(file='"model.bin"'), "file", 5, "must name a .gguf file", id="file-not-gguf"),
    pytest.param(_good(repo='"just-a-name"'), "repo", 5, "must be 'owner/name'", id="repo-malformed"),
    pytest.param(_good(repo='"https://huggingface.co/a/b"'), "repo", 5, "not a URL", id="repo-url"),
    pytest.param(_good(repo='"org/model.git"'), "repo", 5, "must not end with '.git'", id="repo-dot-git"),
    pytest.param(_good(repo='"org/model-"'), "repo", 5, "each part starting and ending", id="repo-trailing-dash"),
    pytest.param(_good(name='"bad\\u0007name"'), "name", 6, "control character (U+0007)", id="control-character"),
    pytest.param(_good(name='"My_Model"'), "name", 6, "must be lowercase", id="name-uppercase"),
    pytest.param(_good(name='"' + "a" * 59 + '"'), "name", 6, "at most 58", id="name-too-long"),
    pytest.param(
        _good(file='"' + "a" * 70 + '.gguf"'), "name", 5, "the name derived from 'file'", id="derived-name-too-long"
    ),
    pytest.param(_good(revision='"main..x"'), "revision", 6, "must not contain '..'", id="revision-malformed"),
    pytest.param(_good(repo=""), "repo", None, "required key is missing", id="missing-required"),
    pytest.param(
        GOOD + "[server]\nn_batch = 256\nn_ubatch = 512\n",
        "server",
        6,
        "must not exceed n_batch",
        id="ubatch-over-batch",
    ),
    pytest.param(
        GOOD + '[server]\nflash_attn = false\nkv_cache_type = "q8_0"\n',
        "server",
        6,
        "needs flash_attn",
        id="quantized-v-needs-fa",
    ),
    pytest.param(
        GOOD + "[scaling]\nmin_containers = 3\nmax_containers = 1\n",
        "scaling",
        6,
        "must not exceed max_containers",
        id="min-over-max",
    ),
    pytest.param(GOOD + "server = 5\n", "server", 6, "expected a table, got an integer", id="table-wrong-type"),
    pytest.param(
        GOOD + "[server]\nparallel = 4\n[scaling]\nconcurrency = 2\n",
        "scaling.concurrency",
        9,
        "2 is less than [server] parallel = 4: a container must accept at least one request per slot",
        id="concurrency-below-the-slots",
    ),
    pytest.param(GOOD + "[server]\nparallel = 0\n", "server.parallel", 7, "must be at least 1, got 0", id="no-slots"),
    pytest.param(GOOD + "[server]\nthreads = 0\n", "server.threads", 7, "must be at least 1, got 0", id="no-threads"),
    pytest.param(
        _good(file="", quant='"IQ1_M"', convert_from='"safetensors"'),
        "quant",
        4,
        "'IQ1_M' needs an importance matrix, which llama.cpp's quantizer refuses to go without; "
        "with convert_from, quant is one of F32, F16, BF16, Q8_0, Q4_0,",
        id="conversion-to-an-imatrix-type",
    ),
]


@pytest.mark.parametrize(("content", "key", "line", "text"), BROKEN)
def test_broken_manifest_is_one_clear_line(tmp_path, cli, content, key, line, text):
    path = _write(tmp_path, "broken.toml", content)
    result = cli("validate", str(path), cwd=tmp_path)
    assert result.code == 1
    problems = [ln for ln in result.err.splitlines() if ln.startswith("broken.toml")]
    assert len(problems) >= 1, result.err
    first = problems[0]
    where = f"broken.toml:{line}" if line else "broken.toml"
    prefix = f"{where}: {key}: " if key else f"{where}: "
    assert first.startswith(prefix), first
    assert text in first, first


def test_every_problem_in_one_run(tmp_path, cli):
    _write(tmp_path, "a.toml", _good(context="1") + "typo = 1\n")
    _write(tmp_path, "b.toml", "not toml at all [")
    _write(tmp_path, "ok.toml", GOOD)
    result = cli("validate", ".", cwd=tmp_path)
    assert result.code == 1
    assert "a.toml:5: context: must be at least 256, got 1" in result.err
    assert "a.toml:6: typo: unknown key" in result.err
    assert "b.toml:1: invalid TOML" in result.err
    assert "ok.toml: ok (gguf-model-q8-0)" in result.out
    assert "3 problem(s) in 2 file(s); 1 valid manifest(s)" in result.err


def test_two_manifests_with_the_same_app_name(tmp_path, cli):
    _write(tmp_path, "one.toml", _good(name='"same"'))
    _write(tmp_path, "two.toml", _good(name='"same"'))
    result = cli("validate", str(tmp_path), cwd=tmp_path)
    assert result.code == 1
    assert "one.toml: name: app name 'gguf-same' is also produced by two.toml" in result.err
    assert "two.toml: name: app name 'gguf-same' is also produced by one.toml" in result.err


def test_app_prefix_counts_towards_the_name_limit(tmp_path, cli):
    _write(tmp_path, "m.toml", _good(name='"' + "a" * 50 + '"'))
    assert cli("validate", "m.toml", cwd=tmp_path).code == 0
    result = cli("--app-prefix", "a-much-longer-prefix", "validate", "m.toml", cwd=tmp_path)
    assert result.code == 1
    assert "m.toml:6: name: the app name 'a-much-longer-prefix-aaa" in result.err
    assert "a name may have at most 42" in result.err


def test_missing_path_and_no_manifests(tmp_path, cli):
    result = cli("validate", "nowhere.toml", cwd=tmp_path)
    assert (result.code, result.err.splitlines()[0]) == (1, "nowhere.toml: no such file or directory")
    (tmp_path / "empty").mkdir()
    result = cli("validate", "empty", cwd=tmp_path)
    assert (result.code, result.err.strip()) == (1, "no manifests found")


def test_committed_manifests_are_valid(cli):
    result = cli("validate", "manifests/")
    assert result.code == 0, result.err
    assert "manifests/dark-champion-18b.toml: ok (gguf-dark-champion-18b)" in result.out
    assert "manifests/gemma-3-270m.toml: ok (gguf-gemma-3-270m)" in result.out


def test_default_path_is_manifests(cli):
    result = cli("validate", cwd=ROOT)
    assert result.code == 0
    assert "valid manifest(s)" in result.out


def test_usage_error_exits_2(cli):
    result = cli("validate", "--no-such-flag")
    assert result.code == 2
    assert "No such option" in result.err
