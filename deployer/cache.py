"""The on-disk cache of resolved model facts, so that a repeated plan makes no network call.

Two kinds of entry, both small JSON files written atomically (temp file + rename):

    facts/<key>.json   ModelFacts of (repo, commit, file): a commit never changes, so never stale
    projector/<key>.json  ProjectorFacts of an mmproj file (repo, commit, file), likewise
    refs/<key>.json    the commit a (repo, revision) resolved to last: what ``--offline`` uses

The folder is ``$GGUF_DEPLOY_CACHE``, else ``$XDG_CACHE_HOME/gguf-deploy``, else
``~/.cache/gguf-deploy`` (:func:`default_cache_dir`). An unreadable or foreign entry is a miss.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from deployer.atomic import write_atomic
from deployer.errors import HubError
from deployer.facts import Conversion, GgufHeader, ModelFacts, ProjectorFacts, ShardFacts, TensorInfo

CACHE_ENV = "GGUF_DEPLOY_CACHE"
FORMAT = 2  # bump when the stored shape of ModelFacts changes: old entries become misses


def default_cache_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """Where the cache lives: ``$GGUF_DEPLOY_CACHE``, else the user's cache folder."""
    if environ.get(CACHE_ENV):
        return Path(environ[CACHE_ENV])
    base = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gguf-deploy"


class FactsCache:
    """Model facts by (repo, commit, file) and commits by (repo, revision), on disk."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def facts(self, repo: str, commit: str, file: str) -> ModelFacts | None:
        """The cached facts, or None."""
        data = self._read("facts", repo, commit, file)
        if data is None or data.get("key") != [repo, commit, file]:
            return None
        try:
            return _facts_from_json(data["facts"])
        except (KeyError, TypeError, ValueError):
            return None  # written by another version: a miss, refetched and overwritten

    def put_facts(self, facts: ModelFacts) -> None:
        key = [facts.repo, facts.commit, facts.file]
        self._write("facts", key, {"key": key, "facts": _facts_to_json(facts)})

    def projector(self, repo: str, commit: str, file: str) -> ProjectorFacts | None:
        """The cached facts of an mmproj file, or None."""
        data = self._read("projector", repo, commit, file)
        if data is None or data.get("key") != [repo, commit, file]:
            return None
        try:
            return ProjectorFacts(**data["projector"])
        except (KeyError, TypeError, ValueError):
            return None

    def put_projector(self, repo: str, commit: str, facts: ProjectorFacts) -> None:
        key = [repo, commit, facts.file]
        self._write("projector", key, {"key": key, "projector": asdict(facts)})

    def commit(self, repo: str, revision: str) -> str | None:
        """The commit ``revision`` resolved to when last online, or None."""
        data = self._read("refs", repo, revision)
        if data is None or data.get("key") != [repo, revision] or not isinstance(data.get("commit"), str):
            return None
        return data["commit"]

    def put_commit(self, repo: str, revision: str, commit: str) -> None:
        self._write("refs", [repo, revision], {"key": [repo, revision], "commit": commit})

    def _path(self, kind: str, *key: str) -> Path:
        # hashed names: repo and file names may hold '/' and characters a file system dislikes
        digest = hashlib.sha256("\0".join(key).encode()).hexdigest()
        return self.folder / kind / f"{digest}.json"

    def _read(self, kind: str, *key: str) -> dict[str, Any] | None:
        try:
            data = json.loads(self._path(kind, *key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) and data.get("format") == FORMAT else None

    def _write(self, kind: str, key: list[str], data: dict[str, Any]) -> None:
        target = self._path(kind, *key)
        try:  # atomic: a reader sees the old entry or the new one
            write_atomic(target, json.dumps({"format": FORMAT, **data}, separators=(",", ":")))
        except OSError as exc:  # a full disk, a read-only folder, a file where the folder should be
            raise HubError(
                f"cannot write the cache in {self.folder}: {exc.strerror or exc}; set {CACHE_ENV} to a writable folder"
            ) from exc


def _facts_to_json(facts: ModelFacts) -> dict[str, Any]:
    header = asdict(facts.header)
    header["tensors"] = [[t.name, list(t.shape), t.ggml_type, t.n_bytes] for t in facts.header.tensors]
    return {
        "repo": facts.repo,
        "revision": facts.revision,
        "commit": facts.commit,
        "shards": [asdict(s) for s in facts.shards],
        "header": header,
        "conversion": asdict(facts.conversion) if facts.conversion else None,
    }


def _facts_from_json(data: dict[str, Any]) -> ModelFacts:
    header = dict(data["header"])
    header["tensors"] = tuple(TensorInfo(n, tuple(s), t, b) for n, s, t, b in header["tensors"])
    for name in ("head_count", "head_count_kv", "swa_layers"):
        header[name] = tuple(header[name])
    return ModelFacts(
        repo=data["repo"],
        revision=data["revision"],
        commit=data["commit"],
        shards=tuple(ShardFacts(**s) for s in data["shards"]),
        header=GgufHeader(**header),
        conversion=_conversion_from_json(data.get("conversion")),
    )


def _conversion_from_json(data: dict[str, Any] | None) -> Conversion | None:
    if data is None:
        return None
    return Conversion(**{**data, "files": tuple(ShardFacts(**f) for f in data["files"])})
