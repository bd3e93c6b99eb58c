"""``gguf-deploy serve`` of a ``convert_from`` manifest: the converted GGUF in the local cache.

The same steps as the Modal app's, with the same code (:mod:`deployer.conversion.converter`): resolve the
checkpoint (the plan's facts, cached), download its files into the Hugging Face cache at the exact
commit, fetch llama.cpp's converter of the pinned release into the cache, convert, check, rename.
The result lives in ``<cache>/converted/<repo>/<commit>/...``; a second run finds it and converts
nothing (and needs neither the network nor the converter's dependencies).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

from deployer.cache import FactsCache, default_cache_dir
from deployer.conversion.converter import (
    Expected,
    check_converted,
    convert_checkpoint,
    default_converter_dir,
    fetch_converter,
    require_packages,
)
from deployer.conversion.resolve import CONVERSIONS, converted_file
from deployer.errors import ConversionError, ServeError
from deployer.facts import ModelFacts
from deployer.hub import HfHubClient, Resolver
from deployer.manifest import Manifest


def converted_path(cache_dir: Path, facts: ModelFacts) -> Path:
    """Where the conversion of ``facts`` lives in the local cache."""
    return cache_dir / "converted" / facts.repo / facts.commit / facts.file


def expected_of(facts: ModelFacts) -> Expected:
    """The header the converted file must have: the plan's prediction."""
    header = facts.header
    return Expected(header.arch, len(header.tensors), header.file_type if header.file_type is not None else -1)


def convert_locally(
    manifest: Manifest,
    *,
    offline: bool = False,
    environ: Mapping[str, str] = os.environ,
    log: Callable[[str], None] = print,
) -> Path:
    """The GGUF converted from ``manifest``'s checkpoint, in the local cache (converted once)."""
    assert manifest.convert_from is not None
    cache_dir = default_cache_dir(environ)
    client = None if offline else HfHubClient()
    resolver = Resolver(client, FactsCache(cache_dir), offline=offline, conversions=CONVERSIONS)
    facts = resolver.resolve(
        manifest.repo, manifest.revision, converted_file(manifest.repo, manifest.convert_from, manifest.quant)
    )
    assert facts.conversion is not None
    out = converted_path(cache_dir, facts)
    expected = expected_of(facts)
    if out.is_file():
        try:
            check_converted(out, expected)
            return out
        except ConversionError as exc:
            log(f"converting again: {exc}")
    require_packages()
    checkpoint = _download(facts, offline=offline)
    converter = fetch_converter(default_converter_dir(cache_dir))
    return convert_checkpoint(checkpoint, out, manifest.quant, converter=converter, expected=expected, log=log)


def _download(facts: ModelFacts, *, offline: bool) -> Path:
    """The checkpoint's files in the Hugging Face cache, at the exact commit; their folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    assert facts.conversion is not None
    files = [f.file for f in facts.conversion.files]
    try:
        folder = snapshot_download(facts.repo, revision=facts.commit, allow_patterns=files, local_files_only=offline)
    except LocalEntryNotFoundError as exc:
        raise ServeError(
            f"{facts.repo}: the checkpoint is not in the Hugging Face cache; run once while online"
        ) from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "an error"
        raise ServeError(
            f"{facts.repo}: downloading the checkpoint failed: Hugging Face answered HTTP {status}"
        ) from exc
    except OSError as exc:
        raise ServeError(f"{facts.repo}: cannot store the checkpoint: {exc.strerror or exc}") from exc
    return Path(folder)
