"""Rendering: the plan goes in as data; the file imports with the real modal library and modal
records what the plan says (GPU list, volume, secrets, timeouts, scaling, concurrency).

The container-side code of the template (download, verify, readiness) runs here too, against
the fake Hugging Face hub and real subprocesses: only Modal itself is absent.
"""

from __future__ import annotations

import ast
import hashlib
import re
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from modal._utils.name_utils import is_valid_tag as modal_is_valid_tag

from deployer import render as render_mod
from deployer.errors import RenderError
from deployer.render import (
    HOST_THREADS,
    Provenance,
    app_data,
    check_rendered,
    comment_safe,
    render,
    startup_timeout,
    tag_value,
    write_app,
)
from tests import ggufgen
from tests.plans import COMMIT, GIB, import_app, loaded_manifest, make_plan, recorded

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "templates" / "modal_app.py"
DARK = ggufgen.DARK_CHAMPION_18B
DARK_REPO = "DavidAU/Llama-3.2-8X3B-MOE-Dark-Champion-Instruct-uncensored-abliterated-18.4B-GGUF"
DARK_FILE = "L3.2-8X3B-MOE-Dark-Champion-Inst-18.4B-uncen-ablit_D_AU-Q8_0.gguf"


def _rendered(tmp_path: Path, **keys) -> tuple[dict, Path]:
    plan = make_plan(**keys) if "loaded" not in keys else make_plan(keys.pop("loaded"), **keys)
    app = render(plan, Provenance("manifests/model.toml", "f" * 40))
    return app.data, write_app(app, tmp_path)


# ## The target model, end to end: manifest -> fake hub -> plan -> render CLI -> modal


@pytest.fixture
def dark_champion(fake_hub, tmp_path_factory):
    """The committed dark-champion manifest's model on the fake hub (header-only, real size)."""
    gguf = ggufgen.write_gguf(tmp_path_factory.mktemp("dark") / DARK_FILE, DARK, header_only=True)
    return fake_hub.add_repo(DARK_REPO, {DARK_FILE: gguf, "README.md": b"# Dark Champion\n"}), gguf


def test_target_model_renders_to_h100_with_fallbacks_volume_secret_and_scale_to_zero(
    cli, tmp_path, fake_hub, dark_champion
):
    commit, gguf = dark_champion
    result = cli("render", "manifests/dark-champion-18b.toml", "-o", str(tmp_path))
    assert result.code == 0, result.err
    path = Path(result.out.strip())
    assert path == tmp_path / "gguf_dark_champion_18b.py"

    spec = recorded(import_app(path))

    assert spec["name"] == "gguf-dark-champion-18b"
    tags = spec["tags"]
    assert tags["manifest"] == "dark-champion-18b"
    short = hashlib.sha256(DARK_REPO.encode()).hexdigest()[:8]
    assert tags["repo"] == DARK_REPO.replace("/", "--")[:54] + "." + short  # 86 characters: truncated + hash
    assert tags["commit"] == commit
    assert tags["quant"] == "Q8_0"
    assert tags["deployer"] == "0.1.0"
    assert re.fullmatch(r"[0-9a-f]{16}", tags["config"])
    assert all(modal_is_valid_tag(k, 63) and modal_is_valid_tag(v, 63) for k, v in tags.items())

    server = spec["Server.*"]
    assert server["gpu"][0] == "H100"
    assert len(server["gpu"]) > 1, "Modal needs fallbacks when H100s are scarce"
    assert server["volumes"] == {"/models": {"name": "gguf-models", "create_if_missing": True}}
    assert server["secrets"] == [{"name": "gguf-api-key", "required_keys": ["GGUF_DEPLOY_API_KEY"]}]
    assert (server["min_containers"], server["max_containers"], server["scaledown_window"]) == (0, 2, 300)
    # the planner's 8 slots (17.8 GiB of weights + 8 × 3.5 GiB of KV cache fit an H100):
    # Modal adds a container once 8 requests run, and routes at most 16 (8 queued) to one
    assert (server["target_concurrent_inputs"], server["max_concurrent_inputs"]) == (8, 16)
    assert server["cpu"] == 6.0  # llama.cpp's 4 threads, the event loop and the model thread
    assert server["timeout"] == 600
    assert server["startup_timeout"] == startup_timeout(gguf.stat().st_size) > 300
    assert server["web_servers"] == {"serve": {"port": 8000, "startup_timeout": 60.0}}
    assert server["memory_snapshot"] is False, "GPU snapshots are alpha on Modal: opt-in only"
    assert server["experimental_options"] == {}

    download = spec["download_weights"]
    assert download["volumes"] == server["volumes"]
    assert download["gpu"] is None, "downloading needs no GPU"
    assert download["secrets"] == []
    assert spec["classes"] == ["Server"]


