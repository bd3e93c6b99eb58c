"""``gguf-deploy plan`` end to end: the real CLI in a subprocess, the real hub code, the fake hub."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deployer.gguf_header import MIB, read_header
from tests import ggufgen
from tests.conftest import ROOT

TARGET = ROOT / "manifests" / "dark-champion-18b.toml"
TARGET_REPO = "DavidAU/Llama-3.2-8X3B-MOE-Dark-Champion-Instruct-uncensored-abliterated-18.4B-GGUF"
TARGET_FILE = "L3.2-8X3B-MOE-Dark-Champion-Inst-18.4B-uncen-ablit_D_AU-Q8_0.gguf"


@pytest.fixture
def target(fake_hub, sparse_gguf, tmp_path):
    """The repository's own target manifest, and its model (header-only, 19.6 GB) on the fake hub."""
    commit = fake_hub.add_repo(TARGET_REPO, {TARGET_FILE: sparse_gguf(ggufgen.DARK_CHAMPION_18B)})
    (tmp_path / "manifests").mkdir()
    shutil.copy(TARGET, tmp_path / "manifests" / "dark-champion-18b.toml")
    return commit


def _write(tmp_path, stem, **keys):
    lines = [f"{key} = {json.dumps(value)}" for key, value in keys.items()]
    path = tmp_path / "manifests" / f"{stem}.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_target_model_plans_to_h100_reading_only_its_header(cli, fake_hub, sparse_gguf, target, tmp_path):
    result = cli("plan", "--json", "manifests/dark-champion-18b.toml", cwd=tmp_path)
    assert result.code == 0, result.err
    [plan] = json.loads(result.out)
    assert set(plan) >= {"name", "repo", "revision", "commit", "file", "size_bytes", "params", "arch", "quant",
                         "context", "estimate_bytes", "gpu", "usd_per_hour", "cheapest"}  # fmt: skip
    path = sparse_gguf(ggufgen.DARK_CHAMPION_18B)
    assert (plan["name"], plan["repo"], plan["revision"], plan["commit"]) == (
        "dark-champion-18b", TARGET_REPO, "main", target)  # fmt: skip
    assert (plan["file"], plan["size_bytes"]) == (TARGET_FILE, path.stat().st_size)
    assert (plan["arch"], plan["quant"], plan["context"]) == ("llama", "Q8_0", 32768)
    assert round(plan["params"] / 1e9, 1) == 18.4
    assert plan["experts"] == {"count": 8, "used": 2}
    parts = plan["estimate_bytes"]
    assert set(parts) >= {"weights", "kv", "compute", "overhead", "total"}
    assert parts["total"] == parts["weights"] + parts["kv"] + parts["compute"] + parts["overhead"]
    assert plan["gpu"]["type"] == "H100" and plan["gpu"]["count"] == 1
    assert (plan["slots"]["parallel"], plan["slots"]["concurrency"]) == (8, 16)  # the issue's target: the cap
    assert plan["slots"]["reason"].startswith("the most the planner gives: with 8 slots of 32,768 tokens")
    assert plan["gpu"]["reason"].startswith("table row '>= 13B, quantized'")
    assert isinstance(plan["gpu"]["fallbacks"], list)
    assert plan["usd_per_hour"] == 3.95
    assert set(plan["cheapest"]) == {"type", "count", "usd_per_hour"}
    assert plan["cheapest"]["usd_per_hour"] <= plan["usd_per_hour"]
    # a 19.6 GB model: no more than its header plus max(1 MiB, 10 %) came over the wire
    header = read_header(path).data_offset
    assert header <= fake_hub.bytes_served(TARGET_REPO, TARGET_FILE) <= header + max(MIB, header // 10)


def test_every_manifest_is_reported_and_failures_exit_1(cli, fake_hub, target, tmp_path):
    wrong = TARGET_FILE.replace("Q8_0", "Q4_K_M")
    _write(tmp_path, "missing-file", name="missing-file", repo=TARGET_REPO, file=wrong, quant="Q4_K_M", context=4096)
    _write(tmp_path, "too-long", name="too-long", repo=TARGET_REPO, file=TARGET_FILE, quant="Q8_0", context=200000)
    _write(tmp_path, "invalid", name="invalid", repo=TARGET_REPO, file=TARGET_FILE, quant="Q8_0", context=100)
    result = cli("plan", "--json", cwd=tmp_path)
    assert result.code == 1
    by_name = {item["name"]: item for item in json.loads(result.out)}
    assert set(by_name) == {"dark-champion-18b", "missing-file", "too-long", "invalid"}
    assert by_name["dark-champion-18b"]["gpu"]["type"] == "H100"
    assert set(by_name["too-long"]) == {"name", "path", "error"}
    assert by_name["too-long"]["error"] == (
        "manifests/too-long.toml: context: 200000 exceeds the model's trained context 131072"
    )
    assert by_name["missing-file"]["error"].endswith(f"file '{wrong}' not found; did you mean '{TARGET_FILE}'?")
    assert by_name["invalid"]["error"] == "manifests/invalid.toml:5: context: must be at least 256, got 100"
    assert "error: manifests/too-long.toml: context: 200000 exceeds the model's trained context 131072" in result.err


def test_markdown_summary(cli, target, tmp_path):
    _write(tmp_path, "invalid", repo="not a repo", file=TARGET_FILE, quant="Q8_0", context=4096)
    _write(tmp_path, "too-long", name="too-long", repo=TARGET_REPO, file=TARGET_FILE, quant="Q8_0", context=200000)
    result = cli("plan", "--markdown", cwd=tmp_path)
    assert result.code == 1
    assert result.out.startswith("### gguf-deploy plan\n")
    assert (
        "| model | GPU | fallbacks | slots | memory (estimate) | headroom | $/h warm | cheapest fitting |" in result.out
    )
    assert re.search(r"^\| dark-champion-18b \| H100 \| [^|]+ \| 8 \|", result.out, re.M), result.out
    assert "- **slots**: 8 × 32,768 tokens: the most the planner gives: " in result.out
    assert "- manifests/too-long.toml: context: 200000 exceeds" in result.out
    assert "- manifests/invalid.toml:1: repo: must be" in result.out
    assert result.out.rstrip().endswith("1 planned, 2 failed.")


def test_a_repo_id_hugging_face_refuses_is_one_error_line(cli, fake_hub, tmp_path):
    _write(tmp_path, "dotgit", repo="org/model.git", file="m.gguf", quant="Q8_0", context=4096)
    result = cli("plan", cwd=tmp_path)  # the fixture fails on a traceback
    assert result.code == 1
    # refused by validation now (the Hub edge translates it too: tests/test_hub.py)
    assert "manifests/dotgit.toml:1: repo: must not end with '.git'" in result.err


def test_tables_by_default(cli, target, tmp_path):
    result = cli("plan", cwd=tmp_path)
    assert result.code == 0, result.err
    for expected in ("dark-champion-18b", "manifests/dark-champion-18b.toml", target, "H100: table row", "18.4B",
                     "32,768 of 131,072 trained", "$3.95/h while warm", "cheapest fitting",
                     "8 × 32,768 tokens: the most the planner gives",
                     "16 requests per container (8 decoding, 8 queued"):  # fmt: skip
        assert expected in result.out, expected


def test_an_l4_override_is_refused_with_the_numbers(cli, target, tmp_path):
    manifest = tmp_path / "manifests" / "dark-champion-18b.toml"
    manifest.write_text(manifest.read_text() + 'gpu = "L4"\n')
    result = cli("plan", cwd=tmp_path)
    assert result.code == 1
    assert result.err.startswith(
        "error: manifests/dark-champion-18b.toml: gpu: L4 offers 15.7 GiB usable per GPU (70% of 22.5 GiB) "
        "but the model needs "
    )


def test_offline_needs_the_cache_then_uses_nothing_else(cli, fake_hub, target, tmp_path):
    missed = cli("plan", "--offline", cwd=tmp_path)
    assert missed.code == 1
    assert f"{TARGET_REPO}@main: the revision is not in the cache" in missed.err
    assert fake_hub.requests == []
    assert cli("plan", "--json", cwd=tmp_path).code == 0
    fake_hub.reset()
    offline = cli("plan", "--offline", "--json", cwd=tmp_path)
    assert offline.code == 0, offline.err
    assert json.loads(offline.out)[0]["commit"] == target
    assert fake_hub.requests == []


def test_a_repeated_plan_of_a_pinned_commit_makes_no_request(cli, fake_hub, target, tmp_path):
    manifest = tmp_path / "manifests" / "dark-champion-18b.toml"
    manifest.write_text(manifest.read_text() + f'revision = "{target}"\n')
    assert cli("plan", cwd=tmp_path).code == 0
    fake_hub.reset()
    assert cli("plan", cwd=tmp_path).code == 0
    assert fake_hub.requests == []


def test_policy_cheapest(cli, target, tmp_path):
    result = cli("plan", "--json", "--policy", "cheapest", cwd=tmp_path)
    [plan] = json.loads(result.out)
    assert plan["policy"] == "cheapest"
    assert {"type": plan["gpu"]["type"], "count": plan["gpu"]["count"], "usd_per_hour": plan["usd_per_hour"]} == (
        plan["cheapest"]
    )
    assert plan["usd_per_hour"] < 3.95


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(("--json", "--markdown"), "--json and --markdown exclude each other", id="json-and-markdown"),
        pytest.param(("--policy", "fastest"), "'fastest' is not one of 'table', 'cheapest'", id="unknown-policy"),
    ],
)
def test_usage_errors(cli, args, message):
    result = cli("plan", *args)
    assert result.code == 2
    assert message in result.err


