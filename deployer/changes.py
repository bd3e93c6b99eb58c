"""The git edge: which manifests changed between two commits, and which apps they leave behind.

    changed_manifests(base, head)   → Changes   (runs git; every failure is a GitError)
    source_commit(path)             → the commit (``+dirty``) a rendered app says it came from
    parse_raw_diff(bytes)           → DiffEntry  (pure: ``git diff --raw -z`` output)
    classify(entries, ...)          → the manifest part of a diff (pure)

The answer drives CI: a pull request plans ``Changes.deploy``; a merge deploys it and destroys
``Changes.remove``. Three rules make it safe to act on:

* a change under ``deployer/``, ``templates/`` or ``schema/`` (the GPU data, ``deployer/gpus.toml``,
  included) can change any manifest's plan or app, so every manifest counts as changed;
* an all-zero base (GitHub's "before" of a first push, or a full sync) or a base commit this clone
  does not have (a force push) means nothing is known about what was deployed: every manifest
  counts, and ``prune_orphans`` asks the deployer to remove live apps no manifest produces;
* an app is removed only when its name, read from the manifest at the base commit, is produced
  by no manifest at the head commit (a deleted manifest, or a rename that changed the name).

git runs as a subprocess with argument lists; refs are resolved to commit ids before they reach
any other git command, so a ref can never be read as an option.
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from deployer.errors import GitError, ManifestInvalid
from deployer.loading import DEFAULT_MANIFESTS_DIR, parse_manifest
from deployer.manifest import DEFAULT_APP_PREFIX

ZERO_COMMIT = "0" * 40  # GitHub's "before" on the first push of a branch
# Paths (from the repository root) whose change can alter every manifest's plan or rendered app.
EVERYTHING_PREFIXES: tuple[str, ...] = ("deployer/", "templates/", "schema/")
# A full commit id (sha1 or sha256 repositories): what CI passes. A short or named ref that does
# not resolve is a typo, not a rewritten history, and stays an error.
_COMMIT_ID = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
_REGULAR_FILE_MODES = frozenset({"100644", "100755"})  # not symlinks, submodules or trees

Status = Literal["added", "modified", "deleted", "renamed"]


# ## Pure: git's raw diff, classified


@dataclass(frozen=True)
class DiffEntry:
    """One line of ``git diff --raw``: a status letter, the path(s) and the blob ids."""

    status: str  # A, M, D, R, C, T (type change) — the letter, without the rename score
    path: str  # the path at head (for a deletion, the path at base)
    old_path: str | None = None  # for a rename or copy: the path at base
    old_blob: str | None = None  # None when the file did not exist at base
    new_blob: str | None = None  # None when the file does not exist at head


def parse_raw_diff(output: bytes) -> list[DiffEntry]:
    """Parse ``git diff --raw -z --no-abbrev`` output (NUL-separated, so any file name is safe)."""
    tokens = output.split(b"\0")
    entries: list[DiffEntry] = []
    i = 0
    while i < len(tokens):
        header = tokens[i].decode("ascii", "replace")
        i += 1
        if not header:
            continue
        if not header.startswith(":"):
            raise GitError(f"unexpected output from git diff: {header[:80]!r}")
        _, _, old_blob, new_blob, status = header[1:].split(" ")
        letter = status[:1]
        paths = 2 if letter in ("R", "C") else 1
        names = [tokens[i + k].decode("utf-8", "surrogateescape") for k in range(paths)]
        i += paths
        entries.append(
            DiffEntry(
                status=letter,
                path=names[-1],
                old_path=names[0] if paths == 2 else None,
                old_blob=None if set(old_blob) == {"0"} else old_blob,
                new_blob=None if set(new_blob) == {"0"} else new_blob,
            )
        )
    return entries


def is_manifest(path: str, manifests_dir: str) -> bool:
    """Whether a repository path is a manifest: a ``*.toml`` file below the manifests folder."""
    inside = manifests_dir in ("", ".") or path.startswith(manifests_dir.rstrip("/") + "/")
    return inside and path.endswith(".toml")


def everything_triggers(entries: Iterable[DiffEntry]) -> list[str]:
    """The changed paths that make every manifest count as changed (deployer, templates, schema)."""
    found = []
    for entry in entries:
        for path in (entry.old_path, entry.path):
            if path and path.startswith(EVERYTHING_PREFIXES) and path not in found:
                found.append(path)
    return found


@dataclass(frozen=True)
class ManifestDiff:
    """The manifest part of a diff; paths are from the repository root."""

    added: tuple[DiffEntry, ...] = ()
    modified: tuple[DiffEntry, ...] = ()
    deleted: tuple[DiffEntry, ...] = ()
    renamed: tuple[DiffEntry, ...] = ()  # old_path → path


def classify(entries: Iterable[DiffEntry], manifests_dir: str) -> ManifestDiff:
    """Sort a diff into added, modified, deleted and renamed manifests; ignore other files.

    A rename into the manifests folder is an addition, a rename out of it a deletion.
    """
    out: dict[Status, list[DiffEntry]] = {"added": [], "modified": [], "deleted": [], "renamed": []}
    for entry in entries:
        new_is = entry.new_blob is not None and is_manifest(entry.path, manifests_dir)
        old_path = entry.old_path if entry.old_path is not None else entry.path
        old_is = entry.old_blob is not None and is_manifest(old_path, manifests_dir)
        if entry.status == "R" and old_is and new_is:
            out["renamed"].append(entry)
            continue
        if old_is and entry.status in ("D", "R"):
            out["deleted"].append(DiffEntry("D", old_path, None, entry.old_blob, None))
        if new_is:
            if entry.status in ("A", "C", "R"):
                out["added"].append(DiffEntry("A", entry.path, None, None, entry.new_blob))
            else:  # M, or T (a type change, e.g. a symlink replaced by a file)
                out["modified"].append(entry)
    return ManifestDiff(**{k: tuple(sorted(v, key=lambda e: e.path)) for k, v in out.items()})


# ## The result


@dataclass(frozen=True)
class Rename:
    """A manifest moved from ``old`` to ``new`` (its content may also have changed)."""

    old: str
    new: str


@dataclass(frozen=True)
class RemovedApp:
    """A Modal app that the head commit no longer produces."""

    name: str  # the manifest name at base
    app: str  # the Modal app name: <prefix>-<name>
    path: str  # the manifest at base that produced it


@dataclass(frozen=True)
class Changes:
    """The manifests changed between two commits, and what CI should do about them.

    Paths are relative to the folder the question was asked from (the repository root in CI),
    so they can be passed straight to ``plan`` and ``deploy``.
    """

    base: str  # as given
    head: str  # as given
    base_commit: str | None  # None when the base is all-zero or not in this clone
    head_commit: str
    manifests_dir: str
    added: tuple[str, ...] = ()
    modified: tuple[str, ...] = ()
    deleted: tuple[str, ...] = ()
    renamed: tuple[Rename, ...] = ()
    everything: bool = False  # every manifest at head counts as changed
    reasons: tuple[str, ...] = ()  # why everything counts
    prune_orphans: bool = False  # the base is unknown: remove live apps that no manifest produces
    deploy: tuple[str, ...] = ()  # manifests at head to plan and deploy, in order
    remove: tuple[RemovedApp, ...] = ()  # apps to destroy
    notes: tuple[str, ...] = ()  # things a person should know (removals postponed or skipped)

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` form: plain lists and strings, stable key names."""
        return {
            "base": self.base,
            "head": self.head,
            "base_commit": self.base_commit,
            "head_commit": self.head_commit,
            "manifests_dir": self.manifests_dir,
            "added": list(self.added),
            "modified": list(self.modified),
            "deleted": list(self.deleted),
            "renamed": [{"from": r.old, "to": r.new} for r in self.renamed],
            "everything": self.everything,
            "reasons": list(self.reasons),
            "prune_orphans": self.prune_orphans,
            "deploy": list(self.deploy),
            "remove": [{"name": r.name, "app": r.app, "path": r.path} for r in self.remove],
            "notes": list(self.notes),
        }


