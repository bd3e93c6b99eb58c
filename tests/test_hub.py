"""The Hugging Face edge, real huggingface_hub code against the fake hub: resolution, range reads, cache, errors."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from deployer.cache import FactsCache, default_cache_dir
from deployer.errors import GgufError, HubError, OfflineCacheMiss
from deployer.gguf_header import MIB, read_header
from deployer.hub import HfHubClient, Resolver
from tests import ggufgen

DC = ggufgen.DARK_CHAMPION_18B
DC_FILE = "L3.2-8X3B-MOE-Dark-Champion-Inst-18.4B-uncen-ablit_D_AU-Q8_0.gguf"


@pytest.fixture
def cache(tmp_path):
    return FactsCache(tmp_path / "cache")


@pytest.fixture
def resolver(fake_hub, cache):
    return Resolver(HfHubClient(endpoint=fake_hub.url), cache)


@pytest.fixture
def dark_champion(fake_hub, sparse_gguf):
    """The target model: 18.4B MoE, Q8_0, 19.6 GB, header-only."""
    return fake_hub.add_repo("DavidAU/dark-champion-GGUF", {DC_FILE: sparse_gguf(DC), "README.md": b"# card"})


def _file_requests(fake_hub):
    return [r for r in fake_hub.requests if "/resolve/" in r.path or "/_lfs/" in r.path]


# ## Resolution


def test_resolves_commit_size_sha256_and_header(fake_hub, resolver, dark_champion, sparse_gguf):
    facts = resolver.resolve("DavidAU/dark-champion-GGUF", "main", DC_FILE)
    assert facts.commit == dark_champion
    assert facts.revision == "main"
    assert facts.size_bytes == sparse_gguf(DC).stat().st_size
    served = fake_hub.repos["DavidAU/dark-champion-GGUF"].commits[dark_champion][DC_FILE]
    assert facts.shards[0].sha256 == served.sha256
    assert facts.header == read_header(sparse_gguf(DC))


def test_planning_a_20_gb_model_reads_only_its_header(fake_hub, resolver, dark_champion, sparse_gguf):
    header = read_header(sparse_gguf(DC))
    resolver.resolve("DavidAU/dark-champion-GGUF", "main", DC_FILE)
    served = fake_hub.bytes_served("DavidAU/dark-champion-GGUF", DC_FILE)
    assert header.data_offset <= served <= header.data_offset + max(MIB, header.data_offset // 10)
    assert all(r.status in (206, 302) for r in _file_requests(fake_hub))  # ranges only, never a whole file


def test_a_server_that_ignores_ranges_still_gives_the_header(fake_hub, resolver, sparse_gguf):
    # every read after the first starts past byte 0: the client must skip to it in the whole-file answer
    fake_hub.add_repo("org/q", {"q.gguf": sparse_gguf(ggufgen.QWEN_0_5B)})
    fake_hub.ignore_ranges = True
    facts = resolver.resolve("org/q", "main", "q.gguf")
    assert facts.header == read_header(sparse_gguf(ggufgen.QWEN_0_5B))
    reads = [r for r in _file_requests(fake_hub) if r.status == 200]
    assert len(reads) > 1  # the header took several reads


def test_split_model_every_shard_found_and_summed(fake_hub, resolver, sparse_gguf):
    paths = sparse_gguf(ggufgen.LLAMA_70B_Q4KM, shards=3)
    fake_hub.add_repo("org/llama-70b", {f"Q4_K_M/{p.name}": p for p in paths})
    first = f"Q4_K_M/{paths[0].name}"
    facts = resolver.resolve("org/llama-70b", "main", first)
    assert [s.file for s in facts.shards] == [f"Q4_K_M/{p.name}" for p in paths]
    assert facts.size_bytes == sum(p.stat().st_size for p in paths)
    assert facts.header.params == ggufgen.n_params(ggufgen.LLAMA_70B_Q4KM)
    assert facts.header.split_count == 3


def test_split_model_not_its_first_shard(fake_hub, resolver, sparse_gguf):
    paths = sparse_gguf(ggufgen.QWEN_0_5B, shards=2)
    fake_hub.add_repo("org/q", {p.name: p for p in paths})
    with pytest.raises(HubError, match=rf"is not the first shard; set file to '{paths[0].name}'"):
        resolver.resolve("org/q", "main", paths[1].name)


def test_split_model_with_a_missing_shard(fake_hub, resolver, sparse_gguf):
    paths = sparse_gguf(ggufgen.QWEN_0_5B, shards=2)
    fake_hub.add_repo("org/q", {paths[0].name: paths[0]})
    with pytest.raises(HubError, match=rf"split model incomplete: {paths[1].name} missing"):
        resolver.resolve("org/q", "main", paths[0].name)


def test_tag_and_commit_revisions(fake_hub, resolver, dark_champion):
    fake_hub.tag("DavidAU/dark-champion-GGUF", "v1", dark_champion)
    later = fake_hub.add_repo("DavidAU/dark-champion-GGUF", {"other.gguf": b"GGUF"})
    assert later != dark_champion
    assert resolver.resolve("DavidAU/dark-champion-GGUF", "v1", DC_FILE).commit == dark_champion
    assert resolver.resolve("DavidAU/dark-champion-GGUF", dark_champion, DC_FILE).commit == dark_champion


# ## Errors people can act on


@pytest.mark.parametrize(
    ("repo", "revision", "file", "message"),
    [
        pytest.param(
            "DavidAU/no-such-repo", "main", DC_FILE,
            r"^DavidAU/no-such-repo: repository not found on Hugging Face \(http://127\.0\.0\.1:\d+\); "
            r"if it is private or gated, set HF_TOKEN$",
            id="missing-repo",
        ),
        pytest.param(
            "DavidAU/dark-champion-GGUF", "mian", DC_FILE,
            r"^DavidAU/dark-champion-GGUF: revision 'mian' not found; did you mean 'main'\?$",
            id="missing-revision-suggests-branch",
        ),
        pytest.param(
            "DavidAU/dark-champion-GGUF", "main", DC_FILE.replace("Q8_0", "Q4_K_M"),
            rf"^DavidAU/dark-champion-GGUF@main \([0-9a-f]{{12}}\): file '.*-Q4_K_M\.gguf' not found; "
            rf"did you mean '{DC_FILE}'\?$",
            id="missing-file-suggests-close-names",
        ),
        pytest.param(
            "DavidAU/dark-champion-GGUF", "main", "model.gguf",
            rf"file 'model\.gguf' not found; GGUF files there: {DC_FILE}$",
            id="missing-file-lists-gguf-files",
        ),
    ],
)  # fmt: skip
def test_resolution_errors(resolver, dark_champion, repo, revision, file, message):
    with pytest.raises(HubError, match=message):
        resolver.resolve(repo, revision, file)


def test_private_repo_needs_hf_token(fake_hub, cache, sparse_gguf, monkeypatch):
    fake_hub.add_repo("org/private", {"q.gguf": sparse_gguf(ggufgen.QWEN_0_5B)}, token="hf_secret")
    with pytest.raises(HubError, match=r"repository not found .* set HF_TOKEN"):
        Resolver(HfHubClient(endpoint=fake_hub.url), cache).resolve("org/private", "main", "q.gguf")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    facts = Resolver(HfHubClient(endpoint=fake_hub.url), cache).resolve("org/private", "main", "q.gguf")
    assert facts.header.arch == "qwen2"
    assert fake_hub.requests[-1].headers.get("Authorization") == "Bearer hf_secret"  # the range read too


def test_a_repo_id_hugging_face_refuses_is_a_hub_error(resolver):
    # the manifest's pattern lets "org/model.git" through; huggingface_hub raises a ValueError for it
    with pytest.raises(HubError, match=r"^org/model\.git: not a valid Hugging Face repo id: .*'\.git'"):
        resolver.resolve("org/model.git", "main", "m.gguf")


def test_hub_unreachable(cache):
    client = HfHubClient(endpoint="http://127.0.0.1:9")  # the discard port: nothing listens
    with pytest.raises(
        HubError, match=r"^cannot reach Hugging Face at http://127\.0\.0\.1:9 .*; plan from the cache with --offline$"
    ):
        Resolver(client, cache).resolve("org/m", "main", "m.gguf")


def test_a_file_that_is_not_gguf(fake_hub, resolver):
    fake_hub.add_repo("org/m", {"m.gguf": b"<html>not found</html>" * 10})
    with pytest.raises(GgufError, match=r"^org/m/m\.gguf: not a GGUF file \(it starts with b'<htm'"):
        resolver.resolve("org/m", "main", "m.gguf")


# ## The cache: a repeated plan reads no header; --offline uses nothing else


def test_repeated_resolution_of_a_branch_costs_one_small_request(fake_hub, resolver, dark_champion):
    first = resolver.resolve("DavidAU/dark-champion-GGUF", "main", DC_FILE)
    fake_hub.reset()
    again = resolver.resolve("DavidAU/dark-champion-GGUF", "main", DC_FILE)
    assert again == first
    assert [r.path.split("?")[0] for r in fake_hub.requests] == ["/api/models/DavidAU/dark-champion-GGUF/revision/main"]
    assert fake_hub.bytes_served("DavidAU/dark-champion-GGUF", DC_FILE) == 0


def test_repeated_resolution_of_a_commit_makes_no_request(fake_hub, resolver, cache, dark_champion):
    resolver.resolve("DavidAU/dark-champion-GGUF", dark_champion, DC_FILE)
    fake_hub.reset()
    resolver.resolve("DavidAU/dark-champion-GGUF", dark_champion, DC_FILE)
    assert fake_hub.requests == []
    assert not (cache.folder / "refs").exists()  # a commit resolves to itself: nothing to remember


def test_a_moved_branch_is_followed(fake_hub, resolver, dark_champion, sparse_gguf):
    resolver.resolve("DavidAU/dark-champion-GGUF", "main", DC_FILE)
    newer = fake_hub.add_repo("DavidAU/dark-champion-GGUF", {DC_FILE: sparse_gguf(ggufgen.QWEN_0_5B)})
    facts = resolver.resolve("DavidAU/dark-champion-GGUF", "main", DC_FILE)
    assert facts.commit == newer
    assert facts.header.arch == "qwen2"


def test_offline_uses_only_the_cache(fake_hub, resolver, cache, dark_champion):
    online = resolver.resolve("DavidAU/dark-champion-GGUF", "main", DC_FILE)
    fake_hub.reset()
    offline = Resolver(None, cache, offline=True)
    assert offline.resolve("DavidAU/dark-champion-GGUF", "main", DC_FILE) == online
    assert offline.resolve("DavidAU/dark-champion-GGUF", dark_champion, DC_FILE).commit == dark_champion
    assert fake_hub.requests == []


@pytest.mark.parametrize(
    ("revision", "file", "message"),
    [
        pytest.param("main", DC_FILE, r"@main: the revision is not in the cache", id="revision-never-resolved"),
        pytest.param("a" * 40, DC_FILE, r"'.*' at commit aaaaaaaaaaaa is not in the cache", id="commit-not-cached"),
    ],
)
def test_offline_cache_miss(cache, revision, file, message):
    with pytest.raises(OfflineCacheMiss, match=message + r" \(.*\); plan once without --offline to fill it$"):
        Resolver(None, cache, offline=True).resolve("DavidAU/dark-champion-GGUF", revision, file)


def test_cache_files_are_written_whole(resolver, cache, dark_champion):
    resolver.resolve("DavidAU/dark-champion-GGUF", "main", DC_FILE)
    files = sorted(p.relative_to(cache.folder).parts[0] for p in cache.folder.rglob("*") if p.is_file())
    assert files == ["facts", "refs"]  # no temporary file left behind
    for path in cache.folder.rglob("*.json"):
        json.loads(path.read_text())


def test_a_corrupt_cache_entry_is_a_miss(fake_hub, resolver, cache, dark_champion):
    resolver.resolve("DavidAU/dark-champion-GGUF", dark_champion, DC_FILE)
    for path in (cache.folder / "facts").glob("*.json"):
        path.write_text('{"format": 1, "key": "trunc')
    fake_hub.reset()
    facts = resolver.resolve("DavidAU/dark-champion-GGUF", dark_champion, DC_FILE)
    assert facts.commit == dark_champion
    assert fake_hub.bytes_served("DavidAU/dark-champion-GGUF", DC_FILE) > 0


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        pytest.param({"GGUF_DEPLOY_CACHE": "/x/cache"}, "/x/cache", id="env-wins"),
        pytest.param({"XDG_CACHE_HOME": "/x/xdg"}, "/x/xdg/gguf-deploy", id="xdg"),
    ],
)
def test_default_cache_dir(environ, expected):
    assert str(default_cache_dir(environ)) == expected


def test_an_unwritable_cache_is_a_clear_error(fake_hub, dark_champion, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    resolver = Resolver(HfHubClient(endpoint=fake_hub.url), FactsCache(blocker / "cache"))
    with pytest.raises(HubError, match=r"^cannot write the cache in .*not-a-folder/cache: .*; set GGUF_DEPLOY_CACHE"):
        resolver.resolve("DavidAU/dark-champion-GGUF", "main", DC_FILE)


def test_a_failed_cache_write_is_a_clear_error_and_leaves_nothing(cache, monkeypatch):
    def disk_full(self, target):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "replace", disk_full)
    with pytest.raises(
        HubError, match=r"^cannot write the cache in .*: No space left on device; set GGUF_DEPLOY_CACHE"
    ):
        cache.put_commit("org/m", "main", "c" * 40)
    assert [p.name for p in cache.folder.rglob("*") if p.is_file()] == []  # the temporary file is gone
