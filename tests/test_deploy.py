"""Deploying at the Modal client boundary: skip-if-unchanged, per-manifest failure isolation,
secrets, dry runs, status, destroy; and the real client against a stand-in ``modal`` CLI.

No test here reports or asserts a deploy that did not happen: "deployed" is only ever checked
against the fake client's record of a successful ``deploy`` call.
"""

from __future__ import annotations

import json
import re
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from deployer.cli.deploy import deploy as deploy_cmd
from deployer.cli.deploy import destroy as destroy_cmd
from deployer.cli.deploy import status as status_cmd
from deployer.errors import ModalError, PlanError, Problem
from deployer.modal_ops import LiveApp, ModalCli, app_status, deploy_all, find_app, last_words
from deployer.render import Provenance, render
from tests import ggufgen
from tests.plans import loaded_manifest, make_plan

ROOT = Path(__file__).resolve().parent.parent
NO_CREDENTIALS = "error: no Modal credentials: set MODAL_TOKEN_ID and MODAL_TOKEN_SECRET, or run `modal token new`"


class FakeModal:
    """A ModalClient that records every call; ``fail`` maps (method, app file or name) to a message."""

    def __init__(self, apps=(), secrets=("gguf-api-key",), fail=None):
        self.apps = list(apps)
        self.secrets = set(secrets)
        self.fail = dict(fail or {})
        self.calls: list[tuple] = []

    def list_apps(self, env, prefix):
        self.calls.append(("list_apps", env, prefix))
        return list(self.apps)

    def list_secrets(self, env):
        self.calls.append(("list_secrets", env))
        return set(self.secrets)

    def prefetch(self, app_file, env):
        self._call("prefetch", Path(app_file).name, env)

    def deploy(self, app_file, env, tag):
        self._call("deploy", Path(app_file).name, env, tag)

    def stop(self, app_name, env):
        self._call("stop", app_name, env)

    def _call(self, method, target, *rest):
        self.calls.append((method, target, *rest))
        if (method, target) in self.fail:
            raise ModalError(self.fail[method, target])

    def made(self, method):
        return [call[1] for call in self.calls if call[0] == method]


def manifests(*names, **keys):
    return [loaded_manifest(path=f"manifests/{n}.toml", name=n, **keys) for n in names]


def planner(broken=()):
    def plan_one(loaded):
        if loaded.name in broken:
            raise PlanError(f"{loaded.path}: context: 200000 exceeds the model's trained context 131072")
        return make_plan(loaded)

    return plan_one


def config_of(loaded):
    return render(make_plan(loaded), Provenance(loaded.path)).config_hash


def live(loaded, config, **tags):
    return LiveApp(loaded.app_name, f"ap-{loaded.name}", "deployed", {"config": config, **tags})


# ## deploy_all at the client boundary


def test_unchanged_manifest_is_skipped(tmp_path):
    (item,) = manifests("alpha")
    client = FakeModal(apps=[live(item, config_of(item))])
    (result,) = deploy_all([item], plan_one=planner(), client=client, out_dir=tmp_path)
    assert (result.outcome, result.detail) == ("unchanged", "the live app has this config hash")
    assert client.made("prefetch") == client.made("deploy") == []


def test_changed_config_is_prefetched_then_deployed_with_its_hash(tmp_path):
    (item,) = manifests("alpha")
    client = FakeModal(apps=[live(item, "0123456789abcdef")])
    (result,) = deploy_all([item], plan_one=planner(), client=client, out_dir=tmp_path, env="staging")
    new = config_of(item)
    work = [c for c in client.calls if c[0] in ("prefetch", "deploy")]
    assert work == [("prefetch", "gguf_alpha.py", "staging"), ("deploy", "gguf_alpha.py", "staging", new)]
    assert (result.outcome, result.detail, result.config_hash) == ("deployed", f"config 0123456789abcdef -> {new}", new)
    assert Path(result.app_file).is_file()


def test_force_redeploys_an_unchanged_app(tmp_path):
    (item,) = manifests("alpha")
    client = FakeModal(apps=[live(item, config_of(item))])
    (result,) = deploy_all([item], plan_one=planner(), client=client, out_dir=tmp_path, force=True)
    assert result.outcome == "deployed"
    assert client.made("deploy") == ["gguf_alpha.py"]


