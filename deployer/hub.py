"""The Hugging Face edge: a manifest's (repo, revision, file) → :class:`~deployer.facts.ModelFacts`.

    HubClient      the protocol: list a revision's files, read a byte range of one file
    HfHubClient    the real one, on huggingface_hub (honours HF_ENDPOINT, HF_TOKEN, its user agent)
    Resolver       revision → commit, the file and every shard of a split model, the GGUF header
                   read by growing HTTP Range requests (never the tensor data), and the cache
    Conversions    the protocol of what the Resolver is given to resolve a GGUF that a conversion
                   writes (``convert_from``): its path, and its facts predicted from the checkpoint.
                   :data:`deployer.conversion.resolve.CONVERSIONS` is the one; this module knows
                   nothing of checkpoints and imports nothing of :mod:`deployer.conversion`

Every huggingface_hub / httpx exception is translated here into a :class:`~deployer.errors.HubError`
with a message for people; nothing past this module sees them.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from typing import Protocol

from deployer.cache import FactsCache, default_cache_dir
from deployer.errors import GgufError, HubError, OfflineCacheMiss
from deployer.facts import ModelFacts, ShardFacts
from deployer.gguf_header import RawGguf, header_from, read_growing, shard_names
from deployer.loading import LoadedManifest
from deployer.projector import projector_facts

COMMIT = re.compile(r"^[0-9a-f]{40}$")
FIRST_READ = 256 * 1024  # most of a header is its tokenizer: 2-10 MiB for today's vocabularies
METADATA_TIMEOUT = 30.0  # seconds for an API answer
READ_TIMEOUT = 60.0  # seconds without a byte before a range read is abandoned (then retried)


@dataclass(frozen=True)
class RepoFile:
    """One file of a repository at a commit."""

    path: str
    size: int
    sha256: str | None  # the LFS object's sha256; None for a file kept in git itself


@dataclass(frozen=True)
class RepoSnapshot:
    """A repository at one commit: what a revision resolved to, and its files."""

    repo: str
    commit: str
    files: Mapping[str, RepoFile]


class HubClient(Protocol):
    """What resolving needs from a hub. Implementations raise only :class:`HubError`."""

    def snapshot(self, repo: str, revision: str) -> RepoSnapshot:
        """Resolve ``revision`` (branch, tag or commit) and list the files at that commit."""
        ...

    def read_range(self, repo: str, commit: str, file: str, start: int, end: int) -> bytes:
        """Bytes ``start`` to ``end`` (exclusive) of ``file`` at ``commit``."""
        ...

    def safetensors_header(self, repo: str, commit: str, file: str) -> dict[str, tuple[str, tuple[int, ...]]]:
        """The tensors a SafeTensors file holds, from its header alone: name → (dtype, shape)."""
        ...


# ## The real client


class HfHubClient:
    """:class:`HubClient` on huggingface_hub: its endpoint, token, session, retries and user agent."""

    def __init__(self, endpoint: str | None = None, token: str | None = None) -> None:
        from huggingface_hub import HfApi, constants

        from deployer import __version__

        self.endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
        self._api = HfApi(endpoint=self.endpoint, token=token, library_name="gguf-deploy", library_version=__version__)
        self._token = token

    def snapshot(self, repo: str, revision: str) -> RepoSnapshot:
        with self._errors(repo, revision):
            info = self._api.model_info(repo, revision=revision, files_metadata=True, timeout=METADATA_TIMEOUT)
        if not isinstance(info.sha, str) or not COMMIT.match(info.sha):
            raise HubError(f"{repo}: Hugging Face returned no commit for revision '{revision}'")
        files = {
            s.rfilename: RepoFile(s.rfilename, s.lfs.size if s.lfs else s.size or 0, s.lfs.sha256 if s.lfs else None)
            for s in info.siblings or ()
        }
        return RepoSnapshot(repo, info.sha, files)

    def read_range(self, repo: str, commit: str, file: str, start: int, end: int) -> bytes:
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_stream_backoff

        from deployer import __version__

        with self._errors(repo, commit, file):
            url = hf_hub_url(repo, file, revision=commit, endpoint=self.endpoint)
            headers = build_hf_headers(token=self._token, library_name="gguf-deploy", library_version=__version__)
            headers["Range"] = f"bytes={start}-{end - 1}"
            with http_stream_backoff("GET", url, headers=headers, timeout=READ_TIMEOUT) as response:
                if response.status_code >= 400:
                    response.read()
                    hf_raise_for_status(response)
                # 206 is the answer; a server that ignores Range sends the whole file with 200, of which
                # only the wanted prefix is read before the connection is dropped
                skip = 0 if response.status_code == 206 else start
                data = bytearray()
                for chunk in response.iter_bytes():
                    data += chunk
                    if len(data) >= skip + end - start:
                        break
        return bytes(data[skip : skip + end - start])

    def safetensors_header(self, repo: str, commit: str, file: str) -> dict[str, tuple[str, tuple[int, ...]]]:
        from huggingface_hub.errors import SafetensorsParsingError

        try:
            with self._errors(repo, commit, file):
                meta = self._api.parse_safetensors_file_metadata(repo, file, revision=commit, timeout=READ_TIMEOUT)
        except SafetensorsParsingError as exc:
            raise HubError(f"{repo}/{file}: not a readable SafeTensors file ({exc})") from exc
        return {name: (info.dtype, tuple(info.shape)) for name, info in meta.tensors.items()}

    def revisions(self, repo: str) -> list[str]:
        """Branch and tag names, for suggestions; empty when they cannot be listed."""
        try:
            with self._errors(repo, ""):
                refs = self._api.list_repo_refs(repo)
        except HubError:
            return []
        return [ref.name for ref in (*refs.branches, *refs.tags)]

    @contextmanager
    def _errors(self, repo: str, revision: str, file: str | None = None) -> Iterator[None]:
        """Translate huggingface_hub and httpx exceptions into one-line :class:`HubError`s."""
        import httpx2
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            HFValidationError,
            OfflineModeIsEnabled,
            RemoteEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        try:
            yield
        except HFValidationError as exc:  # a repo id the manifest's pattern lets through ("org/x.git")
            raise HubError(f"{repo}: not a valid Hugging Face repo id: {exc}") from exc
        except GatedRepoError as exc:
            raise HubError(
                f"{repo}: a gated repository; accept its terms on Hugging Face and set HF_TOKEN to a token with access"
            ) from exc
        except RepositoryNotFoundError as exc:
            raise HubError(
                f"{repo}: repository not found on Hugging Face ({self.endpoint}); if it is private or gated, set HF_TOKEN"
            ) from exc
        except RevisionNotFoundError as exc:
            close = difflib.get_close_matches(revision, self.revisions(repo), n=3, cutoff=0.5)
            hint = f"; did you mean {_quoted(close)}?" if close else ""
            raise HubError(f"{repo}: revision '{revision}' not found{hint}") from exc
        except RemoteEntryNotFoundError as exc:
            raise HubError(f"{repo}: file '{file}' not found at commit {revision[:12]}") from exc
        except OfflineModeIsEnabled as exc:
            raise HubError("HF_HUB_OFFLINE is set: huggingface_hub makes no network call; use --offline") from exc
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else "an error"
            raise HubError(f"{repo}: Hugging Face answered HTTP {status} ({self.endpoint})") from exc
        except httpx2.HTTPError as exc:
            raise HubError(
                f"cannot reach Hugging Face at {self.endpoint} ({type(exc).__name__}: {exc}); "
                "plan from the cache with --offline"
            ) from exc


def _quoted(names: list[str]) -> str:
    return " or ".join(f"'{n}'" for n in names)


# ## Resolution


Progress = Callable[[str], None]


class Conversions(Protocol):
    """What resolving a ``convert_from`` manifest needs, passed into the :class:`Resolver`."""

    def converted_file(self, repo: str, source: str, quant: str) -> str:
        """The path, below the commit's folder, of the GGUF that converting ``source`` weights to ``quant`` writes."""
        ...

    def fetch(
        self, client: HubClient, snapshot: RepoSnapshot, revision: str, file: str, progress: Progress
    ) -> ModelFacts | None:
        """The predicted facts of ``file`` when it is such a path, else None (a file the repo holds)."""
        ...