def test_target_gpu_list_is_the_planners(tmp_path, fake_hub, dark_champion):
    from deployer.cache import FactsCache
    from deployer.hub import HfHubClient, Resolver
    from deployer.loading import load_manifest
    from deployer.plan import plan

    loaded = load_manifest(ROOT / "manifests" / "dark-champion-18b.toml")
    facts = Resolver(HfHubClient(), FactsCache(tmp_path / "cache")).resolve(DARK_REPO, "main", DARK_FILE)
    chosen = plan(loaded, facts)
    path = write_app(render(chosen, Provenance(loaded.path)), tmp_path)
    assert recorded(import_app(path))["Server.*"]["gpu"] == chosen.modal_gpus


# ## What the manifest changes, as modal records it


@pytest.mark.parametrize(
    ("keys", "gpus", "expect"),
    [
        pytest.param(
            {},
            ("H100", "A100-80GB"),
            {"gpu": ["H100", "A100-80GB"], "target_concurrent_inputs": 4, "max_concurrent_inputs": 8, "cpu": 6.0},
            id="defaults-4-slots-4-queued-4-cores",
        ),
        pytest.param({}, ("H100:2", "H200:2"), {"gpu": ["H100:2", "H200:2"]}, id="two-gpus-per-container"),
        pytest.param(
            {"scaling": {"min_containers": 1, "max_containers": 5, "scaledown_window": 60, "timeout": 120}},
            ("L40S",),
            {"min_containers": 1, "max_containers": 5, "scaledown_window": 60, "timeout": 120, "gpu": ["L40S"]},
            id="warm-container-and-limits",
        ),
        pytest.param(
            {"scaling": {"concurrency": 16}},
            ("L4",),
            {"target_concurrent_inputs": 4, "max_concurrent_inputs": 16},
            id="concurrency-is-the-runtimes",
        ),
        pytest.param(
            {"server": {"parallel": 6}},
            ("L4",),
            {"target_concurrent_inputs": 6, "max_concurrent_inputs": 12},
            id="slots-are-modals-target",
        ),
        pytest.param(
            {"server": {"parallel": 2}, "scaling": {"concurrency": 2}},
            ("L4",),
            {"target_concurrent_inputs": 2, "max_concurrent_inputs": 2},
            id="no-queue-in-the-container",
        ),
        pytest.param({"server": {"threads": 12}}, ("L4",), {"cpu": 14.0}, id="threads-reserve-their-cores"),
        pytest.param({"server": {"threads": 1}}, ("L4",), {"cpu": 3.0}, id="one-thread-three-cores"),
        pytest.param(
            {"scaling": {"memory_snapshot": True}},
            ("H100",),
            {"memory_snapshot": True, "experimental_options": {"enable_gpu_snapshot": "True"}},
            id="gpu-memory-snapshot-opt-in",
        ),
        pytest.param({"auth": {"enabled": False}}, ("L4",), {"secrets": []}, id="auth-off-no-secret"),
        pytest.param(
            {"auth": {"secret": "team-key"}},
            ("L4",),
            {"secrets": [{"name": "team-key", "required_keys": ["GGUF_DEPLOY_API_KEY"]}]},
            id="own-api-key-secret",
        ),
    ],
)
def test_manifest_settings_reach_modal(tmp_path, keys, gpus, expect):
    data, path = _rendered(tmp_path, gpus=gpus, **keys)
    server = recorded(import_app(path))["Server.*"]
    assert {key: server[key] for key in expect} == expect
    assert data["runtime"]["concurrency"] == server["max_concurrent_inputs"]
    assert data["runtime"]["parallel"] == server["target_concurrent_inputs"]
    # a core per llama.cpp thread, and one each for the event loop and the model thread
    assert data["runtime"]["n_threads"] + HOST_THREADS == server["cpu"]


def test_hf_token_secret_goes_to_the_download_only(tmp_path):
    _, path = _rendered(tmp_path, auth={"hf_token_secret": "hf-read"})
    spec = recorded(import_app(path))
    assert spec["download_weights"]["secrets"] == [{"name": "hf-read", "required_keys": ["HF_TOKEN"]}]
    assert [s["name"] for s in spec["Server.*"]["secrets"]] == ["gguf-api-key"]