def test_one_failing_manifest_does_not_stop_the_others(tmp_path):
    items = manifests("plan-fails", "prefetch-fails", "deploy-fails", "fine")
    client = FakeModal(
        fail={
            ("prefetch", "gguf_prefetch_fails.py"): "downloading the weights failed: 404 Not Found",
            ("deploy", "gguf_deploy_fails.py"): "modal deploy failed: Image build failed",
        }
    )
    results = deploy_all(
        items,
        plan_one=planner(broken={"plan-fails"}),
        client=client,
        out_dir=tmp_path,
        problems=[Problem("manifests/typo.toml", 3, "contxt", "unknown key; did you mean 'context'?")],
    )
    outcomes = {r.path: (r.outcome, r.detail) for r in results}
    assert outcomes == {
        "manifests/typo.toml": ("failed", "manifests/typo.toml:3: contxt: unknown key; did you mean 'context'?"),
        "manifests/plan-fails.toml": (
            "failed",
            "manifests/plan-fails.toml: context: 200000 exceeds the model's trained context 131072",
        ),
        "manifests/prefetch-fails.toml": ("failed", "downloading the weights failed: 404 Not Found"),
        "manifests/deploy-fails.toml": ("failed", "modal deploy failed: Image build failed"),
        "manifests/fine.toml": ("deployed", "new app"),
    }
    assert client.made("prefetch") == ["gguf_prefetch_fails.py", "gguf_deploy_fails.py", "gguf_fine.py"]
    assert client.made("deploy") == ["gguf_deploy_fails.py", "gguf_fine.py"], "no deploy without its weights"


def test_a_multi_line_failure_is_one_table_cell(tmp_path):
    (item,) = manifests("alpha")
    client = FakeModal(fail={("deploy", "gguf_alpha.py"): "modal deploy failed\nsee the build log above"})
    (result,) = deploy_all([item], plan_one=planner(), client=client, out_dir=tmp_path)
    assert (result.outcome, result.detail) == ("failed", "modal deploy failed; see the build log above")


def test_missing_api_key_secret_is_a_clear_failure_before_any_work(tmp_path):
    (item,) = manifests("alpha")
    client = FakeModal(secrets=())
    (result,) = deploy_all([item], plan_one=planner(), client=client, out_dir=tmp_path, env="prod")
    assert result.outcome == "failed"
    assert result.detail == (
        "Modal secret 'gguf-api-key' not found in environment 'prod'; "
        "create it: modal secret create gguf-api-key GGUF_DEPLOY_API_KEY=<value>"
    )
    assert client.made("prefetch") == []


@pytest.mark.parametrize(
    ("auth", "secrets", "outcome", "detail"),
    [
        pytest.param({"enabled": False}, (), "deployed", "new app", id="auth-off-needs-no-secret"),
        pytest.param(
            {"hf_token_secret": "hf"},
            ("gguf-api-key",),
            "failed",
            "Modal secret 'hf' not found; create it: modal secret create hf HF_TOKEN=<value>",
            id="missing-hf-token-secret",
        ),
        pytest.param(
            {"hf_token_secret": "hf"}, ("gguf-api-key", "hf"), "deployed", "new app", id="both-secrets-present"
        ),
    ],
)
def test_secrets_a_manifest_needs(tmp_path, auth, secrets, outcome, detail):
    (item,) = manifests("alpha", auth=auth)
    client = FakeModal(secrets=secrets)
    (result,) = deploy_all([item], plan_one=planner(), client=client, out_dir=tmp_path)
    assert (result.outcome, result.detail) == (outcome, detail)
    assert client.made("deploy") == (["gguf_alpha.py"] if outcome == "deployed" else [])