class Resolver:
    """Resolves manifests' models, from the cache when it can, else from the hub (then cached).

    Online, a revision that is a 40-hex commit whose facts are cached costs no request at all;
    a branch or tag costs one (what it points to now), and the header is read only on a miss.
    ``offline=True`` never touches the hub: a miss is :class:`OfflineCacheMiss`.

    ``conversions`` (:data:`deployer.conversion.resolve.CONVERSIONS`) resolves the GGUF a conversion
    writes; without it, a ``convert_from`` manifest is refused (ValueError).
    """

    def __init__(
        self,
        client: HubClient | None,
        cache: FactsCache,
        *,
        offline: bool = False,
        progress: Progress | None = None,
        conversions: Conversions | None = None,
    ) -> None:
        if client is None and not offline:
            raise ValueError("an online Resolver needs a HubClient")
        self.client = client
        self.cache = cache
        self.offline = offline
        self.progress = progress or (lambda message: None)
        self.conversions = conversions

    @classmethod
    def default(
        cls, *, offline: bool = False, progress: Progress | None = None, conversions: Conversions | None = None
    ) -> Resolver:
        """The usual wiring: :class:`HfHubClient` (none offline) and the cache in :func:`default_cache_dir`."""
        client = None if offline else HfHubClient()
        return cls(client, FactsCache(default_cache_dir()), offline=offline, progress=progress, conversions=conversions)

    def resolve_manifest(self, loaded: LoadedManifest) -> ModelFacts:
        """The facts of the model a manifest names (see :meth:`resolve`); for ``convert_from``, the
        GGUF the conversion will write, predicted from the checkpoint's headers."""
        manifest = loaded.manifest
        if manifest.convert_from is not None:
            if self.conversions is None:
                raise ValueError(
                    f"{manifest.repo}: convert_from needs a Resolver given conversions "
                    "(deployer.conversion.resolve.CONVERSIONS)"
                )
            file = self.conversions.converted_file(manifest.repo, manifest.convert_from, manifest.quant)
            return self.resolve(manifest.repo, manifest.revision, file)
        assert manifest.file is not None  # the manifest names a file or convert_from
        facts = self.resolve(manifest.repo, manifest.revision, manifest.file)
        return self.with_projector(facts, manifest.mmproj)

    def with_projector(self, facts: ModelFacts, mmproj: str | None) -> ModelFacts:
        """``facts`` with the facts of the manifest's mmproj file (same repo, same commit), if any."""
        if mmproj is None:
            return facts
        cached = self.cache.projector(facts.repo, facts.commit, mmproj)
        if cached is None:
            if self.offline or self.client is None:
                raise OfflineCacheMiss(
                    f"{facts.repo}@{facts.revision}: '{mmproj}' at commit {facts.commit[:12]} is not in the cache "
                    f"({self.cache.folder}); plan once without --offline to fill it"
                )
            snapshot = self.client.snapshot(facts.repo, facts.commit)
            shard = _shards(snapshot, facts.revision, mmproj)[0]
            self.progress(f"reading the GGUF header of {mmproj} (the projector)")
            raw = self._read_gguf(snapshot, shard)
            try:
                cached = projector_facts(raw, shard.file, shard.size, shard.sha256)
            except GgufError as exc:
                raise GgufError(f"{facts.repo}/{mmproj}: {exc}") from exc
            self.cache.put_projector(facts.repo, facts.commit, cached)
        return replace(facts, projector=cached)

    def resolve(self, repo: str, revision: str, file: str) -> ModelFacts:
        """The facts of ``file`` in ``repo`` at ``revision``; raises HubError, GgufError or OfflineCacheMiss."""
        pinned = COMMIT.match(revision) is not None
        commit = revision if pinned else self.cache.commit(repo, revision)
        cached = self.cache.facts(repo, commit, file) if commit else None
        if cached is not None and (self.offline or pinned):
            return replace(cached, revision=revision)
        if self.offline or self.client is None:
            what = "the revision" if commit is None else f"'{file}' at commit {commit[:12]}"
            raise OfflineCacheMiss(
                f"{repo}@{revision}: {what} is not in the cache ({self.cache.folder}); "
                "plan once without --offline to fill it"
            )
        self.progress(f"resolving {repo}@{revision}")
        snapshot = self.client.snapshot(repo, revision)
        if not pinned:  # a commit needs no entry: it resolves to itself
            self.cache.put_commit(repo, revision, snapshot.commit)
        if snapshot.commit != commit:  # the branch moved (or was never resolved): look again
            cached = self.cache.facts(repo, snapshot.commit, file)
        if cached is not None:
            return replace(cached, revision=revision)
        facts = self._fetch(snapshot, revision, file)
        self.cache.put_facts(facts)
        return facts

    def _fetch(self, snapshot: RepoSnapshot, revision: str, file: str) -> ModelFacts:
        assert self.client is not None
        if self.conversions is not None:  # the GGUF a conversion writes: predicted from the checkpoint
            predicted = self.conversions.fetch(self.client, snapshot, revision, file, self.progress)
            if predicted is not None:
                return predicted
        shards = _shards(snapshot, revision, file)
        raws = []
        for number, shard in enumerate(shards, start=1):
            of = f" (shard {number} of {len(shards)})" if len(shards) > 1 else ""
            self.progress(f"reading the GGUF header of {shard.file}{of}")
            raws.append(self._read_gguf(snapshot, shard))
        try:
            header = header_from(raws[0], *raws[1:])
        except GgufError as exc:
            raise GgufError(f"{snapshot.repo}/{file}: {exc}") from exc
        if header.split_count != len(shards):
            raise GgufError(
                f"{snapshot.repo}/{file}: the header says split.count = {header.split_count}, "
                f"but the file name says {len(shards)} shard(s)"
            )
        return ModelFacts(snapshot.repo, revision, snapshot.commit, tuple(shards), header)

    def _read_gguf(self, snapshot: RepoSnapshot, shard: ShardFacts) -> RawGguf:
        """Read one header with growing Range requests: a little past its end, never the tensors."""
        assert self.client is not None
        read = partial(self.client.read_range, snapshot.repo, snapshot.commit, shard.file)
        try:
            return read_growing(read, shard.size, FIRST_READ)
        except GgufError as exc:
            raise GgufError(f"{snapshot.repo}/{shard.file}: {exc}") from exc