# ## The git edge


def _git(root: Path, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    git = shutil.which("git")
    if git is None:
        raise GitError("git is not installed (or not on PATH)")
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C", "GIT_OPTIONAL_LOCKS": "0"}
    try:
        return subprocess.run([git, *args], cwd=root, input=stdin, capture_output=True, env=env, check=False)
    except OSError as exc:
        raise GitError(f"cannot run git in {root}: {exc.strerror or exc}") from exc


def _git_ok(root: Path, *args: str, stdin: bytes | None = None) -> bytes:
    proc = _git(root, *args, stdin=stdin)
    if proc.returncode != 0:
        first = (proc.stderr.decode("utf-8", "replace").strip().splitlines() or ["(no message)"])[0]
        raise GitError(f"git {args[0]} failed: {first}")
    return proc.stdout


def source_commit(path: str | Path) -> str | None:
    """The commit of the repository holding ``path``, with ``+dirty`` when files below its folder
    have local changes; None outside a repository or without git (it only labels rendered apps)."""
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    try:
        head = _git(folder, "rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        dirty = _git(folder, "status", "--porcelain", "--", ".")
    except GitError:
        return None
    return head.stdout.decode().strip() + ("+dirty" if dirty.stdout.strip() else "")


def _repository(where: Path) -> tuple[Path, str]:
    """The work tree's root and ``where`` relative to it (``""`` at the root)."""
    where = where.resolve()
    if not where.is_dir():
        raise GitError(f"not a git repository: {where} is not a folder")
    proc = _git(where, "rev-parse", "--show-toplevel", "--show-prefix")
    if proc.returncode != 0:
        raise GitError(f"not a git repository: {where} (run this inside a clone of the manifests repository)")
    top, prefix = [*proc.stdout.decode("utf-8", "surrogateescape").splitlines(), ""][:2]
    return Path(top), prefix.rstrip("/")


def _resolve(root: Path, ref: str) -> str | None:
    """The commit id a ref names, or None when this clone has no such commit."""
    proc = _git(root, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{ref}^{{commit}}")
    return proc.stdout.decode().strip() if proc.returncode == 0 else None


def _check_ref(which: str, ref: str) -> None:
    if not ref or ref.startswith("-") or any(ord(c) < 32 for c in ref):
        raise GitError(f"{which} ref {ref!r} is not a valid git ref")


def _manifests_at(root: Path, commit: str, manifests_dir: str) -> dict[str, str]:
    """Every manifest file at ``commit``: repository path → blob id."""
    pathspec = "." if manifests_dir in ("", ".") else manifests_dir
    out = _git_ok(root, "ls-tree", "-r", "-z", "--full-tree", commit, "--", pathspec)
    found: dict[str, str] = {}
    for record in filter(None, out.split(b"\0")):
        meta, _, raw_path = record.partition(b"\t")
        mode, kind, blob = meta.decode("ascii").split(" ")
        path = raw_path.decode("utf-8", "surrogateescape")
        if kind == "blob" and mode in _REGULAR_FILE_MODES and is_manifest(path, manifests_dir):
            found[path] = blob
    return found


def _read_blobs(root: Path, blobs: Iterable[str]) -> dict[str, bytes]:
    """The contents of blobs, in one ``git cat-file --batch`` call."""
    wanted = list(dict.fromkeys(blobs))
    if not wanted:
        return {}
    out = _git_ok(root, "cat-file", "--batch", stdin="".join(f"{b}\n" for b in wanted).encode())
    contents: dict[str, bytes] = {}
    pos = 0
    for blob in wanted:
        end = out.index(b"\n", pos)
        header = out[pos:end].decode("ascii").split(" ")
        if len(header) != 3:
            raise GitError(f"git cat-file could not read blob {blob}")
        size = int(header[2])
        contents[blob] = out[end + 1 : end + 1 + size]
        pos = end + 1 + size + 1
    return contents


def _app_names(root: Path, blobs: dict[str, str], app_prefix: str) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """Repository path → (manifest name, app name) for the blobs that parse; the paths that do not."""
    contents = _read_blobs(root, blobs.values())
    names: dict[str, tuple[str, str]] = {}
    invalid: list[str] = []
    for path, blob in blobs.items():
        try:
            loaded = parse_manifest(contents[blob], path, app_prefix=app_prefix)
        except ManifestInvalid:
            invalid.append(path)
            continue
        names[path] = (loaded.name, loaded.app_name)
    return names, invalid


def changed_manifests(
    base: str,
    head: str = "HEAD",
    *,
    manifests_dir: str = DEFAULT_MANIFESTS_DIR,
    where: str | Path = ".",
    app_prefix: str = DEFAULT_APP_PREFIX,
) -> Changes:
    """The manifests added, modified, deleted and renamed from ``base`` to ``head``.

    ``where`` is a folder inside the repository's work tree; ``manifests_dir`` is relative to it,
    and so are the paths in the answer. Raises :class:`GitError` when ``where`` is not in a
    repository, ``head`` names no commit, or ``base`` is neither a commit, an all-zero id nor a
    commit id this clone lacks.
    """
    _check_ref("base", base)
    _check_ref("head", head)
    root, prefix = _repository(Path(where))
    repo_dir = (
        posixpath.normpath(posixpath.join(prefix, manifests_dir)) if prefix else posixpath.normpath(manifests_dir)
    )
    if repo_dir == ".." or repo_dir.startswith("../") or posixpath.isabs(repo_dir):
        raise GitError(f"manifests folder {manifests_dir!r} is outside the repository {root}")

    def shown(path: str) -> str:
        return posixpath.relpath(path, prefix) if prefix else path

    head_commit = _resolve(root, head)
    if head_commit is None:
        raise GitError(f"unknown head ref {head!r}: no such commit in {root}")
    base_commit = None if base == ZERO_COMMIT else _resolve(root, base)
    head_manifests = _manifests_at(root, head_commit, repo_dir)
    common = {
        "base": base,
        "head": head,
        "head_commit": head_commit,
        "manifests_dir": shown(repo_dir) if repo_dir != "." else ".",
    }

    if base_commit is None:
        if base != ZERO_COMMIT and not _COMMIT_ID.fullmatch(base):
            raise GitError(f"unknown base ref {base!r}: no such commit in {root}")
        why = (
            "the base is the all-zero commit (a first push, or a full sync)"
            if base == ZERO_COMMIT
            else f"the base commit {base[:12]} is not in this clone (a force push, or a shallow clone)"
        )
        return Changes(
            **common,
            base_commit=None,
            everything=True,
            reasons=(f"{why}: every manifest counts, and apps that no manifest produces are removed",),
            prune_orphans=True,
            deploy=tuple(shown(p) for p in sorted(head_manifests)),
        )

    raw = _git_ok(
        root,
        "diff", "--raw", "-z", "-M", "--no-abbrev", "--no-color", "--no-ext-diff", "--no-relative",
        base_commit, head_commit,
    )  # fmt: skip
    entries = parse_raw_diff(raw)
    diff = classify(entries, repo_dir)
    triggers = everything_triggers(entries)
    reasons: tuple[str, ...] = ()
    if triggers:
        listed = ", ".join(triggers[:3]) + (f" and {len(triggers) - 3} more" if len(triggers) > 3 else "")
        reasons = (f"{listed} changed: the deployer, its templates, schema and GPU data shape every plan",)
        deploy = sorted(head_manifests)
    else:
        deploy = sorted([e.path for e in (*diff.added, *diff.modified, *diff.renamed)])

    remove, notes = _removed_apps(root, diff, head_manifests, app_prefix)
    return Changes(
        **common,
        base_commit=base_commit,
        added=tuple(shown(e.path) for e in diff.added),
        modified=tuple(shown(e.path) for e in diff.modified),
        deleted=tuple(shown(e.path) for e in diff.deleted),
        renamed=tuple(Rename(shown(e.old_path or ""), shown(e.path)) for e in diff.renamed),
        everything=bool(triggers),
        reasons=reasons,
        deploy=tuple(shown(p) for p in deploy),
        remove=tuple(RemovedApp(r.name, r.app, shown(r.path)) for r in remove),
        notes=tuple(notes),
    )


def _removed_apps(
    root: Path, diff: ManifestDiff, head_manifests: dict[str, str], app_prefix: str
) -> tuple[list[RemovedApp], list[str]]:
    """Apps produced at base by a deleted, renamed or modified manifest and by nothing at head."""
    at_base: dict[str, str] = {}
    for entry in (*diff.deleted, *diff.renamed, *diff.modified):
        if entry.old_blob is not None:
            at_base[entry.old_path or entry.path] = entry.old_blob
    if not at_base:
        return [], []
    head_names, head_invalid = _app_names(root, head_manifests, app_prefix)
    if head_invalid:
        # An invalid manifest's app name is unknown: removing anything now could stop an app it
        # still produces. CI fails at `validate` anyway; the removal happens once it is fixed.
        return [], [f"removals postponed: {', '.join(sorted(head_invalid))} invalid at head"]
    base_names, base_invalid = _app_names(root, at_base, app_prefix)
    live = {app for _, app in head_names.values()}
    removed = [RemovedApp(name, app, path) for path, (name, app) in sorted(base_names.items()) if app not in live]
    notes = [f"{path} was invalid at base: its app, if any, is left alone" for path in sorted(base_invalid)]
    return list({r.app: r for r in removed}.values()), notes
