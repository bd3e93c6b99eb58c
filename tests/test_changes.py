"""`gguf-deploy changed`: the manifests changed between two commits of a real git repository."""

from __future__ import annotations

import json
import os

import pytest

from deployer.changes import ZERO_COMMIT, DiffEntry, changed_manifests, classify, parse_raw_diff, source_commit
from deployer.errors import GitError
from tests.gitrepo import Repo, manifest, run_cli_in

# The repository every case starts from: two manifests, the deployer, a template, the schema.
START = {
    "manifests/alpha.toml": manifest("alpha"),
    "manifests/beta.toml": manifest("beta"),
    "deployer/gpus.toml": "[gpus]\n",
    "deployer/plan.py": "PLAN = 1\n",
    "templates/modal_app.py.tmpl": "# app\n",
    "schema/manifest.schema.json": "{}\n",
    "README.md": "# models\n",
}
ALL = ("manifests/alpha.toml", "manifests/beta.toml")


@pytest.fixture
def repo(tmp_path):
    repo = Repo(tmp_path / "repo")
    for path, text in START.items():
        repo.write(path, text)
    repo.commit("start")
    return repo


def _row(ops, *, added=(), modified=(), deleted=(), renamed=(), deploy=(), remove=(), everything=False, id):
    expected = {
        "added": list(added),
        "modified": list(modified),
        "deleted": list(deleted),
        "renamed": [{"from": a, "to": b} for a, b in renamed],
        "deploy": list(deploy),
        "remove": list(remove),
        "everything": everything,
    }
    return pytest.param(ops, expected, id=id)


CASES = [
    _row(
        [("write", "manifests/gamma.toml", manifest("gamma"))],
        added=["manifests/gamma.toml"],
        deploy=["manifests/gamma.toml"],
        id="add",
    ),
    _row(
        [("write", "manifests/alpha.toml", manifest("alpha", context=8192))],
        modified=["manifests/alpha.toml"],
        deploy=["manifests/alpha.toml"],
        id="modify",
    ),
    _row(
        [("rm", "manifests/beta.toml")],
        deleted=["manifests/beta.toml"],
        remove=["gguf-beta-q8-0"],
        id="delete-removes-its-app",
    ),
    _row(
        [("mv", "manifests/alpha.toml", "manifests/renamed.toml")],
        renamed=[("manifests/alpha.toml", "manifests/renamed.toml")],
        deploy=["manifests/renamed.toml"],
        id="rename-keeps-the-app",
    ),
    _row(
        [
            ("mv", "manifests/alpha.toml", "manifests/renamed.toml"),
            ("write", "manifests/renamed.toml", manifest("alpha", context=8192)),
        ],
        renamed=[("manifests/alpha.toml", "manifests/renamed.toml")],
        deploy=["manifests/renamed.toml"],
        id="rename-and-modify",
    ),
    _row(
        [
            ("mv", "manifests/alpha.toml", "manifests/renamed.toml"),
            ("write", "manifests/renamed.toml", manifest("alpha", name="omega")),
        ],
        renamed=[("manifests/alpha.toml", "manifests/renamed.toml")],
        deploy=["manifests/renamed.toml"],
        remove=["gguf-alpha-q8-0"],
        id="rename-with-a-new-name-removes-the-old-app",
    ),
    _row(
        [("write", "manifests/alpha.toml", manifest("alpha", name="omega"))],
        modified=["manifests/alpha.toml"],
        deploy=["manifests/alpha.toml"],
        remove=["gguf-alpha-q8-0"],
        id="modify-the-name-removes-the-old-app",
    ),
    _row(
        [("rm", "manifests/beta.toml"), ("write", "manifests/alpha.toml", manifest("beta"))],
        modified=["manifests/alpha.toml"],
        deleted=["manifests/beta.toml"],
        deploy=["manifests/alpha.toml"],
        remove=["gguf-alpha-q8-0"],
        id="app-moved-to-another-manifest-is-not-removed",
    ),
    _row(
        [("write", "templates/modal_app.py.tmpl", "# app, changed\n")],
        deploy=ALL,
        everything=True,
        id="template-change-means-every-manifest",
    ),
    _row(
        [("write", "deployer/gpus.toml", "[gpus]\n# new prices\n")],
        deploy=ALL,
        everything=True,
        id="gpu-data-change-means-every-manifest",
    ),
    _row(
        [("write", "deployer/plan.py", "PLAN = 2\n")],
        deploy=ALL,
        everything=True,
        id="deployer-change-means-every-manifest",
    ),
    _row(
        [("write", "schema/manifest.schema.json", '{"x": 1}\n')],
        deploy=ALL,
        everything=True,
        id="schema-change-means-every-manifest",
    ),
    _row(
        [("write", "templates/modal_app.py.tmpl", "# v2\n"), ("rm", "manifests/beta.toml")],
        deleted=["manifests/beta.toml"],
        deploy=["manifests/alpha.toml"],
        remove=["gguf-beta-q8-0"],
        everything=True,
        id="template-change-and-delete",
    ),
    _row(
        [
            ("write", "README.md", "# models, edited\n"),
            ("write", "manifests/README.md", "how to add a model\n"),
            ("write", "docs/example.toml", manifest("docs")),
            ("write", "tests/test_x.py", "x = 1\n"),
            ("write", ".github/workflows/x.yml", "on: push\n"),
        ],
        id="non-manifest-files-ignored",
    ),
    _row(
        [("write", "manifests/team/delta.toml", manifest("delta"))],
        added=["manifests/team/delta.toml"],
        deploy=["manifests/team/delta.toml"],
        id="nested-manifest-added",
    ),
    _row(
        [("mv", "manifests/beta.toml", "attic/beta.toml")],
        deleted=["manifests/beta.toml"],
        remove=["gguf-beta-q8-0"],
        id="moved-out-of-manifests-is-a-deletion",
    ),
    _row([], id="empty-commit-changes-nothing"),
]


