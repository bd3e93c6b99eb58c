"""The GitHub Actions workflows: valid, safe, and running the chain the tests run.

Both workflows call ``.github/scripts/gitops.sh``; the tests below run that same script in real
git repositories against the fake hub, and check that the workflows call nothing else to plan,
deploy or destroy, so what CI does cannot drift from what is tested here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from deployer.changes import ZERO_COMMIT
from tests import ggufgen
from tests.conftest import ROOT
from tests.gitrepo import GIT_ENV, Repo, manifest

WORKFLOWS = ROOT / ".github" / "workflows"
SCRIPT = ROOT / ".github" / "scripts" / "gitops.sh"
PULL_REQUEST = WORKFLOWS / "pull-request.yml"
DEPLOY = WORKFLOWS / "deploy.yml"
BIN = Path(sys.executable).parent  # check-jsonschema and zizmor come with the test extra


def _load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as true
    return data


def _steps(workflow: dict[str, Any]) -> list[dict[str, Any]]:
    return [step for job in workflow["jobs"].values() for step in job["steps"]]


def _tool(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / name), *args], cwd=ROOT, capture_output=True, text=True, check=False)


# ## Offline linters


def test_workflows_match_the_github_workflow_schema():
    result = _tool("check-jsonschema", "--builtin-schema", "vendor.github-workflows", str(PULL_REQUEST), str(DEPLOY))
    assert result.returncode == 0, result.stdout + result.stderr


def test_zizmor_reports_no_findings():
    result = _tool("zizmor", "--offline", "--persona", "pedantic", str(WORKFLOWS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No findings to report" in result.stdout


def test_zizmor_would_catch_an_injection(tmp_path):
    # The check above can fail: the same run flags a pasted-in pull-request title.
    bad = tmp_path / "bad.yml"
    bad.write_text(
        "on: pull_request\npermissions: {}\njobs:\n  x:\n    runs-on: ubuntu-latest\n    steps:\n"
        '      - run: echo "${{ github.event.pull_request.title }}"\n',
        encoding="utf-8",
    )
    result = _tool("zizmor", "--offline", str(bad))
    assert result.returncode != 0
    assert "template-injection" in result.stdout


# ## What the workflows promise


@pytest.mark.parametrize("path", [PULL_REQUEST, DEPLOY], ids=["pull-request", "deploy"])
def test_actions_are_pinned_and_credentials_not_persisted(path):
    for step in _steps(_load(path)):
        if "uses" in step:
            assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", step["uses"]), step["uses"]
        if step.get("uses", "").startswith("actions/checkout@"):
            assert step["with"]["persist-credentials"] is False
            assert step["with"]["fetch-depth"] == 0  # `changed` needs the base commit


@pytest.mark.parametrize("path", [PULL_REQUEST, DEPLOY], ids=["pull-request", "deploy"])
def test_no_expression_inside_run(path):
    for step in _steps(_load(path)):
        assert "${{" not in step.get("run", ""), step["run"]


@pytest.mark.parametrize(("path", "mode"), [(PULL_REQUEST, "plan"), (DEPLOY, "deploy")], ids=["pull-request", "deploy"])
def test_workflow_runs_the_tested_script(path, mode):
    runs = [step["run"] for step in _steps(_load(path)) if "run" in step]
    assert f"bash .github/scripts/gitops.sh {mode}" in runs
    for run in runs:  # nothing plans, deploys or destroys outside the script
        assert not re.search(r"(?m)(^|[;&|(]\s*)gguf-deploy\s", run), run


def test_pull_requests_run_without_secrets_or_write_access():
    workflow = _load(PULL_REQUEST)
    text = yaml.safe_dump(workflow)  # without the comments, which explain these very words
    assert list(workflow["on"]) == ["pull_request"]
    assert "pull_request_target" not in text
    assert "secrets." not in text
    assert workflow["permissions"] == {}
    assert workflow["jobs"]["plan"]["permissions"] == {"contents": "read"}
    assert workflow["jobs"]["comment"]["permissions"] == {"pull-requests": "write"}
    assert "github.event.pull_request.head.repo.full_name == github.repository" in workflow["jobs"]["comment"]["if"]
    steps = workflow["jobs"]["plan"]["steps"]
    runs = [step["run"] for step in steps if "run" in step]
    assert "python -m pip install -e '.[test]'" in runs  # no llama.cpp compile
    assert 'python -m pytest -m "not model and not convert"' in runs
    upload = next(step for step in steps if step.get("uses", "").startswith("actions/upload-artifact@"))
    assert upload["with"]["path"] == "${{ runner.temp }}/gitops/summary.md"  # where gitops.sh writes it


def test_deploy_queues_one_run_at_a_time_with_production_secrets():
    workflow = _load(DEPLOY)
    assert workflow["on"] == {"push": {"branches": ["main"]}, "workflow_dispatch": None}
    assert workflow["concurrency"]["cancel-in-progress"] is False
    assert workflow["permissions"] == {"contents": "read"}
    job = workflow["jobs"]["deploy"]
    assert job["environment"] == "production"
    assert job["permissions"] == {"contents": "read", "actions": "read"}
    deploy_step = next(step for step in job["steps"] if step.get("run") == "bash .github/scripts/gitops.sh deploy")
    assert deploy_step["env"]["MODAL_TOKEN_ID"] == "${{ secrets.MODAL_TOKEN_ID }}"
    assert deploy_step["env"]["MODAL_TOKEN_SECRET"] == "${{ secrets.MODAL_TOKEN_SECRET }}"
    secret_steps = [step for step in _steps(workflow) if "secrets." in str(step)]
    assert secret_steps == [deploy_step]  # the token reaches one step only


# ## The chain itself, in real git repositories, against the fake hub

STEMS = ("alpha", "beta", "gamma")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gguf")
    return ggufgen.write_gguf(folder / "tiny.gguf", ggufgen.with_quant(ggufgen.TINY_LLAMA, "Q8_0"), header_only=True)


@pytest.fixture
def repo(tmp_path, fake_hub, tiny_gguf) -> Repo:
    """A manifests repository like this one: two manifests, the deployer, a template, the schema."""
    for stem in STEMS:
        fake_hub.add_repo(f"owner/{stem}-GGUF", {f"{stem}-Q8_0.gguf": tiny_gguf})
    repo = Repo(tmp_path / "repo")
    repo.write("manifests/alpha.toml", manifest("alpha"))
    repo.write("manifests/beta.toml", manifest("beta"))
    repo.write("deployer/gpus.toml", "[gpus]\n")
    repo.write("templates/modal_app.py", "# the app\n")
    repo.write("schema/manifest.schema.json", "{}\n")
    repo.commit("start")
    return repo


def _run(repo: Repo, mode: str, base: str, head: str = "HEAD", **env: str) -> subprocess.CompletedProcess[str]:
    """Run the workflows' script as a workflow step does: environment in, no arguments but the mode."""
    full_env = {
        **os.environ,
        **GIT_ENV,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",  # `gguf-deploy` as installed by pip
        "GITOPS_BASE": base,
        "GITOPS_HEAD": head,
        "GITOPS_OUT": str(repo.path.parent / "out"),
        "GITHUB_STEP_SUMMARY": str(repo.path.parent / "step-summary.md"),
        "GITOPS_DRY_RUN": "1",
        "NO_COLOR": "1",
        "COLUMNS": "200",
        **env,
    }
    proc = subprocess.run(
        ["bash", str(SCRIPT), mode], cwd=repo.path, env=full_env, capture_output=True, text=True, timeout=300
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def _planned(summary: str) -> list[str]:
    """Manifest names in the plan table of the summary."""
    return [name for name in re.findall(r"^\| ([a-z0-9-]+) \| ", summary, flags=re.M) if name != "model"]


CHAIN = [
    pytest.param([("write", "manifests/gamma.toml", manifest("gamma"))], ["gamma-q8-0"], [], id="add"),
    pytest.param([("write", "manifests/alpha.toml", manifest("alpha", context=2048))], ["alpha-q8-0"], [], id="modify"),
    pytest.param([("rm", "manifests/beta.toml")], [], ["gguf-beta-q8-0"], id="delete"),
    pytest.param([("mv", "manifests/alpha.toml", "manifests/team/alpha.toml")], ["alpha-q8-0"], [], id="rename"),
    pytest.param(
        [("write", "templates/modal_app.py", "# the app, changed\n")],
        ["alpha-q8-0", "beta-q8-0"],
        [],
        id="template-change-plans-everything",
    ),
]


@pytest.mark.parametrize(("ops", "planned", "destroyed"), CHAIN)
def test_the_workflow_chain(repo, ops, planned, destroyed):
    base = repo.git("rev-parse", "HEAD")
    repo.apply(ops)
    repo.commit()
    out = repo.path.parent / "out"

    pr = _run(repo, "plan", base)
    assert pr.returncode == 0, pr.stdout + pr.stderr
    summary = (out / "summary.md").read_text(encoding="utf-8")
    assert summary.startswith("<!-- gguf-deploy-plan -->\n### Changed manifests\n")
    assert _planned(summary) == planned
    assert summary.endswith(f"{len(planned)} planned, 0 failed.\n" if planned else "No manifest to plan.\n")
    assert (repo.path.parent / "step-summary.md").read_text(encoding="utf-8") == summary
    assert "valid manifest(s)" in pr.stdout  # validate ran

    merged = _run(repo, "deploy", base)
    assert merged.returncode == 0, merged.stdout + merged.stderr
    if planned:
        assert f"dry run: nothing was deployed; {len(planned)} app file(s) rendered" in merged.stdout
        rendered = sorted(p.name for p in (repo.path / "rendered").iterdir())
        assert rendered == sorted(f"gguf_{name.replace('-', '_')}.py" for name in planned)
    else:
        assert "dry run: nothing was deployed" not in merged.stdout  # deploy did not even run
    would = re.findall(r"^dry run: would destroy (\S+), if it is live$", merged.stdout, flags=re.M)
    assert would == destroyed
    assert "orphaned" not in merged.stdout


def test_the_chain_after_a_force_push_syncs_everything(tmp_path, repo):
    before = repo.commit("pushed, then rewritten away")
    repo.git("reset", "-q", "--hard", "HEAD~1")
    repo.write("manifests/gamma.toml", manifest("gamma"))
    repo.commit("the rewritten history")
    clone = Repo(tmp_path / "clone", init=False)
    Repo(tmp_path, init=False).git("clone", "-q", "--no-local", str(repo.path), "clone")

    pr = _run(clone, "plan", before)
    assert pr.returncode == 0, pr.stdout + pr.stderr
    assert f"the base commit {before[:12]} is not in this clone" in pr.stdout
    assert _planned((tmp_path / "out" / "summary.md").read_text(encoding="utf-8")) == [
        "alpha-q8-0", "beta-q8-0", "gamma-q8-0"
    ]  # fmt: skip
    merged = _run(clone, "deploy", before)
    assert merged.returncode == 0, merged.stdout + merged.stderr
    assert "dry run: nothing was deployed; 3 app file(s) rendered" in merged.stdout
    assert "dry run: would destroy every orphaned app that 'gguf-deploy status' lists" in merged.stdout


def test_an_invalid_manifest_stops_the_chain_before_any_plan_or_deploy(repo):
    base = repo.git("rev-parse", "HEAD")
    repo.write("manifests/gamma.toml", manifest("gamma") + "contxt = 1\n")
    repo.rm("manifests/beta.toml")
    repo.commit()
    for mode in ("plan", "deploy"):
        result = _run(repo, mode, base)
        assert result.returncode == 1
        assert "manifests/gamma.toml:9: contxt: unknown key; did you mean 'context'?" in result.stderr
        assert "planned" not in result.stdout
        assert "dry run" not in result.stdout  # nothing deployed, nothing destroyed
    assert not (repo.path / "rendered").exists()


def test_a_manifest_that_does_not_plan_fails_the_pull_request_with_its_summary(repo):
    base = repo.git("rev-parse", "HEAD")
    repo.write("manifests/gamma.toml", manifest("gamma", context=65536))  # the model was trained on 4096
    repo.commit()
    result = _run(repo, "plan", base)
    assert result.returncode == 1
    summary = (repo.path.parent / "out" / "summary.md").read_text(encoding="utf-8")
    assert "context: 65536 exceeds the model's trained context 4096" in summary
    assert summary.endswith("0 planned, 1 failed.\n")


# ## The destroying half, with Modal stood in for

# `gguf-deploy` with a stand-in for Modal: deploy, status and destroy are recorded, status
# answers from $SHIM_STATUS and deploy fails when $SHIM_DEPLOY_FAILS is set; any other
# command is the real one (changed, validate).
SHIM = """#!/usr/bin/env bash
case "$1" in
  deploy | destroy | status) printf '%s\\n' "$*" >>"$SHIM_LOG" ;;&
  deploy) [[ -z "${SHIM_DEPLOY_FAILS:-}" ]] ;;
  status) cat "$SHIM_STATUS" ;;
  destroy) ;;
  *) exec "$SHIM_REAL" "$@" ;;
esac
"""


@pytest.mark.parametrize(
    ("ops", "zero_base", "orphans", "deploy_fails", "calls"),
    [
        pytest.param(
            [("rm", "manifests/beta.toml")],
            False,
            ["gguf-beta-q8-0", "gguf-stray"],
            False,
            ["status --offline --json", "destroy --yes -- gguf-beta-q8-0"],
            id="removed-app-destroyed-stray-left",
        ),
        pytest.param([("rm", "manifests/beta.toml")], False, [], False, ["status --offline --json"], id="already-gone"),
        pytest.param(
            [("rm", "manifests/beta.toml"), ("write", "manifests/gamma.toml", manifest("gamma"))],
            False,
            ["gguf-beta-q8-0"],
            True,
            ["deploy -- manifests/gamma.toml"],
            id="failed-deploy-destroys-nothing",
        ),
        pytest.param(
            [],
            True,
            ["gguf-stray"],
            False,
            [
                "deploy -- manifests/alpha.toml manifests/beta.toml",
                "status --offline --json",
                "destroy --yes -- gguf-stray",
            ],
            id="full-sync-prunes-orphans",
        ),
    ],
)
def test_the_deploy_chain_destroys_only_what_is_due(tmp_path, repo, ops, zero_base, orphans, deploy_fails, calls):
    shim = tmp_path / "shim" / "gguf-deploy"
    shim.parent.mkdir()
    shim.write_text(SHIM, encoding="utf-8")
    shim.chmod(0o755)
    log, status = tmp_path / "modal.log", tmp_path / "status.json"
    rows = [{"app_name": "gguf-alpha-q8-0", "state": "deployed"}] + [
        {"app_name": a, "state": "orphan"} for a in orphans
    ]
    status.write_text(json.dumps(rows), encoding="utf-8")
    base = ZERO_COMMIT if zero_base else repo.git("rev-parse", "HEAD")
    repo.apply(ops)
    repo.commit()

    env = {"SHIM_LOG": str(log), "SHIM_STATUS": str(status), "SHIM_REAL": str(BIN / "gguf-deploy")}
    if deploy_fails:
        env["SHIM_DEPLOY_FAILS"] = "1"
    path = f"{shim.parent}{os.pathsep}{BIN}{os.pathsep}{os.environ['PATH']}"
    result = _run(repo, "deploy", base, GITOPS_DRY_RUN="", PATH=path, **env)

    assert result.returncode == (1 if deploy_fails else 0), result.stdout + result.stderr
    assert log.read_text(encoding="utf-8").splitlines() == calls
    notes = re.findall(r"^note: (\S+) is live with no manifest", result.stdout, flags=re.M)
    assert notes == (["gguf-stray"] if "gguf-stray" in orphans and not zero_base else [])
    if deploy_fails:
        assert "note: a deploy failed, so no app was destroyed" in result.stderr


# ## The plan comment, with GitHub's API stood in for

# `gh` records each call and the body file it sends; `api ... comments` (the lookup) answers
# $GH_EXISTING, the id of an earlier plan comment or nothing.
GH_SHIM = """#!/usr/bin/env bash
printf '%s\\n' "$*" >>"$GH_LOG"
for arg in "$@"; do [[ "$arg" == body=@* ]] && cp "${arg#body=@}" "$GH_BODY"; done
[[ "$*" == *"/comments --jq"* ]] && printf '%s' "${GH_EXISTING:-}"
exit 0
"""


def _comment_step() -> str:
    job = _load(PULL_REQUEST)["jobs"]["comment"]
    return next(step["run"] for step in job["steps"] if "run" in step)


@pytest.mark.parametrize(
    ("summary", "existing", "method"),
    [
        pytest.param("<!-- gguf-deploy-plan -->\n## Plan\nno changes\n", "", "POST", id="first-comment"),
        pytest.param("<!-- gguf-deploy-plan -->\n" + "é模" * 40_000, "42", "PATCH", id="long-plan-updates-comment"),
    ],
)
def test_the_plan_comment_step(tmp_path, summary, existing, method):
    (tmp_path / "plan").mkdir()
    (tmp_path / "plan" / "summary.md").write_text(summary, encoding="utf-8")
    shim = tmp_path / "bin" / "gh"
    shim.parent.mkdir()
    shim.write_text(GH_SHIM, encoding="utf-8")
    shim.chmod(0o755)
    log, body = tmp_path / "gh.log", tmp_path / "sent.md"
    env = {
        **os.environ,
        "PATH": f"{shim.parent}{os.pathsep}{os.environ['PATH']}",
        "GH_LOG": str(log),
        "GH_BODY": str(body),
        "GH_EXISTING": existing,
        "REPO": "acme/models",
        "PR": "7",
    }
    done = subprocess.run(["bash", "-e", "-c", _comment_step()], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    calls = log.read_text(encoding="utf-8").splitlines()
    assert calls[-1].startswith(f"api --method {method} repos/acme/models/")
    assert calls[-1].endswith("comments/42 -F body=@body.md" if existing else "issues/7/comments -F body=@body.md")
    sent = body.read_text(encoding="utf-8")  # whole characters: a byte cut would fail to decode here
    assert sent.startswith("<!-- gguf-deploy-plan -->")  # the marker the next run finds it by
    if len(summary) > 65_536:
        assert len(sent) <= 65_536 and sent.endswith("the whole plan is in this run's job summary.\n")
    else:
        assert sent == summary