def test_dry_run_renders_and_never_touches_modal(tmp_path):
    items = manifests("alpha", "beta")
    seen = []
    results = deploy_all(
        items,
        plan_one=planner(),
        client=None,
        out_dir=tmp_path,
        dry_run=True,
        on_plan=lambda plan, path: seen.append((plan.manifest.name, path.name)),
    )
    assert [r.outcome for r in results] == ["rendered", "rendered"]
    assert seen == [("alpha", "gguf_alpha.py"), ("beta", "gguf_beta.py")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gguf_alpha.py", "gguf_beta.py"]


def test_a_listing_failure_stops_before_any_deploy(tmp_path):
    class Down(FakeModal):
        def list_apps(self, env, prefix):
            raise ModalError("modal app list failed: Connection refused")

    client = Down()
    with pytest.raises(ModalError, match="Connection refused"):
        deploy_all(manifests("alpha"), plan_one=planner(), client=client, out_dir=tmp_path)
    assert client.calls == []


# ## The deploy command, in process with the fakes handed in


def _invoke(command, args, client, plan_one=None, input=None):
    obj = {"app_prefix": "gguf", "modal_client": client, "planner": plan_one or planner()}
    return CliRunner().invoke(command, args, obj=obj, input=input, env={"COLUMNS": "200", "NO_COLOR": "1"})


def test_deploy_command_summarises_and_exits_1_when_any_failed(tmp_path):
    folder = tmp_path / "manifests"
    folder.mkdir()
    for name in ("alpha", "beta"):
        (folder / f"{name}.toml").write_text(
            f'name = "{name}"\nrepo = "org/m"\nfile = "m-Q8_0.gguf"\nquant = "Q8_0"\ncontext = 4096\n'
        )
    client = FakeModal(fail={("prefetch", "gguf_beta.py"): "downloading the weights failed: 403 gated repo"})
    result = _invoke(deploy_cmd, [str(folder), "-o", str(tmp_path / "out")], client)
    assert result.exit_code == 1, result.output
    rows = {line.split()[1]: line for line in result.output.splitlines() if line.startswith(str(folder))}
    assert re.search(r"\bdeployed\b.*new app", rows["gguf-alpha"])
    assert re.search(r"\bfailed\b.*403 gated repo", rows["gguf-beta"])
    assert "1 deployed, 0 unchanged, 1 failed" in result.output
    assert client.made("deploy") == ["gguf_alpha.py"]


def test_deploy_command_all_unchanged_exits_0(tmp_path):
    path = tmp_path / "alpha.toml"
    path.write_text('name = "alpha"\nrepo = "org/m"\nfile = "m-Q8_0.gguf"\nquant = "Q8_0"\ncontext = 4096\n')
    from deployer.loading import load_manifest

    item = load_manifest(path)
    client = FakeModal(apps=[live(item, config_of(item))])
    result = _invoke(deploy_cmd, [str(path), "-o", str(tmp_path / "out")], client)
    assert result.exit_code == 0, result.output
    assert "0 deployed, 1 unchanged, 0 failed" in result.output
    assert client.made("deploy") == []


# ## Without credentials, through the real production path


@pytest.fixture
def no_credentials(tmp_path, monkeypatch):
    """The environment of a machine that never ran `modal token new`: an empty HOME, no token."""
    for name in ("MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET", "MODAL_PROFILE", "MODAL_CONFIG_PATH"):
        monkeypatch.delenv(name, raising=False)  # run_cli copies os.environ when it runs
    home = tmp_path / "home"
    home.mkdir()
    return {"HOME": str(home)}


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["deploy", "manifests/dark-champion-18b.toml"], id="deploy"),
        pytest.param(["status"], id="status"),
        pytest.param(["destroy", "dark-champion-18b", "--yes"], id="destroy"),
    ],
)
def test_without_credentials_one_clear_line_and_nothing_done(cli, tmp_path, no_credentials, args):
    out = tmp_path / "out"
    result = cli(*args, *(["-o", str(out)] if args[0] == "deploy" else []), env=no_credentials)
    assert result.code == 1
    assert result.err.strip().splitlines() == [NO_CREDENTIALS]
    assert result.out == ""
    assert not out.exists(), "credentials are checked before planning or rendering"


# ## --dry-run, end to end through the fake hub


def test_dry_run_prints_the_plan_and_the_files_and_claims_no_deploy(cli, tmp_path, fake_hub, no_credentials):
    repo = "DavidAU/Llama-3.2-8X3B-MOE-Dark-Champion-Instruct-uncensored-abliterated-18.4B-GGUF"
    file = "L3.2-8X3B-MOE-Dark-Champion-Inst-18.4B-uncen-ablit_D_AU-Q8_0.gguf"
    gguf = ggufgen.write_gguf(tmp_path / file, ggufgen.DARK_CHAMPION_18B, header_only=True)
    commit = fake_hub.add_repo(repo, {file: gguf})
    out = tmp_path / "out"
    env = {**no_credentials, "HF_ENDPOINT": fake_hub.url}
    result = cli("deploy", "--dry-run", "manifests/dark-champion-18b.toml", "-o", str(out), env=env)
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert "manifests/dark-champion-18b.toml -> gguf-dark-champion-18b" in lines
    assert f"  model     {repo} @ {commit[:12]} (Q8_0, {gguf.stat().st_size / 2**30:.1f} GiB)" in lines
    assert any(line.startswith("  GPU       H100 (fallbacks: ") for line in lines), result.out
    assert f"  app file  {out / 'gguf_dark_champion_18b.py'}" in lines
    assert (out / "gguf_dark_champion_18b.py").is_file()
    assert lines[-1] == f"dry run: nothing was deployed; 1 app file(s) rendered in {out}/"
    claims = [line for line in lines if re.search(r"\bdeployed\b", line) and "nothing was deployed" not in line]
    assert claims == []


