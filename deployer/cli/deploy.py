"""``gguf-deploy render``, ``deploy``, ``status`` and ``destroy``: the Modal side of the CLI.

The work is done by :mod:`deployer.render` and :mod:`deployer.modal_ops`; this module parses
arguments, builds the Hugging Face resolver and the Modal client, and prints. Tests may hand in
their own ``planner`` and ``modal_client`` through the root context object.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from deployer.changes import source_commit
from deployer.cli import app_prefix
from deployer.errors import EXIT_FAILURE
from deployer.loading import DEFAULT_MANIFESTS_DIR, LoadedManifest, load_manifest, load_manifests

DEFAULT_PATHS = (DEFAULT_MANIFESTS_DIR,)
DEFAULT_OUTPUT = "rendered"

_env_option = click.option(
    "-e", "--env", default=None, metavar="ENV", help="Modal environment (default: the profile's, as modal does)."
)
_offline_option = click.option(
    "--offline", is_flag=True, help="Use only cached model facts; never contact Hugging Face."
)
_output_option = click.option(
    "-o",
    "--output",
    "out_dir",
    default=DEFAULT_OUTPUT,
    show_default=True,
    metavar="DIR",
    type=click.Path(file_okay=False, path_type=str),
    help="Folder the app files are written to.",
)


@click.command()
@click.argument("manifest", type=click.Path(path_type=str))
@_output_option
@_offline_option
@click.pass_context
def render(ctx: click.Context, manifest: str, out_dir: str, offline: bool) -> None:
    """Write the Modal app file of MANIFEST and print its path.

    \b
    The file is the template (templates/modal_app.py) with the resolved plan as one data
    literal, PLAN; import it, read it, or `modal deploy` it yourself.
    \b
    Example:
      gguf-deploy render manifests/dark-champion-18b.toml -o rendered/
    """
    from deployer.render import Provenance, write_app
    from deployer.render import render as render_app

    loaded = load_manifest(manifest, app_prefix=app_prefix(ctx))
    plan = _planner(ctx, offline)(loaded)
    rendered = render_app(plan, Provenance(loaded.path, source_commit(loaded.path)))
    path = write_app(rendered, out_dir)
    click.echo(
        f"{loaded.path}: {rendered.app_name} on {', '.join(plan.modal_gpus)}, config {rendered.config_hash}", err=True
    )
    click.echo(str(path))


@click.command()
@click.argument("paths", nargs=-1, type=click.Path(path_type=str))
@click.option("--dry-run", is_flag=True, help="Plan and render only: nothing on Modal is read or changed.")
@click.option("--force", is_flag=True, help="Deploy even when the live app has the same config hash.")
@_env_option
@_output_option
@click.pass_context
def deploy(
    ctx: click.Context, paths: tuple[str, ...], dry_run: bool, force: bool, env: str | None, out_dir: str
) -> None:
    """Deploy manifests to Modal: plan, render, download the weights, deploy.

    \b
    PATHS are manifest files or folders (default: manifests/). For each manifest: resolve the
    model and choose the GPU; render the app into --output; skip it when the live app's config
    hash is the same ("unchanged"); otherwise download the weights into the shared Volume
    (`modal run <app>::download_weights`) and `modal deploy` the app. A failing manifest does
    not stop the others; a summary table ends the run.
    \b
    Needs Modal credentials (MODAL_TOKEN_ID and MODAL_TOKEN_SECRET, or `modal token new`) and
    the API-key secret (`modal secret create gguf-api-key GGUF_DEPLOY_API_KEY=<key>`).
    \b
    Examples:
      gguf-deploy deploy --dry-run
      gguf-deploy deploy manifests/dark-champion-18b.toml --env staging
    \b
    Exit status: 0 when every manifest is deployed or unchanged, 1 otherwise.
    """
    from deployer.modal_ops import deploy_all

    loaded, problems = load_manifests(paths or DEFAULT_PATHS, app_prefix=app_prefix(ctx))
    if not loaded and not problems:
        click.echo("no manifests found", err=True)
        ctx.exit(EXIT_FAILURE)
    client = None if dry_run else _modal_client(ctx)  # credentials are checked before anything else
    results = deploy_all(
        loaded,
        plan_one=_planner(ctx, offline=False),
        client=client,
        out_dir=out_dir,
        env=env,
        dry_run=dry_run,
        force=force,
        problems=problems,
        source_commit=source_commit(paths[0] if paths else DEFAULT_PATHS[0]),
        on_plan=_show_plan if dry_run else None,
    )
    _table(
        ["manifest", "app", "GPU", "config", "result", "detail"],
        [[r.path, r.app_name, r.gpu, r.config_hash, r.outcome, r.detail] for r in results],
    )
    counts = {outcome: sum(r.outcome == outcome for r in results) for outcome in ("deployed", "unchanged", "failed")}
    if dry_run:
        rendered = sum(r.outcome == "rendered" for r in results)
        click.echo(f"dry run: nothing was deployed; {rendered} app file(s) rendered in {out_dir}/")
    else:
        click.echo(f"{counts['deployed']} deployed, {counts['unchanged']} unchanged, {counts['failed']} failed")
    if counts["failed"]:
        ctx.exit(EXIT_FAILURE)


@click.command()
@click.argument("paths", nargs=-1, type=click.Path(path_type=str))
@_env_option
@_offline_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON (a list of objects) for scripts.")
@click.pass_context
def status(ctx: click.Context, paths: tuple[str, ...], env: str | None, offline: bool, as_json: bool) -> None:
    """Show which manifests are live on Modal, and which live apps have no manifest.

    \b
    States: deployed (the live app's config hash is the manifest's), drifted (it differs: the
    manifest, the model's commit or gguf-deploy changed since), not deployed, orphan (a live app
    gguf-deploy made that no manifest produces), unmanaged (a live app with the prefix that
    gguf-deploy did not make), unknown (the manifest could not be planned). Orphans and unmanaged
    apps are listed only when every manifest is read (no PATH, or the manifests/ folder itself):
    of a subset, the other manifests' apps would look orphaned.
    \b
    Exit status: 0, or 1 when a manifest could not be read or planned.
    """
    from deployer.modal_ops import app_status

    loaded, problems = load_manifests(paths or DEFAULT_PATHS, app_prefix=app_prefix(ctx))
    client = _modal_client(ctx)
    apps = client.list_apps(env, app_prefix(ctx))
    every = not paths or {Path(p).resolve() for p in paths} == {Path(p).resolve() for p in DEFAULT_PATHS}
    rows = app_status(loaded, apps, plan_one=_planner(ctx, offline), prefix=app_prefix(ctx), orphans=every)
    for problem in problems:
        click.echo(str(problem), err=True)
    if as_json:
        click.echo(json.dumps([asdict(row) for row in rows], indent=2))
    else:
        _table(
            ["app", "state", "manifest", "config", "live config", "detail"],
            [[r.app_name, r.state, r.path, r.config_hash, r.live_config, r.detail] for r in rows],
        )
    if problems or any(row.state == "unknown" for row in rows):
        ctx.exit(EXIT_FAILURE)


@click.command()
@click.argument("name")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@_env_option
@click.pass_context
def destroy(ctx: click.Context, name: str, yes: bool, env: str | None) -> None:
    """Stop the Modal app NAME (an app name, or a manifest name under the prefix).

    The endpoint stops answering and its containers are terminated; the weights stay in the
    Volume. Asks first unless --yes.

    \b
    Example:
      gguf-deploy destroy dark-champion-18b --yes
    """
    from deployer.modal_ops import find_app

    client = _modal_client(ctx)
    app = find_app(name, client.list_apps(env, app_prefix(ctx)), app_prefix(ctx))
    where = f" in environment '{env}'" if env else ""
    if not yes:
        click.confirm(f"Stop Modal app '{app.name}' ({app.app_id}){where}? Its endpoint stops answering.", abort=True)
    client.stop(app.name, env)
    click.echo(f"stopped {app.name}{where}")


# ## Wiring


def _planner(ctx: click.Context, offline: bool) -> Callable[[LoadedManifest], Any]:
    """manifest → Plan: the Hugging Face resolver (cached) and the planner, or the test's own."""
    given = (ctx.find_root().obj or {}).get("planner")
    if given is not None:
        return given
    from deployer.conversion.resolve import CONVERSIONS
    from deployer.hub import Resolver
    from deployer.plan import plan

    resolver = Resolver.default(
        offline=offline, progress=lambda message: click.echo(message, err=True), conversions=CONVERSIONS
    )

    def plan_one(loaded: LoadedManifest) -> Any:
        return plan(loaded, resolver.resolve_manifest(loaded))

    return plan_one


