"""A small fake Hugging Face Hub: a real HTTP server on 127.0.0.1 that huggingface_hub talks to.

The ``fake_hub`` fixture starts one per test, points ``HF_ENDPOINT`` at it (so the CLI run in a
subprocess uses it too) and sets ``HF_HUB_OFFLINE=0``, ``HF_HUB_DISABLE_TELEMETRY=1``, a temporary
``HF_HOME`` and ``GGUF_DEPLOY_CACHE``; ``HF_TOKEN`` is removed. Files are served from disk with
HTTP Range support, so a sparse header-only GGUF of real size (tests/ggufgen.py) costs nothing.

    def test_something(fake_hub, tmp_path):
        gguf = ggufgen.write_gguf(tmp_path / "m.gguf", ggufgen.QWEN_0_5B, header_only=True)
        commit = fake_hub.add_repo("org/model", {"m.gguf": gguf, "README.md": b"hi"})
        ...                                      # plan / download against fake_hub.url
        assert fake_hub.bytes_served("org/model", "m.gguf") < 4 * 2**20

API (``FakeHub``):
    url                                 the endpoint (also in HF_ENDPOINT during the test)
    add_repo(repo, files, *, revision="main", token=None) -> commit
        files: {path in repo: Path | bytes}. Each call makes a new commit of exactly these files
        on branch ``revision`` (created if new); older commits stay resolvable by their sha.
        Files over 10 MiB, and every .gguf, are LFS files (sha256 etag, X-Linked-Size).
        ``token``: the repo is private; requests need ``Authorization: Bearer <token>``.
    tag(repo, name, commit)             add a tag
    ignore_ranges                       set True to answer every GET with the whole file (200), like
                                        a server without Range support
    requests                            every request served: Request(method, path, headers, status, sent)
    bytes_served(repo, file)            body bytes sent for one file (all revisions)
    reset()                             forget the requests and counters

Also ``sparse_gguf`` (session-scoped): ``sparse_gguf(ggufgen.DARK_CHAMPION_18B)`` writes a
header-only GGUF of real size once per session and returns its path (``sparse_gguf(spec, shards=3)``
writes a split model and returns its shard paths).

Endpoints (what huggingface_hub 2.4 calls): ``GET /api/models/{repo}[/revision/{rev}]``
(``?blobs=true`` adds sizes and LFS info), ``GET /api/models/{repo}/tree/{rev}[/{path}]``,
``GET /api/models/{repo}/refs``, ``HEAD|GET /{repo}/resolve/{rev}/{path}`` (X-Repo-Commit, ETag,
X-Linked-Etag, X-Linked-Size, Content-Length, Accept-Ranges; a GET of an LFS file redirects, as the
real hub does, to ``/_lfs/...`` on the same server, which answers Range requests with 206). Errors
carry the ``X-Error-Code`` headers huggingface_hub maps to its exceptions (RepoNotFound,
RevisionNotFound, EntryNotFound).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest

from tests import ggufgen

LFS_THRESHOLD = 10 * 1024 * 1024
REAL_HASH_MAX = 64 * 1024 * 1024  # files up to this size get their real sha256; larger ones are sparse
CHUNK = 64 * 1024


@dataclass(frozen=True)
class _File:
    path: str
    source: Path | bytes
    size: int
    git_sha1: str  # the blob id
    sha256: str | None  # LFS files only

    @property
    def etag(self) -> str:
        return self.sha256 or self.git_sha1

    def read(self, start: int, end: int) -> Iterator[bytes]:
        if isinstance(self.source, bytes):
            yield self.source[start:end]
            return
        with self.source.open("rb") as handle:
            handle.seek(start)
            left = end - start
            while left > 0:
                chunk = handle.read(min(CHUNK, left))
                if not chunk:
                    return
                left -= len(chunk)
                yield chunk


@dataclass
class _Repo:
    token: str | None = None
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit
    tags: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, _File]] = field(default_factory=dict)


class Headers(dict[str, str]):
    """Request headers, looked up case-insensitively (``headers.get("Authorization")``)."""

    def __init__(self, items: Iterable[tuple[str, str]]) -> None:
        super().__init__((k.lower(), v) for k, v in items)

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(key.lower())

    def get(self, key: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return super().get(key.lower(), default)


@dataclass(frozen=True)
class Request:
    """One request the fake hub answered."""

    method: str
    path: str
    headers: Headers
    status: int
    sent: int  # body bytes sent


def _sha256(source: Path | bytes) -> str:
    if isinstance(source, bytes):
        return hashlib.sha256(source).hexdigest()
    digest = hashlib.sha256()
    with source.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class FakeHub:
    """The server and its repositories; see the module docstring."""

    def __init__(self) -> None:
        self.repos: dict[str, _Repo] = {}
        self.requests: list[Request] = []
        self._served: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()
        self._commits = 0
        self.ignore_ranges = False
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # ## Content

    def add_repo(
        self, repo: str, files: Mapping[str, Path | bytes], *, revision: str = "main", token: str | None = None
    ) -> str:
        entries = {}
        for path, source in files.items():
            source = Path(source) if not isinstance(source, bytes) else source
            size = len(source) if isinstance(source, bytes) else source.stat().st_size
            lfs = path.endswith(".gguf") or size > LFS_THRESHOLD
            # sparse header-only models are hashed by path and size: reading 20 GB of zeros is slow
            # and the tests only need a stable, distinct sha256
            sha256 = (
                None
                if not lfs
                else (
                    _sha256(source) if size <= REAL_HASH_MAX else hashlib.sha256(f"{path}:{size}".encode()).hexdigest()
                )
            )
            git = hashlib.sha1(f"blob {size}:{path}:{sha256}".encode()).hexdigest()  # git's blob ids are sha1
            entries[path] = _File(path, source, size, git, sha256)
        with self._lock:
            self._commits += 1
            commit = hashlib.sha1(f"{repo}:{self._commits}:{sorted(entries)}".encode()).hexdigest()
            state = self.repos.setdefault(repo, _Repo())
            state.token = token if token is not None else state.token
            state.commits[commit] = entries
            state.branches[revision] = commit
        return commit

    def tag(self, repo: str, name: str, commit: str) -> None:
        self.repos[repo].tags[name] = commit

    # ## Counting

    def bytes_served(self, repo: str, file: str) -> int:
        return self._served[(repo, file)]

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self._served.clear()

    def _record(self, request: Request, repo_file: tuple[str, str] | None) -> None:
        with self._lock:
            self.requests.append(request)
            if repo_file:
                self._served[repo_file] += request.sent


_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?P<rest>/.*)?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_LFS = re.compile(r"^/_lfs/(?P<repo>[^/]+/[^/]+)/(?P<commit>[0-9a-f]{40})/(?P<path>.+)$")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class _Answer(Exception):  # control flow inside the handler: answer with an HTTP error
    def __init__(self, status: int, code: str | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(status)
        self.status, self.code, self.headers = status, code, dict(headers or {})


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # quiet test output
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        # ## Dispatch

        def _serve(self, *, body: bool) -> None:
            url = urlsplit(self.path)
            path, query = unquote(url.path), parse_qs(url.query)
            self._sent, self._status, self._file = 0, 0, None
            try:
                if found := _API.match(path):
                    self._api(found["repo"], found["rest"] or "", query, body)
                elif found := _RESOLVE.match(path):
                    self._resolve(found["repo"], found["rev"], found["path"], body)
                elif found := _LFS.match(path):
                    self._bytes(found["repo"], found["commit"], found["path"], body)
                else:
                    raise _Answer(404)
            except _Answer as answer:
                headers = {**answer.headers, **({"X-Error-Code": answer.code} if answer.code else {})}
                self._send(answer.status, headers, json.dumps({"error": answer.code or "error"}).encode(), body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client stopped reading (a Range it did not need): count what was sent
            request = Request(self.command, self.path, Headers(self.headers.items()), self._status, self._sent)
            hub._record(request, self._file)

        def _repo(self, name: str) -> _Repo:
            repo = hub.repos.get(name)
            if repo is None:
                raise _Answer(404, "RepoNotFound")
            if repo.token and self.headers.get("Authorization") != f"Bearer {repo.token}":
                raise _Answer(401, "RepoNotFound")  # the real hub hides private repos the same way
            return repo

        def _commit(self, repo: _Repo, revision: str) -> tuple[str, dict[str, _File]]:
            commit = repo.branches.get(revision) or repo.tags.get(revision) or revision
            if commit not in repo.commits:
                raise _Answer(404, "RevisionNotFound")
            return commit, repo.commits[commit]

        # ## /api/models/...

        def _api(self, name: str, rest: str, query: dict[str, list[str]], body: bool) -> None:
            repo = self._repo(name)
            if rest == "/refs":
                data = {
                    "branches": [
                        {"name": n, "ref": f"refs/heads/{n}", "targetCommit": c} for n, c in repo.branches.items()
                    ],
                    "tags": [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": c} for n, c in repo.tags.items()],
                    "converts": [],
                }
                self._json(data, body)
                return
            if rest.startswith("/tree/"):
                revision, _, folder = rest.removeprefix("/tree/").partition("/")
                _, files = self._commit(repo, revision)
                entries = [self._entry(f) for f in files.values() if not folder or f.path.startswith(folder + "/")]
                self._json(entries, body)
                return
            revision = rest.removeprefix("/revision/") if rest.startswith("/revision/") else "main"
            if rest and not rest.startswith("/revision/"):
                raise _Answer(404)
            commit, files = self._commit(repo, revision)
            blobs = query.get("blobs", ["false"])[0].lower() == "true"
            siblings = [self._sibling(f, blobs) for f in files.values()]
            data = {"id": name, "modelId": name, "sha": commit, "private": bool(repo.token), "gated": False,
                    "disabled": False, "tags": ["gguf"], "library_name": "gguf", "siblings": siblings}  # fmt: skip
            self._json(data, body)

        @staticmethod
        def _sibling(file: _File, blobs: bool) -> dict[str, object]:
            if not blobs:
                return {"rfilename": file.path}
            lfs = {"sha256": file.sha256, "size": file.size, "pointerSize": 134} if file.sha256 else None
            return {"rfilename": file.path, "size": file.size, "blobId": file.git_sha1, **({"lfs": lfs} if lfs else {})}

        @staticmethod
        def _entry(file: _File) -> dict[str, object]:
            lfs = {"oid": file.sha256, "size": file.size, "pointerSize": 134} if file.sha256 else None
            return {"type": "file", "oid": file.git_sha1, "size": file.size, "path": file.path,
                    **({"lfs": lfs} if lfs else {})}  # fmt: skip

        # ## /{repo}/resolve/{revision}/{path} and the "CDN"

        def _resolve(self, name: str, revision: str, path: str, body: bool) -> None:
            repo = self._repo(name)
            commit, files = self._commit(repo, revision)
            file = files.get(path)
            if file is None:
                raise _Answer(404, "EntryNotFound", {"X-Repo-Commit": commit})
            headers = {"X-Repo-Commit": commit, "ETag": f'"{file.etag}"', "Accept-Ranges": "bytes"}
            if file.sha256:
                headers |= {"X-Linked-Etag": f'"{file.sha256}"', "X-Linked-Size": str(file.size)}
            if body and file.sha256:  # the real hub sends LFS downloads to its CDN
                location = f"/_lfs/{quote(name)}/{commit}/{quote(path)}"
                self._send(302, {**headers, "Location": location}, b"", body)
                return
            self._file = (name, path)
            self._content(file, headers, body)

        def _bytes(self, name: str, commit: str, path: str, body: bool) -> None:
            repo = self._repo(name)
            file = repo.commits.get(commit, {}).get(path)
            if file is None:
                raise _Answer(404, "EntryNotFound")
            self._file = (name, path)
            self._content(file, {"ETag": f'"{file.etag}"', "Accept-Ranges": "bytes"}, body)

        def _content(self, file: _File, headers: dict[str, str], body: bool) -> None:
            start, end, status = 0, file.size, 200
            wanted = None if hub.ignore_ranges else self.headers.get("Range")
            if wanted:
                found = _RANGE.match(wanted.strip())
                if not found or (not found[1] and not found[2]):
                    raise _Answer(416, None, {"Content-Range": f"bytes */{file.size}"})
                if found[1]:
                    start, end = int(found[1]), min(int(found[2]) + 1 if found[2] else file.size, file.size)
                else:  # "bytes=-N": the last N bytes
                    start = max(file.size - int(found[2]), 0)
                if start >= file.size or start >= end:
                    raise _Answer(416, None, {"Content-Range": f"bytes */{file.size}"})
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{file.size}"
            self._status = status
            self.send_response(status)
            for key, value in {**headers, "Content-Length": str(end - start)}.items():
                self.send_header(key, value)
            self.end_headers()
            if body:
                for chunk in file.read(start, end):
                    self.wfile.write(chunk)
                    self._sent += len(chunk)

        # ## Writing

        def _json(self, data: object, body: bool) -> None:
            self._send(200, {"Content-Type": "application/json"}, json.dumps(data).encode(), body)

        def _send(self, status: int, headers: Mapping[str, str], payload: bytes, body: bool) -> None:
            self._status = status
            self.send_response(status)
            for key, value in {**headers, "Content-Length": str(len(payload))}.items():
                self.send_header(key, value)
            self.end_headers()
            if body and payload:
                self.wfile.write(payload)
                self._sent += len(payload)

    return Handler


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    """A fresh fake hub for one test, with the environment pointing at it (see the module docstring)."""
    hub = FakeHub()
    home = tmp_path_factory.mktemp("fake-hub-env")
    env = {
        "HF_ENDPOINT": hub.url,
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HOME": str(home / "hf-home"),
        "GGUF_DEPLOY_CACHE": str(home / "gguf-deploy-cache"),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    # huggingface_hub reads its environment once, at import: keep an already-imported copy in step
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HOME", env["HF_HOME"])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hf-home" / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "hf-home" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "hf-home" / "stored_tokens"))
    try:
        yield hub
    finally:
        hub.close()


@pytest.fixture(scope="session")
def sparse_gguf(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Any]:
    """``sparse_gguf(spec)`` → the path of a header-only, real-size GGUF of ``spec``, written once;
    ``sparse_gguf(spec, shards=n)`` → the paths of its n shards."""
    folder = tmp_path_factory.mktemp("sparse-gguf")
    written: dict[tuple[ggufgen.ModelSpec, int], Any] = {}

    def make(spec: ggufgen.ModelSpec, shards: int = 1) -> Any:
        if (spec, shards) not in written:
            if shards == 1:
                written[spec, shards] = ggufgen.write_gguf(
                    folder / f"{spec.name}-{spec.quant}.gguf", spec, header_only=True
                )
            else:
                written[spec, shards] = ggufgen.write_split(folder / f"split-{shards}", spec, shards)
        return written[spec, shards]

    return make