# ## status


def test_status_joins_manifests_with_live_apps():
    same, drift, absent, broken = manifests("same", "drift", "absent", "broken")
    apps = [
        live(same, config_of(same)),
        live(drift, "0123456789abcdef"),
        live(broken, "0123456789abcdef"),
        LiveApp(
            "gguf-old-model",
            "ap-old",
            "deployed",
            {"managed-by": "gguf-deploy", "manifest": "old-model", "config": "feedfeedfeedfeed"},
        ),
        LiveApp("gguf-someone-elses", "ap-else", "deployed", {"config": "abc"}),
        LiveApp("other-app", "ap-other", "deployed", {}),
    ]
    rows = app_status([same, drift, absent, broken], apps, plan_one=planner(broken={"broken"}), prefix="gguf")
    states = {row.app_name: (row.state, row.live_config) for row in rows}
    assert states == {
        "gguf-same": ("deployed", config_of(same)),
        "gguf-drift": ("drifted", "0123456789abcdef"),
        "gguf-absent": ("not deployed", ""),
        "gguf-broken": ("unknown", "0123456789abcdef"),
        "gguf-old-model": ("orphan", "feedfeedfeedfeed"),
        "gguf-someone-elses": ("unmanaged", "abc"),
    }
    assert "trained context" in next(r.detail for r in rows if r.state == "unknown")


@pytest.mark.parametrize(
    ("args", "listed"),
    [
        pytest.param([], [("gguf-alpha", "not deployed"), ("gguf-gone", "orphan")], id="every-manifest"),
        pytest.param(["manifests"], [("gguf-alpha", "not deployed"), ("gguf-gone", "orphan")], id="the-folder"),
        # beta's app is live, but beta was not asked about: it must not be called an orphan
        pytest.param(["manifests/alpha.toml"], [("gguf-alpha", "not deployed")], id="a-subset-lists-no-orphans"),
    ],
)
def test_status_command_json(tmp_path, monkeypatch, args, listed):
    folder = tmp_path / "manifests"
    folder.mkdir()
    for name in ("alpha", "beta"):
        (folder / f"{name}.toml").write_text(
            f'name = "{name}"\nrepo = "org/m"\nfile = "m-Q8_0.gguf"\nquant = "Q8_0"\ncontext = 4096\n'
        )
    monkeypatch.chdir(tmp_path)
    managed = {"managed-by": "gguf-deploy", "config": "1" * 16}
    client = FakeModal(apps=[LiveApp("gguf-gone", "ap-gone", "deployed", managed)])
    result = _invoke(status_cmd, [*args, "--json", "--env", "dev"], client)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [(r["app_name"], r["state"]) for r in rows if r["app_name"] != "gguf-beta"] == listed
    assert client.calls == [("list_apps", "dev", "gguf")]


# ## destroy


@pytest.mark.parametrize(
    ("args", "answer", "stopped", "code"),
    [
        pytest.param(["alpha"], "n\n", [], 1, id="asks-and-no-keeps-it"),
        pytest.param(["alpha"], "y\n", ["gguf-alpha"], 0, id="asks-and-yes-stops"),
        pytest.param(["alpha"], "", [], 1, id="no-answer-keeps-it"),
        pytest.param(["gguf-alpha", "--yes"], None, ["gguf-alpha"], 0, id="yes-skips-the-question"),
    ],
)
def test_destroy_asks_first(args, answer, stopped, code):
    (item,) = manifests("alpha")
    client = FakeModal(apps=[live(item, "1" * 16)])
    result = _invoke(destroy_cmd, args, client, input=answer)
    assert result.exit_code == code, result.output
    assert client.made("stop") == stopped
    if answer is not None:
        assert "Stop Modal app 'gguf-alpha' (ap-alpha)? Its endpoint stops answering." in result.output
    if stopped:
        assert "stopped gguf-alpha" in result.output