def test_offline_plan_imports_neither_the_hub_nor_modal_nor_llama_cpp(fake_hub, target, tmp_path):
    code = (
        "import sys\nfrom deployer.cli import main\n"
        "try:\n    main(['plan', '--offline', '--json'], standalone_mode=False)\nexcept SystemExit:\n    pass\n"
        "print('\\n'.join(sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert not {"huggingface_hub", "modal", "llama_cpp"} & set(out.split())


def test_the_plan_says_how_chat_requests_will_be_formatted(cli, fake_hub, tmp_path):
    """A model with no chat template and no chat_format would answer chat requests with a 400:
    the plan says so before anything is deployed."""
    spec = ggufgen.TINY_LLAMA
    bare = ggufgen.write_gguf(tmp_path / "bare.gguf", spec, header_only=True)
    templated = ggufgen.write_gguf(tmp_path / "templated.gguf", spec, header_only=True, chat_template="{{ x }}")
    fake_hub.add_repo("org/tiny-GGUF", {"bare.gguf": bare, "templated.gguf": templated})
    common = {"repo": "org/tiny-GGUF", "quant": "F32", "context": 1024}
    _write(tmp_path, "bare", name="bare", file="bare.gguf", **common)
    _write(tmp_path, "templated", name="templated", file="templated.gguf", **common)
    path = _write(tmp_path, "formatted", name="formatted", file="bare.gguf", **common)
    path.write_text(path.read_text() + '[server]\nchat_format = "chatml"\n')
    result = cli("plan", "--json", cwd=tmp_path)
    assert result.code == 0, result.err
    chats = {plan["name"]: plan["chat"] for plan in json.loads(result.out)}
    no_tools = "no tools (the template has no place for them)"
    assert chats == {
        "bare": {"chat_format": None, "template_in_gguf": False, "learned": None},
        "templated": {"chat_format": None, "template_in_gguf": True, "learned": no_tools},
        "formatted": {"chat_format": "chatml", "template_in_gguf": False, "learned": None},
    }
    tables = cli("plan", "manifests/bare.toml", cwd=tmp_path)
    assert "none: /v1/chat/completions will answer 400" in " ".join(tables.out.split())
    assert "chat_format 'chatml' (the manifest's)" in cli("plan", "manifests/formatted.toml", cwd=tmp_path).out
    assert "the GGUF's own chat template" in cli("plan", "manifests/templated.toml", cwd=tmp_path).out


def test_the_plan_shows_the_tool_call_syntax_learned_from_the_gguf_template(cli, fake_hub, tmp_path):
    """A pull request says whether tools will work, and how the model writes them, before any deploy."""
    llama_templates = Path(__file__).parent / "llama_templates"
    spec = ggufgen.TINY_LLAMA
    files = {}
    for name in ("Qwen3-Coder", "google-gemma-2-2b-it"):
        template = (llama_templates / f"{name}.jinja").read_text(encoding="utf-8")
        files[f"{name}.gguf"] = ggufgen.write_gguf(
            tmp_path / f"{name}.gguf", spec, header_only=True, chat_template=template
        )
    fake_hub.add_repo("org/tiny-GGUF", files)
    for name in ("Qwen3-Coder", "google-gemma-2-2b-it"):
        _write(tmp_path, name.lower(), name=name.lower(), file=f"{name}.gguf", repo="org/tiny-GGUF", quant="F32",
               context=1024)  # fmt: skip
    chats = {plan["name"]: plan["chat"]["learned"] for plan in json.loads(cli("plan", "--json", cwd=tmp_path).out)}
    assert chats["qwen3-coder"].startswith("tools: tagged: <tool_call>\\n<function=get_weather>"), chats
    assert chats["google-gemma-2-2b-it"].startswith("no tools"), chats
    words = " ".join(cli("plan", "manifests/qwen3-coder.toml", cwd=tmp_path).out.split())
    assert "<parameter=city>" in words, words