def test_memory_request_comes_from_the_estimate(tmp_path):
    _, small = _rendered(tmp_path / "a", host=100 * 1024 * 1024)
    _, big = _rendered(tmp_path / "b", host=int(9.1 * GIB))
    assert recorded(import_app(small))["Server.*"]["memory"] == 2048  # the floor
    assert recorded(import_app(big))["Server.*"]["memory"] == 9472  # 9.1 GiB rounded up to 256 MiB


def test_startup_timeout_grows_with_the_model_and_is_capped():
    assert startup_timeout(0) == 300
    assert startup_timeout(20 * GIB) == 300 + 215
    assert startup_timeout(2000 * GIB) == 3600


def test_split_model_downloads_every_shard(tmp_path):
    data, path = _rendered(tmp_path, shard_sizes=(10 * GIB, 10 * GIB, 3 * GIB))
    files = [s["file"] for s in data["model"]["shards"]]
    assert files == [f"model-Q8_0-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    module = import_app(path)
    assert data["runtime"]["model_path"] == str(module.shard_path(files[0])), "the runtime loads the first shard"
    assert data["model"]["size_bytes"] == 23 * GIB


def test_the_template_is_itself_a_working_app():
    spec = recorded(import_app(TEMPLATE))
    assert spec["name"] == "gguf-gemma-3-270m"
    assert spec["Server.*"]["gpu"] == ["L4"]


# ## Data, hash, tags, header


def test_plan_is_one_literal_that_reads_back(tmp_path):
    plan = make_plan()
    app = render(plan, Provenance("manifests/model.toml"))
    module = ast.parse(app.text)
    (value,) = [n.value for n in module.body if isinstance(n, ast.Assign) and n.targets[0].id == "PLAN"]
    assert ast.literal_eval(value) == app.data == app_data(plan)
    assert app.data["runtime"].get("api_key") is None and "api_key" not in app.data["runtime"]


def test_rendered_file_is_the_template_but_for_plan_and_header():
    app = render(make_plan(), Provenance("manifests/model.toml"))
    template = TEMPLATE.read_text()
    assert render_mod.skeleton(ast.parse(app.text)) == render_mod.skeleton(ast.parse(template))
    strip = lambda text: [ln for ln in text.splitlines() if not ln.startswith("#")]  # noqa: E731
    before = strip(template[template.index("# </gguf-deploy header>") :])
    after = strip(app.text)
    assert before[: before.index("PLAN = {")] == after[: after.index("PLAN = {")]


def test_a_tampered_rendering_is_refused():
    app = render(make_plan(), Provenance("manifests/model.toml"))
    with pytest.raises(RenderError, match="differs from the template outside PLAN"):
        check_rendered(app.text + "\nimport os\n", app.data)
    with pytest.raises(RenderError, match="does not read back"):
        check_rendered(app.text, {**app.data, "gpu": ["T4"]})


@pytest.mark.parametrize(
    ("change", "same"),
    [
        pytest.param({"commit": "d" * 40}, False, id="moved-main-redeploys"),
        pytest.param({"scaling": {"max_containers": 3}}, False, id="scaling-change"),
        pytest.param({"gpus": ("H100", "H200")}, False, id="fallback-change"),
        pytest.param({"server": {"n_batch": 1024}}, False, id="runtime-setting-change"),
        pytest.param({"slots": 8}, False, id="slots-change"),
        pytest.param({"server": {"threads": 8}}, False, id="threads-change"),
        pytest.param({}, True, id="same-plan-same-hash"),
    ],
)
def test_config_hash_changes_with_what_is_deployed(change, same):
    before = render(make_plan(), Provenance("manifests/model.toml")).config_hash
    after = render(make_plan(**change), Provenance("elsewhere/model.toml", "e" * 40)).config_hash
    assert (before == after) is same


def test_config_hash_covers_the_template(monkeypatch, tmp_path):
    before = render(make_plan(), Provenance("m.toml")).config_hash
    edited = tmp_path / "modal_app.py"
    edited.write_text(TEMPLATE.read_text().replace("HEALTH_POLL_S = 1.0", "HEALTH_POLL_S = 2.0"))
    monkeypatch.setattr(render_mod, "TEMPLATE_PATH", edited)
    render_mod._template_text.cache_clear()
    render_mod._template_skeleton.cache_clear()
    try:
        assert render(make_plan(), Provenance("m.toml")).config_hash != before
    finally:
        monkeypatch.undo()
        render_mod._template_text.cache_clear()
        render_mod._template_skeleton.cache_clear()


def _package_imports(path: Path) -> set[str]:
    """The ``deployer`` modules a file imports at run time (``if TYPE_CHECKING:`` blocks aside)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
        for statement in node.body
        for inner in ast.walk(statement)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "deployer"}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "deployer":
            found.add(node.module)
            if node.module == "deployer":  # `from deployer import errors`: the names may be modules
                found |= {f"deployer.{alias.name}" for alias in node.names}
    return found


def test_config_hash_covers_every_package_module_the_container_runs():
    package = ROOT / "deployer"
    hashed = set(render_mod.runtime_source_files())
    # what the containers start from: the runtime, and the modules the app's own functions import
    # (the conversion function's deployer.conversion.converter); then what those import, and so on
    imported = {"deployer"}.union(
        _package_imports(TEMPLATE), *(_package_imports(p) for p in (package / "runtime").rglob("*.py"))
    )
    seen: set[Path] = set()
    while imported:
        module = imported.pop()
        parts = module.split(".")[1:]
        for depth in range(len(parts) + 1):  # a module's packages run first: their __init__.py too
            folder = package.joinpath(*parts[:depth])
            source = folder / "__init__.py" if folder.is_dir() else folder.with_suffix(".py")
            if source.exists() and source not in seen:  # else a name imported from a module, not a module
                assert source in hashed, f"{module} runs in the container but is not in render.RUNTIME_SOURCES"
                seen.add(source)
                imported |= _package_imports(source)
    assert hashed >= {package / "errors.py", package / "__init__.py", package / "runtime" / "__main__.py"}
    assert package / "conversion" / "converter.py" in seen


def test_config_hash_covers_the_runtime_and_the_modules_it_imports(monkeypatch, tmp_path):
    import shutil

    before = render(make_plan(), Provenance("m.toml")).config_hash
    copy = tmp_path / "deployer"
    shutil.copytree(ROOT / "deployer", copy, ignore=shutil.ignore_patterns("__pycache__"))
    hashes = []
    for edited in ("errors.py", "runtime/server.py"):
        with (copy / edited).open("a", encoding="utf-8") as handle:
            handle.write("# changed\n")
        monkeypatch.setattr(render_mod, "PACKAGE_DIR", copy)
        render_mod._runtime_source_digest.cache_clear()
        try:
            hashes.append(render(make_plan(), Provenance("m.toml")).config_hash)
        finally:
            monkeypatch.undo()
            render_mod._runtime_source_digest.cache_clear()
    assert len({before, *hashes}) == 3, "each edit changes the config hash"


@given(st.text(max_size=200))
def test_tag_values_always_follow_modals_rules(value):
    assert modal_is_valid_tag(tag_value(value), 63)


@pytest.mark.parametrize(
    ("repo", "tag"),
    [
        pytest.param("org/model-GGUF", "org--model-GGUF", id="slash-becomes-double-dash"),
        pytest.param("a.b/c_d", "a.b--c_d", id="dots-and-underscores-kept"),
        pytest.param(DARK_REPO, DARK_REPO.replace("/", "--")[:54] + ".", id="long-repo-truncated-with-hash"),
    ],
)
def test_repo_tag_encoding(repo, tag):
    encoded = tag_value(repo)
    assert encoded.startswith(tag)
    assert len(encoded) <= 63
    if len(repo) > 63:
        assert encoded[-8:] == hashlib.sha256(repo.encode()).hexdigest()[:8]


def test_header_says_where_it_came_from():
    app = render(make_plan(), Provenance("manifests/model.toml", "ab" * 20 + "+dirty", "0.1.0"))
    header = app.text.splitlines()[:5]
    assert header[0] == "# Modal app gguf-model-q8-0, rendered by gguf-deploy 0.1.0."
    assert header[1] == f"# Manifest: manifests/model.toml (source commit {'ab' * 20}+dirty)"
    assert header[2] == f"# Model: org/model-GGUF at commit {COMMIT}, Q8_0"
    assert header[3] == f"# Config hash: {app.config_hash}"


@given(st.text(max_size=300))
def test_comment_values_cannot_end_the_comment(value):
    safe = comment_safe(value)
    assert safe.isascii() and safe.isprintable()
    assert len(safe) <= render_mod.COMMENT_VALUE_MAX


def test_hostile_manifest_path_stays_in_the_comment():
    app = render(make_plan(), Provenance("x\nimport os\r\n#\u2028y.toml", "\nrm -rf"))
    assert render_mod.skeleton(ast.parse(app.text)) == render_mod.skeleton(ast.parse(TEMPLATE.read_text()))
    assert "# Manifest: x?import os??#?y.toml (source commit ?rm -rf)" in app.text


# ## Writing


def test_write_is_atomic_and_leaves_nothing_behind(tmp_path):
    app = render(make_plan(), Provenance("m.toml"))
    target = write_app(app, tmp_path / "out")
    assert target.read_text() == app.text
    target.write_text("old")
    write_app(app, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == [target.name]
    assert target.read_text() == app.text


def test_render_into_a_file_path_is_one_clear_line(cli, tmp_path, fake_hub, dark_champion):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    result = cli("render", "manifests/dark-champion-18b.toml", "-o", str(blocker / "apps"))
    assert result.code == 1
    last = result.err.strip().splitlines()[-1]
    assert last.startswith(f"error: {blocker / 'apps' / 'gguf_dark_champion_18b.py'}: cannot write the app file"), last
    assert blocker.read_text() == "x"


def test_render_of_an_unknown_repo_fails_cleanly(cli, tmp_path, fake_hub):
    manifest = tmp_path / "m.toml"
    manifest.write_text('repo = "org/nothing"\nfile = "x-Q8_0.gguf"\nquant = "Q8_0"\ncontext = 4096\n')
    result = cli("render", str(manifest), "-o", str(tmp_path / "out"))
    assert result.code == 1
    assert result.err.splitlines()[-1].startswith("error: org/nothing: repository not found on Hugging Face"), (
        result.err
    )
    assert not (tmp_path / "out").exists()


# ## The container side of the template: download, verify, readiness


@pytest.fixture
def hosted(fake_hub, tmp_path):
    """A rendered app whose model (a small file) is on the fake hub, the Volume a folder."""
    payload = b"GGUF" + bytes(range(256)) * 4096
    commit = fake_hub.add_repo("org/small-GGUF", {"small-Q8_0.gguf": payload})
    loaded = loaded_manifest(repo="org/small-GGUF", file="small-Q8_0.gguf")
    plan = make_plan(loaded, commit=commit, shard_sizes=(len(payload),))
    data = app_data(plan)
    data["model"]["shards"][0]["sha256"] = hashlib.sha256(payload).hexdigest()
    module = import_app(write_app(render(plan, Provenance("m.toml")), tmp_path / "app"))
    module.PLAN = data
    module.MODELS_DIR = tmp_path / "volume"
    return module, data["model"]["shards"][0], payload


def test_fetch_downloads_verifies_and_renames(hosted, fake_hub):
    module, shard, payload = hosted
    module.fetch_shard(shard)
    target = module.shard_path(shard["file"])
    assert target.read_bytes() == payload
    assert [p.name for p in target.parent.iterdir()] == [target.name], "no temporary folder left"
    fake_hub.reset()
    module.fetch_shard(shard)
    assert fake_hub.bytes_served("org/small-GGUF", shard["file"]) == 0, "cached: no second download"


def test_fetch_refuses_a_corrupt_download(hosted):
    module, shard, _ = hosted
    with pytest.raises(RuntimeError, match="does not match the Hub's"):
        module.fetch_shard({**shard, "sha256": "0" * 64})
    folder = module.model_dir()
    assert list(folder.iterdir()) == [], "nothing under the final name, no temporary folder"


def test_racing_downloads_end_with_one_verified_file(hosted):
    module, shard, payload = hosted
    errors: list[BaseException] = []

    def fetch() -> None:
        try:
            module.fetch_shard(shard)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    target = module.shard_path(shard["file"])
    assert target.read_bytes() == payload
    assert [p.name for p in target.parent.iterdir()] == [target.name]


def test_only_stale_partial_downloads_are_removed(hosted):
    import os
    import time

    module, _, _ = hosted
    folder = module.model_dir()
    stale, live = folder / ".partial-dead", folder / ".partial-running"
    for partial in (stale, live):
        (partial / "sub").mkdir(parents=True)
    old = time.time() - module.DOWNLOAD_TIMEOUT - 60
    os.utime(stale, (old, old))
    module.remove_stale_partials()
    assert sorted(p.name for p in folder.iterdir()) == [".partial-running"]


def test_shard_paths_never_leave_the_model_folder(hosted):
    module, _, _ = hosted
    with pytest.raises(ValueError, match="not a path inside"):
        module.shard_path("../../../etc/passwd")


SERVER = textwrap.dedent(
    """
    import sys, time
    from http.server import BaseHTTPRequestHandler, HTTPServer
    ready_at = time.monotonic() + float(sys.argv[2])
    class Health(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if time.monotonic() >= ready_at else 503)
            self.end_headers()
        def log_message(self, *args):
            pass
    HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
    """
)


@pytest.mark.parametrize(
    ("script", "timeout", "raises"),
    [
        pytest.param("server", 20, None, id="503-then-200-is-ready"),
        pytest.param("exit", 20, "exited with status 3", id="dead-runtime-fails-fast"),
        pytest.param("never", 2, "did not become ready within 2 s", id="deadline"),
    ],
)
def test_wait_ready_polls_health_and_watches_the_process(tmp_path, script, timeout, raises):
    import socket
    import subprocess

    module = import_app(TEMPLATE)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    module.HEALTH_URL = f"http://127.0.0.1:{port}/health"
    module.HEALTH_POLL_S = 0.1
    code = {
        "server": ["-c", SERVER, str(port), "1.0"],
        "exit": ["-c", "import sys, time; time.sleep(0.3); sys.exit(3)"],
        "never": ["-c", SERVER, str(port), "1000"],
    }[script]
    process = subprocess.Popen([sys.executable, *code])
    try:
        if raises is None:
            module.wait_ready(process, timeout)
            assert process.poll() is None
        else:
            with pytest.raises((RuntimeError, TimeoutError), match=raises):
                module.wait_ready(process, timeout)
    finally:
        process.kill()
        process.wait()


# ## The container's start and stop, with the real runtime (llama.cpp on the CPU here)


@pytest.fixture
def container(tmp_path, monkeypatch):
    """A rendered app whose Volume (a folder) holds a tiny loadable model, on a free port."""
    import socket

    loaded = loaded_manifest(repo="org/tiny-GGUF", file="tiny-F32.gguf", quant="F32", context=512, name="tiny")
    model = ggufgen.write_gguf(tmp_path / "tiny.gguf", ggufgen.TINY_LLAMA)
    plan = make_plan(loaded, shard_sizes=(model.stat().st_size,), gpus=("L4",))
    module = import_app(write_app(render(plan, Provenance("m.toml")), tmp_path / "app"))
    module.MODELS_DIR = tmp_path / "volume"
    module.PLAN = {**module.PLAN, "runtime": {**module.PLAN["runtime"], "n_gpu_layers": 0}}
    target = module.shard_path("tiny-F32.gguf")
    target.parent.mkdir(parents=True)
    model.replace(target)
    module.PLAN["runtime"]["model_path"] = str(target)  # the rendered path is below /models
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        module.PORT = probe.getsockname()[1]
    module.HOST = "127.0.0.1"
    module.HEALTH_URL = f"http://127.0.0.1:{module.PORT}/health"
    monkeypatch.setenv("GGUF_DEPLOY_API_KEY", "sk-test-key")
    return module


@pytest.mark.model
def test_container_starts_the_runtime_with_the_key_and_stops_it(container):
    import openai

    process = container.start_runtime()
    try:
        container.wait_ready(process, 120)
        base = f"http://127.0.0.1:{container.PORT}/v1"
        models = openai.OpenAI(base_url=base, api_key="sk-test-key").models.list()
        assert [m.id for m in models.data] == ["tiny"]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
    finally:
        code = container.stop_runtime(process)
    assert code == 0, "SIGTERM stops the runtime cleanly"


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        pytest.param("no-weights", "not in the Volume; `gguf-deploy deploy` downloads weights", id="weights-missing"),
        pytest.param("no-key", "the secret 'gguf-api-key' does not set GGUF_DEPLOY_API_KEY", id="key-missing"),
    ],
)
def test_container_refuses_to_start_without_weights_or_key(container, monkeypatch, setup, message):
    if setup == "no-weights":
        container.shard_path("tiny-F32.gguf").unlink()
    else:
        monkeypatch.delenv("GGUF_DEPLOY_API_KEY")
    with pytest.raises(RuntimeError, match=re.escape(message)):
        container.start_runtime()