def test_destroy_unknown_name_suggests():
    apps = [LiveApp("gguf-alpha", "ap-1", "deployed", {})]
    with pytest.raises(
        ModalError, match=r"no deployed Modal app named 'alpah' or 'gguf-alpah'; did you mean 'gguf-alpha'\?"
    ):
        find_app("alpah", apps, "gguf")


# ## The real client against a stand-in `modal` CLI (argument lists, JSON parsing, errors)

FAKE_MODAL_CLI = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    log = Path(sys.argv[1])
    args = sys.argv[2:]
    with log.open("a") as handle:
        handle.write(json.dumps(args) + "\\n")
    if args[:2] == ["app", "list"]:
        print(json.dumps([
            {"app_id": "ap-1", "description": "gguf-alpha", "state": "deployed", "tasks": "0"},
            {"app_id": "ap-2", "description": "gguf-alpha", "state": "stopped", "tasks": "0"},
            {"app_id": "ap-3", "description": "gguf-prefetch", "state": "ephemeral", "tasks": "1"},
            {"app_id": "ap-4", "description": "someone-else", "state": "deployed", "tasks": "0"},
        ]))
    elif args[:2] == ["secret", "list"]:
        print(json.dumps([{"name": "gguf-api-key", "created_at": "2026-11-25"}]))
    elif args[0] == "deploy":
        print("Building image im-123")
        print("╭─ Error ──────────────────────────────────────╮", file=sys.stderr)
        print("│ Secret 'gguf-api-key' not found in env 'x'.   │", file=sys.stderr)
        print("╰──────────────────────────────────────────────╯", file=sys.stderr)
        sys.exit(1)
    """
)


@pytest.fixture
def stand_in(tmp_path):
    script = tmp_path / "modal_cli.py"
    script.write_text(FAKE_MODAL_CLI)
    log = tmp_path / "calls.jsonl"
    echoed: list[str] = []
    tagged: list[str] = []

    def tags_of(app_id):
        tagged.append(app_id)
        return {"config": "abc"}

    client = ModalCli([sys.executable, str(script), str(log)], echo=echoed.append, tags_of=tags_of)

    def calls():
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return client, calls, echoed, tagged


def test_real_client_lists_deployed_apps_with_tags_of_ours_only(stand_in):
    client, calls, _, tagged = stand_in
    apps = client.list_apps("staging", "gguf")
    assert apps == [
        LiveApp("gguf-alpha", "ap-1", "deployed", {"config": "abc"}),
        LiveApp("someone-else", "ap-4", "deployed", {}),
    ]
    assert tagged == ["ap-1"]
    assert calls() == [["app", "list", "--json", "--env", "staging"]]
    assert client.list_secrets(None) == {"gguf-api-key"}


def test_real_client_argument_lists_and_failure_words(stand_in, tmp_path):
    client, calls, echoed, _ = stand_in
    app_file = tmp_path / "gguf_alpha.py"
    client.prefetch(app_file, "staging")
    client.stop("gguf-alpha", None)
    with pytest.raises(ModalError) as failed:
        client.deploy(app_file, None, "0123456789abcdef")
    assert str(failed.value) == "modal deploy failed: Secret 'gguf-api-key' not found in env 'x'."
    assert calls() == [
        ["run", "--env", "staging", f"{app_file}::download_weights"],
        ["app", "stop", "--yes", "gguf-alpha"],
        ["deploy", "--tag", "0123456789abcdef", str(app_file)],
    ]
    assert "Building image im-123" in echoed, "the CLI's progress is shown while it runs"


def test_real_client_reports_a_missing_executable(tmp_path):
    client = ModalCli([str(tmp_path / "no-such-modal")])
    with pytest.raises(ModalError, match="modal app list: cannot run"):
        client.list_apps(None, "gguf")


@pytest.mark.parametrize(
    ("lines", "words"),
    [
        pytest.param(["ok", "│ Token ID is malformed │", "╰────╯"], "Token ID is malformed", id="rich-box"),
        pytest.param(
            ["Traceback (most recent call last):", 'File "x"', "ValueError: bad"], "ValueError: bad", id="trace"
        ),
        pytest.param([], "no output (see above)", id="silent"),
    ],
)
def test_last_words(lines, words):
    assert last_words(lines) == words


def test_rendering_and_deploy_modules_do_not_import_modal():
    import subprocess

    code = "import sys, deployer.render, deployer.modal_ops, deployer.cli.deploy; print('modal' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False", "modal is imported only by the calls that talk to Modal"