def _modal_client(ctx: click.Context) -> Any:
    given = (ctx.find_root().obj or {}).get("modal_client")
    if given is not None:
        return given
    from deployer.modal_ops import ModalCli

    return ModalCli.from_env(echo=lambda line: click.echo(f"  modal: {line}", err=True))


def _show_plan(plan: Any, path: Path) -> None:
    from deployer.plan import breakdown, gib

    facts, est = plan.facts, plan.estimate
    fallbacks = ", ".join(f.modal for f in plan.fallbacks) or "none"
    click.echo(f"{plan.manifest.path} -> {plan.manifest.app_name}")
    click.echo(
        f"  model     {facts.repo} @ {facts.commit[:12]} ({plan.manifest.manifest.quant}, {gib(facts.size_bytes)})"
    )
    click.echo(f"  GPU       {plan.gpu.modal} (fallbacks: {fallbacks}), ${plan.gpu.usd_per_hour:.2f}/h: {plan.reason}")
    click.echo(f"  memory    {gib(est.per_gpu)} per GPU of {gib(plan.gpu.usable_bytes)} usable ({breakdown(est)})")
    click.echo(f"  app file  {path}")


def _table(headers: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(*headers, box=None, pad_edge=False, header_style="bold")
    for row in rows:
        table.add_row(*row)
    Console(soft_wrap=False).print(table)
