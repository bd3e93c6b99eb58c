"""A new manifest from a Hugging Face repository: pick the GGUF file, choose a context, write it.

A repository with no GGUF file but Transformers weights gets a ``convert_from`` manifest instead
(SafeTensors preferred to PyTorch ``.bin``), whose trained context comes from its config.json.

    pick_gguf(files, quant)       → the file for a quant (pure; the first shard of a split model)
    quants_in(files)              → the quants a repository offers (pure)
    manifest_name(file, prefix)   → a valid default name (pure)
    manifest_text(values)         → the TOML, with the ``#:schema`` line first (pure)
    write_atomic(..., exclusive)  → written atomically, never over an existing file
    new_manifest(...)             → all of it, with the hub client and resolver passed in

The file list comes from :class:`deployer.hub.HubClient`; the trained context from the GGUF
header that :class:`deployer.hub.Resolver` reads (and caches, so the plan that follows is free).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import tomli_w

from deployer.atomic import write_atomic
from deployer.conversion.resolve import WEIGHTS, converted_file
from deployer.errors import GgufDeployError, GgufError, HubError, ManifestInvalid, PlanError
from deployer.facts import ModelFacts
from deployer.gguf_header import SHARD_NAME
from deployer.hub import HubClient, Resolver
from deployer.loading import SCHEMA_COMMENT, LoadedManifest, display_path, load_manifests, parse_manifest
from deployer.manifest import DEFAULT_APP_PREFIX, default_name, name_max
from deployer.projector import pick_projector
from deployer.quants import QUANTS

DEFAULT_QUANT = "Q8_0"  # the project's recommendation: near-lossless, and llama.cpp's fastest 8-bit path
DEFAULT_CONTEXT_CAP = 8192  # a long trained context costs KV-cache memory on every container; ask for more
MIN_CONTEXT = 256  # the manifest's own lower bound
LISTED = 12  # file names shown in an error before "…"
# Multimodal projector files ride along in many GGUF repositories; they are not language models.
_NOT_A_MODEL = re.compile(r"(^|/)mmproj[^/]*$", re.IGNORECASE)


# ## Picking the file


def _quant_pattern(quant: str) -> re.Pattern[str]:
    # The quant as a whole token of the path: "Q4_K" must not match "Q4_K_M", nor "Q8_0" "Q8_0_L"
    return re.compile(rf"(?<![A-Za-z0-9]){re.escape(quant)}(?![A-Za-z0-9]|_[A-Za-z0-9])", re.IGNORECASE)


def _models(files: Iterable[str]) -> list[str]:
    return sorted(f for f in files if f.lower().endswith(".gguf") and not _NOT_A_MODEL.search(f))


def quants_in(files: Iterable[str]) -> list[str]:
    """The quants whose name appears in some GGUF file's path, in llama.cpp's order."""
    models = _models(files)
    return [q for q in QUANTS if any(_quant_pattern(q).search(f) for f in models)]


def checkpoint_format(files: Iterable[str]) -> str | None:
    """The ``convert_from`` of a repository's Transformers weights (SafeTensors first), or None."""
    listed = list(files)
    return next((fmt for fmt, pattern in WEIGHTS.items() if any(pattern.match(f) for f in listed)), None)


def pick_gguf(files: Iterable[str], quant: str, repo: str = "the repository") -> str:
    """The GGUF file of ``quant`` among ``files`` (for a split model its first shard).

    Raises :class:`HubError` listing the candidates when none or several match.
    """
    models = _models(files)
    if not models:
        raise HubError(f"{repo}: holds no .gguf file")
    pattern = _quant_pattern(quant)
    matching = [f for f in models if pattern.search(f)]
    candidates = []
    for f in matching:
        shard = SHARD_NAME.match(f)
        if shard is None or int(shard["index"]) == 1:
            candidates.append(f)
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        offered = quants_in(models)
        if matching:  # only later shards matched: the first is missing
            raise HubError(f"{repo}: the {quant} model is split, but its first shard is missing: {_listed(matching)}")
        hint = f"; quants offered: {', '.join(offered)} (pass --quant)" if offered else ""
        raise HubError(f"{repo}: no GGUF file matches quant {quant}{hint}; GGUF files: {_listed(models)}")
    raise HubError(f"{repo}: {len(candidates)} GGUF files match quant {quant}; pass --file: {_listed(candidates)}")


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:LISTED])
    return shown + (f", … ({len(names) - LISTED} more)" if len(names) > LISTED else "")


# ## The manifest


def manifest_name(file: str, app_prefix: str = DEFAULT_APP_PREFIX, repo: str = "") -> str:
    """The default name: :func:`deployer.manifest.default_name`, cut to what the app name allows."""
    name = default_name(file) or default_name(repo.rsplit("/", 1)[-1] + ".gguf")
    return name[: name_max(app_prefix)].rstrip("-") or "model"


def manifest_values(
    *,
    name: str,
    repo: str,
    file: str | None,
    quant: str,
    context: int,
    revision: str = "main",
    convert_from: str | None = None,
    mmproj: str | None = None,
) -> dict[str, Any]:
    """The keys a new manifest sets, in the order people read them; ``revision`` only when not main.

    ``convert_from`` replaces ``file`` for a repository of Transformers weights; ``mmproj`` is the
    repo's multimodal projector, when it has one."""
    source = {"convert_from": convert_from} if convert_from else {"file": file}
    if mmproj is not None:
        source["mmproj"] = mmproj
    values: dict[str, Any] = {"name": name, "repo": repo, **source, "quant": quant, "context": context}
    if revision != "main":
        values["revision"] = revision
    return values


def manifest_text(values: dict[str, Any]) -> str:
    """The manifest as written: the ``#:schema`` line (editors validate with it), then TOML."""
    return f"{SCHEMA_COMMENT}\n{tomli_w.dumps(values)}"