def _shards(snapshot: RepoSnapshot, revision: str, file: str) -> list[ShardFacts]:
    """The file, or every shard of a split model (first first); HubError with suggestions otherwise."""
    names = shard_names(file) or [file]
    if names[0] != file:
        raise HubError(f"{snapshot.repo}: '{file}' is not the first shard; set file to '{names[0]}'")
    where = f"{snapshot.repo}@{revision}" + ("" if revision == snapshot.commit else f" ({snapshot.commit[:12]})")
    missing = [name for name in names if name not in snapshot.files]
    if file in missing:
        ggufs = sorted(p for p in snapshot.files if p.endswith(".gguf"))
        close = difflib.get_close_matches(file, ggufs, n=3, cutoff=0.5)
        if close:
            hint = f"; did you mean {_quoted(close)}?"
        elif ggufs:
            hint = f"; GGUF files there: {', '.join(ggufs[:8])}{', …' if len(ggufs) > 8 else ''}"
        elif any(p.endswith((".safetensors", ".bin")) for p in snapshot.files):
            hint = "; the repository holds Transformers weights: set convert_from instead of file"
        else:
            hint = "; the repository holds no .gguf file"
        raise HubError(f"{where}: file '{file}' not found{hint}")
    if missing:
        raise HubError(f"{where}: split model incomplete: {', '.join(missing)} missing")
    return [ShardFacts(n, snapshot.files[n].size, snapshot.files[n].sha256) for n in names]
