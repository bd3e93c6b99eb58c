"""``gguf-deploy changed`` (what a push or pull request changed) and ``gguf-deploy new`` (a manifest)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from deployer.changes import ZERO_COMMIT, Changes
from deployer.cli import app_prefix
from deployer.errors import EXIT_FAILURE
from deployer.loading import DEFAULT_MANIFESTS_DIR, display_path
from deployer.quants import QUANTS
from deployer.scaffold import DEFAULT_QUANT


@click.command()
@click.option(
    "--base", required=True, metavar="REF", help=f"The commit before the change ({ZERO_COMMIT[:7]}… = unknown)."
)
@click.option("--head", default="HEAD", show_default=True, metavar="REF", help="The commit after the change.")
@click.option(
    "--manifests",
    "manifests_dir",
    default=DEFAULT_MANIFESTS_DIR,
    show_default=True,
    metavar="DIR",
    help="The manifests folder (paths in the answer are relative to the current folder).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (for scripts and CI).")
@click.pass_context
def changed(ctx: click.Context, base: str, head: str, manifests_dir: str, as_json: bool) -> None:
    """List the manifests added, modified, deleted and renamed between two commits.

    \b
    A change under deployer/, templates/ or schema/ (the GPU data included) makes every
    manifest count as changed. An all-zero base (a first push) or a base this clone lacks
    (a force push) also counts every manifest, and asks the deployer to remove live apps
    that no manifest produces ("prune_orphans").

    \b
    Examples:
      gguf-deploy changed --base origin/main --head HEAD
      gguf-deploy changed --base "$BEFORE" --head "$GITHUB_SHA" --json

    JSON keys: base, head, base_commit, head_commit, manifests_dir, added, modified, deleted,
    renamed [{from, to}], everything, reasons, prune_orphans, deploy (the manifests to plan
    and deploy), remove [{name, app, path}] (the apps to destroy), notes.
    """
    from deployer.changes import changed_manifests

    changes = changed_manifests(base, head, manifests_dir=manifests_dir, app_prefix=app_prefix(ctx))
    if as_json:
        click.echo(json.dumps(changes.to_json(), indent=2, ensure_ascii=False))
    else:
        for line in changes_text(changes):
            click.echo(line)


def changes_text(changes: Changes) -> list[str]:
    """The readable form of :class:`Changes`, one line each."""
    base = changes.base_commit[:12] if changes.base_commit else changes.base[:12]
    lines = [f"manifests in {changes.manifests_dir}/ from {base} to {changes.head_commit[:12]}:"]
    rows = [
        *(("added", path) for path in changes.added),
        *(("modified", path) for path in changes.modified),
        *(("renamed", f"{r.old} -> {r.new}") for r in changes.renamed),
        *(("deleted", path) for path in changes.deleted),
    ]
    lines += [f"  {kind:<9} {what}" for kind, what in rows]
    if not rows and not changes.everything:
        lines.append("  (no manifest changed)")
    lines += [f"every manifest: {reason}" for reason in changes.reasons]
    lines += [f"note: {note}" for note in changes.notes]
    lines.append(f"deploy: {' '.join(changes.deploy) if changes.deploy else '(nothing)'}")
    removed = ", ".join(f"{r.app} (was {r.path})" for r in changes.remove)
    lines.append(f"remove: {removed or '(nothing)'}" + ("; and every orphaned app" if changes.prune_orphans else ""))
    return lines


@click.command()
@click.argument("repo")
@click.option(
    "--quant",
    type=click.Choice(QUANTS, case_sensitive=False),
    default=DEFAULT_QUANT,
    show_default=True,
    metavar="QUANT",
    help="The quant whose file to pick (matched in file names, any case).",
)
@click.option(
    "--context",
    type=click.IntRange(min=256),
    metavar="N",
    help="Context length [default: the model's trained context, at most 8192].",
)
@click.option("--name", metavar="NAME", help="Manifest and app name [default: from the file name].")
@click.option(
    "--revision", default="main", show_default=True, metavar="REV", help="Branch, tag or commit of the repository."
)
@click.option(
    "--file", "file", metavar="PATH", help="The .gguf file in the repository, when the quant matches several."
)
@click.option(
    "--manifests",
    "manifests_dir",
    default=DEFAULT_MANIFESTS_DIR,
    show_default=True,
    metavar="DIR",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where to write the manifest.",
)
@click.pass_context
def new(
    ctx: click.Context,
    repo: str,
    quant: str,
    context: int | None,
    name: str | None,
    revision: str,
    file: str | None,
    manifests_dir: Path,
) -> None:
    """Write manifests/<name>.toml for a GGUF model on Hugging Face, then plan it.

    \b
    Lists REPO's GGUF files, picks the one of --quant (Q8_0 by default; for a split model, its
    first shard), reads the model's trained context from the GGUF header (by HTTP range
    requests), writes the manifest, validates it and prints its plan. An existing manifest is
    never overwritten. A repository with no GGUF but SafeTensors (or PyTorch .bin) weights gets
    a manifest with convert_from: they are converted to a GGUF of --quant before the first deploy.

    \b
    Examples:
      gguf-deploy new bartowski/Qwen2.5-7B-Instruct-GGUF
      gguf-deploy new unsloth/gemma-3-4b-it-GGUF --quant Q4_K_M --context 16384 --name gemma-4b
    """
    from deployer.cache import FactsCache, default_cache_dir
    from deployer.conversion.resolve import CONVERSIONS
    from deployer.hub import HfHubClient, Resolver
    from deployer.scaffold import new_manifest

    client = HfHubClient()
    resolver = Resolver(
        client,
        FactsCache(default_cache_dir()),
        progress=lambda message: click.echo(message, err=True),
        conversions=CONVERSIONS,
    )
    result = new_manifest(
        repo,
        client=client,
        resolver=resolver,
        manifests_dir=manifests_dir,
        quant=quant,
        context=context,
        name=name,
        revision=revision,
        file=file,
        app_prefix=app_prefix(ctx),
    )
    loaded = result.loaded
    manifest = loaded.manifest
    source = manifest.file or f"{manifest.convert_from} weights, converted to {manifest.quant}"
    click.echo(f"wrote {display_path(result.path)}: {source}, context {manifest.context} (app {loaded.app_name})")
    if result.projector_note is not None:
        click.echo(f"note: {result.projector_note}", err=True)
    if manifest.mmproj is not None:
        click.echo(
            f"with its multimodal projector {manifest.mmproj}: the model takes images (remove mmproj for text only)"
        )
    if result.facts_error is not None:
        click.echo(f"error: cannot plan it: {result.facts_error}", err=True)
        ctx.exit(EXIT_FAILURE)
    _show_plan(ctx, result.path)


def _show_plan(ctx: click.Context, path: Path) -> None:
    """Plan the new manifest with the plan command itself: same output, facts from the cache."""
    from deployer.cli.plan import plan

    ctx.invoke(plan, paths=(str(path),))