def default_context(trained: int, cap: int = DEFAULT_CONTEXT_CAP) -> int:
    """The trained context, capped: most chats need far less, and the KV cache grows with it."""
    return max(MIN_CONTEXT, min(trained, cap))


@dataclass(frozen=True)
class NewManifest:
    """What ``new`` wrote, and what it learnt on the way."""

    path: Path
    loaded: LoadedManifest
    facts: ModelFacts | None  # None when the header could not be read (then a context was given)
    facts_error: GgufDeployError | None  # why it could not
    projector_note: str | None = None  # why the repo's mmproj file was not offered


def new_manifest(
    repo: str,
    *,
    client: HubClient,
    resolver: Resolver,
    manifests_dir: Path,
    quant: str = DEFAULT_QUANT,
    context: int | None = None,
    name: str | None = None,
    revision: str = "main",
    file: str | None = None,
    app_prefix: str = DEFAULT_APP_PREFIX,
) -> NewManifest:
    """List ``repo`` on the hub, pick the file, choose the context, and write a valid manifest.

    Nothing is written unless the manifest validates, and an existing file is never replaced.
    """
    # What the person typed is checked before any network call: a bad repo id, name or context.
    placeholders = {"name": name or "model", "file": file or "model.gguf", "context": context or 4096}
    typed = manifest_values(repo=repo, quant=quant, revision=revision, **placeholders)
    early = _validate(manifests_dir, typed, app_prefix)
    if name is not None:
        _check_free(manifests_dir, early, app_prefix)

    snapshot = client.snapshot(repo, revision)
    convert_from = checkpoint_format(snapshot.files) if file is None and not _models(snapshot.files) else None
    if convert_from is not None:  # no GGUF, but weights llama.cpp's converter reads
        target = converted_file(repo, convert_from, quant)
        name = name or manifest_name(f"{repo.rsplit('/', 1)[-1]}-{quant}.gguf", app_prefix, repo)
        source: dict[str, Any] = {"file": None, "convert_from": convert_from}
    else:
        if file is None:
            file = pick_gguf(snapshot.files, quant, repo)
        elif file not in snapshot.files:
            raise HubError(f"{repo}: no file '{file}' at {revision}; GGUF files: {_listed(_models(snapshot.files))}")
        target, name, source = file, name or manifest_name(file, app_prefix, repo), {"file": file}
    _check_free(manifests_dir, _validate(manifests_dir, {**typed, "name": name, **source}, app_prefix), app_prefix)

    facts: ModelFacts | None = None
    facts_error: GgufDeployError | None = None
    try:
        facts = resolver.resolve(repo, revision, target)
    except (HubError, GgufError, PlanError) as exc:
        if context is None:
            raise type(exc)(f"{exc}; cannot read the trained context: pass --context N") from exc
        facts_error = exc
    if context is None:
        assert facts is not None
        context = default_context(facts.header.context_length)

    # a GGUF repo's projector (mmproj-*.gguf) is offered, when its header reads as one that fits
    mmproj = pick_projector(snapshot.files) if convert_from is None else None
    projector_note = None
    if mmproj is not None and facts is not None:
        try:
            projector = resolver.with_projector(facts, mmproj).projector
        except (HubError, GgufError) as exc:
            projector, projector_note = None, f"{mmproj} left out: {exc}"
        if projector is not None and projector.projection_dim != facts.header.embedding_length:
            projector, projector_note = (
                None,
                f"{mmproj} left out: it is {projector.projection_dim} wide, the model {facts.header.embedding_length}",
            )
        if projector is None:
            mmproj = None
    values = manifest_values(
        name=name,
        repo=repo,
        file=file,
        quant=quant,
        context=context,
        revision=revision,
        convert_from=convert_from,
        mmproj=mmproj,
    )
    loaded = _validate(manifests_dir, values, app_prefix)
    path = manifests_dir / f"{values['name']}.toml"
    try:
        write_atomic(path, manifest_text(values), exclusive=True)
    except FileExistsError as exc:
        raise _exists(path) from exc
    except OSError as exc:
        raise ManifestInvalid.single(display_path(path), "", f"cannot write: {exc.strerror or exc}") from exc
    return NewManifest(path, loaded, facts, facts_error, projector_note)


def _validate(manifests_dir: Path, values: dict[str, Any], app_prefix: str) -> LoadedManifest:
    """Validate ``values`` exactly as the written file will be (ManifestInvalid names file and key)."""
    shown = display_path(manifests_dir / f"{values['name']}.toml")
    values = {key: value for key, value in values.items() if value is not None}  # None: a key not written
    try:
        return parse_manifest(manifest_text(values).encode(), shown, app_prefix=app_prefix)
    except ManifestInvalid as exc:  # the file is not written: a line number would point nowhere
        raise ManifestInvalid([replace(p, line=None) for p in exc.problems]) from exc


def _check_free(manifests_dir: Path, loaded: LoadedManifest, app_prefix: str) -> None:
    """Neither the file nor the app name may be taken already."""
    path = manifests_dir / f"{loaded.name}.toml"
    if path.exists():
        raise _exists(path)
    if manifests_dir.is_dir():
        others, _ = load_manifests([manifests_dir], app_prefix=app_prefix)
        clash = [other.path for other in others if other.app_name == loaded.app_name]
        if clash:
            raise ManifestInvalid.single(
                loaded.path, "name", f"app name '{loaded.app_name}' is already produced by {', '.join(clash)}"
            )


def _exists(path: Path) -> ManifestInvalid:
    return ManifestInvalid.single(
        display_path(path), "", "already exists; new never overwrites: edit it, or pass another --name"
    )
