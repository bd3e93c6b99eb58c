"""`gguf-deploy new`: a manifest from a repository on the (fake) hub, never over an existing one."""

from __future__ import annotations

from pathlib import Path

import pytest

from deployer.cli.gitops import DEFAULT_QUANT as CLI_DEFAULT_QUANT
from deployer.errors import HubError
from deployer.loading import SCHEMA_COMMENT, load_manifest
from deployer.scaffold import DEFAULT_QUANT, manifest_name, pick_gguf, quants_in
from tests import ggufgen

QWEN = ggufgen.TINY_QWEN2  # trained context 32768: the default is capped at 8192
LLAMA = ggufgen.TINY_LLAMA  # trained context 4096: the default is all of it


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Header-only GGUF files (real headers, sparse data), made once for the module."""
    folder = tmp_path_factory.mktemp("models")
    made = {
        "qwen-Q8_0": ggufgen.write_gguf(folder / "q8.gguf", ggufgen.with_quant(QWEN, "Q8_0"), header_only=True),
        "qwen-Q4_K_M": ggufgen.write_gguf(folder / "q4.gguf", ggufgen.with_quant(QWEN, "Q4_K_M"), header_only=True),
        "llama-Q8_0": ggufgen.write_gguf(folder / "l8.gguf", ggufgen.with_quant(LLAMA, "Q8_0"), header_only=True),
    }
    shards = ggufgen.write_split(folder / "split", ggufgen.with_quant(LLAMA, "Q8_0"), 3)
    made |= {shard.name: shard for shard in shards}
    return made


@pytest.fixture
def qwen_repo(fake_hub, models):
    fake_hub.add_repo(
        "org/Tiny-Qwen-GGUF",
        {
            "Tiny-Qwen-Q4_K_M.gguf": models["qwen-Q4_K_M"],
            "Tiny-Qwen-Q8_0.gguf": models["qwen-Q8_0"],
            "mmproj-Tiny-Qwen-Q8_0.gguf": models["qwen-Q8_0"],  # a vision projector, not the model
            "README.md": b"# Tiny Qwen\n",
        },
    )
    return "org/Tiny-Qwen-GGUF"


def _written(tmp_path: Path, name: str) -> str:
    return (tmp_path / "manifests" / f"{name}.toml").read_text(encoding="utf-8")


def test_picks_q8_0_by_default_and_writes_a_valid_manifest(cli, tmp_path, qwen_repo):
    result = cli("new", qwen_repo, cwd=tmp_path)
    assert result.code == 0, result.err
    assert (
        "wrote manifests/tiny-qwen-q8-0.toml: Tiny-Qwen-Q8_0.gguf, context 8192 (app gguf-tiny-qwen-q8-0)" in result.out
    )
    text = _written(tmp_path, "tiny-qwen-q8-0")
    assert text.splitlines()[0] == SCHEMA_COMMENT == "#:schema ../schema/manifest.schema.json"
    assert text == (
        f"{SCHEMA_COMMENT}\n"
        'name = "tiny-qwen-q8-0"\n'
        'repo = "org/Tiny-Qwen-GGUF"\n'
        'file = "Tiny-Qwen-Q8_0.gguf"\n'
        'quant = "Q8_0"\n'
        "context = 8192\n"
    )
    assert "context             8,192 of 32,768 trained" in result.out  # the plan follows
    assert "GPU                 L4: table row '< 3B'" in result.out
    assert cli("validate", "manifests", cwd=tmp_path).code == 0
    assert load_manifest(tmp_path / "manifests" / "tiny-qwen-q8-0.toml").manifest.context == 8192


def test_a_failing_plan_still_leaves_a_valid_manifest(cli, tmp_path, qwen_repo):
    result = cli("new", qwen_repo, "--context", "65536", cwd=tmp_path)
    assert result.code == 1
    assert "wrote manifests/tiny-qwen-q8-0.toml" in result.out
    assert (
        "error: manifests/tiny-qwen-q8-0.toml: context: 65536 exceeds the model's trained context 32768" in result.err
    )
    assert cli("validate", "manifests", cwd=tmp_path).code == 0


def test_quant_is_matched_in_any_case(cli, tmp_path, qwen_repo):
    result = cli("new", qwen_repo, "--quant", "q4_k_m", "--name", "small", cwd=tmp_path)
    assert result.code == 0, result.err
    text = _written(tmp_path, "small")
    assert 'file = "Tiny-Qwen-Q4_K_M.gguf"\nquant = "Q4_K_M"\n' in text


def test_short_trained_context_is_kept_and_options_are_written(cli, tmp_path, fake_hub, models):
    fake_hub.add_repo("org/llama", {"llama-Q8_0.gguf": models["llama-Q8_0"]}, revision="v1")
    result = cli("new", "org/llama", "--revision", "v1", "--name", "my-llama", cwd=tmp_path)
    assert result.code == 0, result.err
    text = _written(tmp_path, "my-llama")
    assert 'name = "my-llama"\n' in text
    assert "context = 4096\n" in text  # the trained context, under the 8192 cap
    assert 'revision = "v1"\n' in text
    result = cli("new", "org/llama", "--revision", "v1", "--name", "long", "--context", "16384", cwd=tmp_path)
    assert "context = 16384\n" in _written(tmp_path, "long")  # as asked; plan checks it against the model


def test_split_model_gets_its_first_shard(cli, tmp_path, fake_hub, models):
    shards = {f"Q8_0/{name}": path for name, path in models.items() if "-of-" in name}
    fake_hub.add_repo("org/split", shards)
    result = cli("new", "org/split", "--name", "split", cwd=tmp_path)
    assert result.code == 0, result.err
    assert 'file = "Q8_0/tiny-llama-Q8_0-00001-of-00003.gguf"\n' in _written(tmp_path, "split")


def test_nothing_matches_lists_what_there_is(cli, tmp_path, qwen_repo):
    result = cli("new", qwen_repo, "--quant", "Q5_K_M", cwd=tmp_path)
    assert result.code == 1
    assert result.err == (
        "error: org/Tiny-Qwen-GGUF: no GGUF file matches quant Q5_K_M; quants offered: Q8_0, Q4_K_M "
        "(pass --quant); GGUF files: Tiny-Qwen-Q4_K_M.gguf, Tiny-Qwen-Q8_0.gguf\n"
    )
    assert not (tmp_path / "manifests").exists()


def test_several_match_lists_them_and_file_chooses(cli, tmp_path, fake_hub, models):
    fake_hub.add_repo("org/two", {"base-Q8_0.gguf": models["qwen-Q8_0"], "chat-Q8_0.gguf": models["qwen-Q8_0"]})
    result = cli("new", "org/two", cwd=tmp_path)
    assert result.code == 1
    assert result.err == "error: org/two: 2 GGUF files match quant Q8_0; pass --file: base-Q8_0.gguf, chat-Q8_0.gguf\n"
    assert not (tmp_path / "manifests").exists()
    result = cli("new", "org/two", "--file", "chat-Q8_0.gguf", cwd=tmp_path)
    assert result.code == 0, result.err
    assert 'file = "chat-Q8_0.gguf"\n' in _written(tmp_path, "chat-q8-0")


def test_never_overwrites(cli, tmp_path, qwen_repo):
    assert cli("new", qwen_repo, cwd=tmp_path).code == 0
    path = tmp_path / "manifests" / "tiny-qwen-q8-0.toml"
    path.write_text(path.read_text(encoding="utf-8") + "# edited by hand\n", encoding="utf-8")
    before = path.read_bytes()
    for extra in ([], ["--name", "tiny-qwen-q8-0"]):
        result = cli("new", qwen_repo, *extra, cwd=tmp_path)
        assert result.code == 1
        assert result.err == (
            "manifests/tiny-qwen-q8-0.toml: already exists; new never overwrites: edit it, or pass another --name\n"
        )
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny-qwen-q8-0.toml"]  # no temporary file left


def test_an_app_name_taken_by_another_file_is_refused(cli, tmp_path, qwen_repo):
    (tmp_path / "manifests").mkdir()
    (tmp_path / "manifests" / "other.toml").write_text(
        'name = "taken"\nrepo = "a/b"\nfile = "b.gguf"\nquant = "Q8_0"\ncontext = 4096\n', encoding="utf-8"
    )
    result = cli("new", qwen_repo, "--name", "taken", cwd=tmp_path)
    assert result.code == 1
    assert (
        result.err == "manifests/taken.toml: name: app name 'gguf-taken' is already produced by manifests/other.toml\n"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(
            ["org/x", "--name", "Bad_Name"], "manifests/Bad_Name.toml: name: must be lowercase", id="bad-name"
        ),
        pytest.param(
            ["https://huggingface.co/org/x"], "repo: must be a repo id 'owner/name', not a URL", id="url-as-repo"
        ),
        pytest.param(["org/x", "--revision", "a..b"], "revision: must not contain '..'", id="bad-revision"),
    ],
)
def test_bad_input_is_refused_before_any_request(cli, tmp_path, fake_hub, args, message):
    result = cli("new", *args, cwd=tmp_path)
    assert result.code == 1
    assert message in result.err
    assert fake_hub.requests == []
    assert not (tmp_path / "manifests").exists()


def test_unknown_repository(cli, tmp_path, fake_hub):
    result = cli("new", "org/missing", cwd=tmp_path)
    assert result.code == 1
    assert result.err.startswith("error: org/missing: repository not found on Hugging Face")


def test_unknown_quant_is_a_usage_error(cli, tmp_path):
    result = cli("new", "org/x", "--quant", "Q9_K", cwd=tmp_path)
    assert result.code == 2
    assert "'Q9_K' is not one of" in result.err


# ## The pure part


@pytest.mark.parametrize(
    ("files", "quant", "picked"),
    [
        pytest.param(["m-Q4_K_M.gguf", "m-Q4_K_S.gguf", "m-Q8_0.gguf"], "Q8_0", "m-Q8_0.gguf", id="q8-among-others"),
        pytest.param(["m-Q4_K_M.gguf", "m-Q4_K.gguf"], "Q4_K", "m-Q4_K.gguf", id="q4_k-is-not-q4_k_m"),
        pytest.param(["m-Q8_0.gguf", "m-Q8_0_L.gguf"], "Q8_0", "m-Q8_0.gguf", id="q8_0-is-not-q8_0_l"),
        pytest.param(["m.q8_0.gguf"], "Q8_0", "m.q8_0.gguf", id="lowercase-name"),
        pytest.param(["m_Q8_0.gguf"], "Q8_0", "m_Q8_0.gguf", id="underscore-before"),
        pytest.param(["m-IQ4_NL.gguf", "m-Q4_0.gguf"], "Q4_0", "m-Q4_0.gguf", id="no-match-inside-a-longer-quant"),
        pytest.param(
            ["Q8_0/m-Q8_0-00002-of-00002.gguf", "Q8_0/m-Q8_0-00001-of-00002.gguf"],
            "Q8_0",
            "Q8_0/m-Q8_0-00001-of-00002.gguf",
            id="split-first-shard",
        ),
        pytest.param(
            ["BF16/m-00001-of-00002.gguf", "BF16/m-00002-of-00002.gguf"],
            "BF16",
            "BF16/m-00001-of-00002.gguf",
            id="quant-in-the-folder-name",
        ),
        pytest.param(["m-F16.gguf", "mmproj-F16.gguf"], "F16", "m-F16.gguf", id="projector-ignored"),
    ],
)
def test_pick_gguf(files, quant, picked):
    assert pick_gguf(files, quant) == picked


def test_pick_gguf_first_shard_missing():
    with pytest.raises(HubError, match="the Q8_0 model is split, but its first shard is missing"):
        pick_gguf(["m-Q8_0-00002-of-00002.gguf"], "Q8_0", "org/m")


def test_pick_gguf_no_gguf_at_all():
    with pytest.raises(HubError, match=r"^org/m: holds no \.gguf file$"):
        pick_gguf(["README.md", "model.safetensors"], "Q8_0", "org/m")


def test_quants_in_follows_llama_cpp_order():
    assert quants_in(["a-Q8_0.gguf", "a-Q4_K_M.gguf", "a-F16.gguf", "notes.txt"]) == ["F16", "Q8_0", "Q4_K_M"]


@pytest.mark.parametrize(
    ("file", "prefix", "name"),
    [
        pytest.param("Qwen2.5-7B-Instruct-Q8_0.gguf", "gguf", "qwen2-5-7b-instruct-q8-0", id="plain"),
        pytest.param("Q8_0/M-00001-of-00003.gguf", "gguf", "m", id="split-suffix-dropped"),
        pytest.param(
            "L3.2-8X3B-MOE-Dark-Champion-Inst-18.4B-uncen-ablit_D_AU-Q8_0.gguf",
            "gguf",
            "l3-2-8x3b-moe-dark-champion-inst-18-4b-uncen-ablit-d-au-q8",
            id="cut-to-58-without-a-trailing-hyphen",
        ),
        pytest.param("Ω.gguf", "gguf", "tiny-qwen-gguf", id="nothing-left-uses-the-repo"),
    ],
)
def test_manifest_name(file, prefix, name):
    assert manifest_name(file, prefix, "org/Tiny-Qwen-GGUF") == name
    assert len(f"{prefix}-{name}") <= 63


def test_cli_and_library_share_the_default_quant():
    assert CLI_DEFAULT_QUANT == DEFAULT_QUANT == "Q8_0"


def test_a_repos_projector_is_offered_when_it_fits_the_model(cli, tmp_path, fake_hub, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vision")
    model = ggufgen.write_gguf(folder / "g.gguf", ggufgen.with_quant(ggufgen.TINY_GEMMA3, "Q8_0"), header_only=True)
    projector = ggufgen.write_projector(folder / "p.gguf", ggufgen.TINY_GEMMA3_MMPROJ, header_only=True)
    fake_hub.add_repo(
        "org/Tiny-Gemma-GGUF",
        {
            "tiny-gemma-Q8_0.gguf": model,
            "mmproj-tiny-gemma-Q8_0.gguf": projector,
            "mmproj-tiny-gemma-f16.gguf": projector,
        },
    )
    result = cli("new", "org/Tiny-Gemma-GGUF", cwd=tmp_path)
    assert result.code == 0, result.err
    assert 'mmproj = "mmproj-tiny-gemma-f16.gguf"\n' in _written(tmp_path, "tiny-gemma-q8-0")
    assert "with its multimodal projector mmproj-tiny-gemma-f16.gguf" in result.out
    assert "vision" in result.out and "gemma3 projector, 112 px" in result.out


def test_a_file_named_mmproj_that_is_no_projector_is_left_out(cli, tmp_path, qwen_repo):
    result = cli("new", qwen_repo, cwd=tmp_path)
    assert result.code == 0, result.err
    assert "mmproj" not in _written(tmp_path, "tiny-qwen-q8-0")
    assert "note: mmproj-Tiny-Qwen-Q8_0.gguf left out: " in result.err and "not a multimodal projector" in result.err