@pytest.mark.parametrize(("ops", "expected"), CASES)
def test_changed_in_every_git_case(repo, ops, expected):
    base = repo.git("rev-parse", "HEAD")
    repo.apply(ops)
    head = repo.commit()
    changes = changed_manifests(base, head, where=repo.path).to_json()
    got = {key: changes[key] for key in expected}
    got["remove"] = [r["app"] for r in changes["remove"]]
    assert got == expected
    assert (changes["base_commit"], changes["head_commit"], changes["prune_orphans"]) == (base, head, False)
    assert bool(changes["reasons"]) == expected["everything"]


def test_moved_into_manifests_is_an_addition(repo):
    repo.write("attic/zeta.toml", manifest("zeta"))
    base = repo.commit()
    repo.mv("attic/zeta.toml", "manifests/zeta.toml")
    changes = changed_manifests(base, repo.commit(), where=repo.path)
    assert (changes.added, changes.deleted, changes.renamed) == (("manifests/zeta.toml",), (), ())


def test_reason_names_the_file_that_changed_everything(repo):
    base = repo.git("rev-parse", "HEAD")
    repo.write("deployer/gpus.toml", "[gpus]\n# H100 price\n")
    repo.commit()
    result = run_cli_in(repo.path, "changed", "--base", base, "--head", "HEAD")
    assert result.code == 0, result.err
    assert "every manifest: deployer/gpus.toml changed" in result.out
    assert "deploy: manifests/alpha.toml manifests/beta.toml" in result.out


def test_all_zero_base_means_every_manifest_and_pruning(repo):
    result = run_cli_in(repo.path, "changed", "--base", ZERO_COMMIT, "--head", "HEAD", "--json")
    assert result.code == 0, result.err
    changes = json.loads(result.out)
    assert changes["deploy"] == list(ALL)
    assert (changes["everything"], changes["prune_orphans"], changes["base_commit"]) == (True, True, None)
    assert "all-zero commit" in changes["reasons"][0]


def test_unreachable_base_after_a_force_push(tmp_path):
    # Like CI after a force push: "before" was rewritten away upstream, so a fresh clone lacks it.
    upstream = Repo(tmp_path / "upstream")
    upstream.write("manifests/alpha.toml", manifest("alpha"))
    upstream.commit("one")
    upstream.write("manifests/beta.toml", manifest("beta"))
    before = upstream.commit("two")
    upstream.git("reset", "-q", "--hard", "HEAD~1")
    upstream.write("manifests/gamma.toml", manifest("gamma"))
    after = upstream.commit("two, rewritten")
    clone = Repo(tmp_path / "clone", init=False)
    Repo(tmp_path, init=False).git("clone", "-q", "--no-local", str(upstream.path), "clone")
    assert before not in clone.git("rev-list", "--all")

    result = run_cli_in(clone.path, "changed", "--base", before, "--head", after, "--json")
    assert result.code == 0, result.err
    changes = json.loads(result.out)
    assert changes["deploy"] == ["manifests/alpha.toml", "manifests/gamma.toml"]
    assert (changes["everything"], changes["prune_orphans"]) == (True, True)
    assert f"the base commit {before[:12]} is not in this clone" in changes["reasons"][0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(
            ["--base", "HEAD", "--head", "nope"], "unknown head ref 'nope': no such commit in {}", id="bad-head"
        ),
        pytest.param(["--base", "nope"], "unknown base ref 'nope': no such commit in {}", id="bad-base-name"),
        pytest.param(
            ["--base", "abc1234"], "unknown base ref 'abc1234': no such commit in {}", id="short-id-is-a-typo"
        ),
        pytest.param(["--base=--output=x"], "base ref '--output=x' is not a valid git ref", id="option-as-ref"),
    ],
)
def test_bad_refs_are_one_clear_line(repo, args, message):
    result = run_cli_in(repo.path, "changed", *args)
    assert (result.code, result.err) == (1, f"error: {message.format(repo.path)}\n")


def test_not_a_repository(tmp_path, cli):
    result = cli("changed", "--base", "HEAD", cwd=tmp_path, env={"GIT_CEILING_DIRECTORIES": str(tmp_path.parent)})
    assert result.code == 1
    assert (
        result.err.strip()
        == f"error: not a git repository: {tmp_path} (run this inside a clone of the manifests repository)"
    )


def test_removal_waits_while_a_manifest_at_head_is_invalid(repo):
    base = repo.git("rev-parse", "HEAD")
    repo.rm("manifests/beta.toml")
    repo.write("manifests/alpha.toml", manifest("alpha") + "typo = 1\n")
    changes = changed_manifests(base, repo.commit(), where=repo.path)
    assert changes.deleted == ("manifests/beta.toml",)
    assert changes.remove == ()
    assert changes.notes == ("removals postponed: manifests/alpha.toml invalid at head",)


def test_paths_are_relative_to_the_current_folder(repo):
    base = repo.git("rev-parse", "HEAD")
    repo.write("manifests/gamma.toml", manifest("gamma"))
    head = repo.commit()
    changes = changed_manifests(base, head, manifests_dir=".", where=repo.path / "manifests")
    assert (changes.added, changes.deploy, changes.manifests_dir) == (("gamma.toml",), ("gamma.toml",), ".")


def test_odd_file_names_survive(repo):
    base = repo.git("rev-parse", "HEAD")
    odd = "manifests/we ird\t$(x)\nname.toml"
    repo.write(odd, manifest("odd"))
    changes = changed_manifests(base, repo.commit(), where=repo.path)
    assert changes.added == (odd,)


def test_no_change_says_so(repo):
    result = run_cli_in(repo.path, "changed", "--base", "HEAD", "--head", "HEAD")
    assert result.code == 0
    assert "(no manifest changed)" in result.out
    assert "deploy: (nothing)" in result.out


# ## The pure part


def test_parse_raw_diff_reads_renames_and_deletions():
    sha = "a" * 40
    raw = (
        f":100644 100644 {sha} {'b' * 40} R087\0manifests/a.toml\0manifests/b.toml\0"
        f":100644 000000 {sha} {'0' * 40} D\0manifests/c.toml\0"
    ).encode()
    assert parse_raw_diff(raw) == [
        DiffEntry("R", "manifests/b.toml", "manifests/a.toml", sha, "b" * 40),
        DiffEntry("D", "manifests/c.toml", None, sha, None),
    ]


def test_classify_a_type_change_is_a_modification():
    entry = DiffEntry("T", "manifests/a.toml", None, "a" * 40, "b" * 40)
    assert classify([entry], "manifests").modified == (entry,)


def test_source_commit_labels_clean_and_dirty_trees(repo, tmp_path, monkeypatch):
    head = repo.git("rev-parse", "HEAD")
    assert source_commit(repo.path / "manifests" / "alpha.toml") == head
    assert source_commit(repo.path / "manifests") == head
    repo.write("manifests/alpha.toml", manifest("alpha", context=8192))
    assert source_commit(repo.path / "manifests") == f"{head}+dirty"
    assert source_commit(repo.path / "deployer") == head, "only changes below the folder count"
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    (tmp_path / "loose").mkdir()
    assert source_commit(tmp_path / "loose" / "m.toml") is None, "outside a repository"
    assert source_commit(tmp_path / "missing" / "m.toml") is None, "a folder that does not exist"
    monkeypatch.setenv("PATH", os.devnull)
    assert source_commit(repo.path / "manifests") is None, "without git"


def test_git_missing_is_a_git_error(repo, monkeypatch):
    monkeypatch.setenv("PATH", os.devnull)
    with pytest.raises(GitError, match="git is not installed"):
        changed_manifests("HEAD", where=repo.path)
