"""``gguf-deploy plan``: resolve every manifest's model and show the GPU choice."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import click

from deployer.cli import app_prefix
from deployer.errors import EXIT_FAILURE, Problem
from deployer.loading import load_manifests
from deployer.plan import POLICIES, Plan, PlanFailure, Policy, plan_all

DEFAULT_PATHS = ("manifests",)


@click.command()
@click.argument("paths", nargs=-1, type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array, one object per manifest.")
@click.option("--markdown", is_flag=True, help="Print a Markdown summary (for a pull request).")
@click.option(
    "--policy",
    type=click.Choice(POLICIES),
    default="table",
    show_default=True,
    help="'table': the selection table, escalated when the model does not fit; 'cheapest': the cheapest GPU set that fits.",
)
@click.option("--offline", is_flag=True, help="Use only the local cache of model facts; no network.")
@click.pass_context
def plan(ctx: click.Context, paths: tuple[str, ...], as_json: bool, markdown: bool, policy: str, offline: bool) -> None:
    """Resolve each manifest's model on Hugging Face and choose its GPU.

    PATHS are manifest files or folders searched for *.toml (default: manifests/). For each
    model only the GGUF header is read, by HTTP range requests; the facts are cached (by repo,
    commit and file) in $GGUF_DEPLOY_CACHE or ~/.cache/gguf-deploy, so --offline can plan again
    without network. HF_TOKEN is used for gated or private repos.

    \b
    Examples:
      gguf-deploy plan                              every manifest, as tables
      gguf-deploy plan manifests/x.toml --json      machine-readable
      gguf-deploy plan --markdown > plan.md         a pull-request summary
      gguf-deploy plan --offline                    from the cache only

    Every manifest is reported; the exit status is 1 if any of them failed.
    """
    from rich.console import Console

    from deployer.conversion.resolve import CONVERSIONS
    from deployer.hub import Resolver

    if as_json and markdown:
        raise click.UsageError("--json and --markdown exclude each other")
    loaded, problems = load_manifests(paths or DEFAULT_PATHS, app_prefix=app_prefix(ctx))
    stderr = Console(stderr=True, highlight=False)
    with stderr.status("planning…") as status:
        resolver = Resolver.default(
            offline=offline, progress=lambda message: status.update(message), conversions=CONVERSIONS
        )
        results = plan_all(
            loaded,
            resolver.resolve_manifest,
            policy=cast(Policy, policy),  # click.Choice(POLICIES) guarantees it
        )
    results = _invalid(problems) + results
    if as_json:
        from deployer.plan_report import plan_json

        click.echo(json.dumps(plan_json(results), indent=2))
    elif markdown:
        from deployer.plan_report import plan_markdown

        click.echo(plan_markdown(results), nl=False)
    else:
        _print_tables(results)
    failures = [r for r in results if isinstance(r, PlanFailure)]
    for failure in failures:
        for line in failure.error.splitlines():
            click.echo(f"error: {line}", err=True)
    if not results:
        click.echo("no manifests found", err=True)
    if failures or not results:
        ctx.exit(EXIT_FAILURE)


def _invalid(problems: list[Problem]) -> list[Plan | PlanFailure]:
    """Manifests that did not load, as failures: one per file, every problem in its message."""
    by_path: dict[str, list[str]] = {}
    for problem in problems:
        by_path.setdefault(problem.path, []).append(str(problem))
    return [PlanFailure(path, Path(path).stem, "\n".join(lines)) for path, lines in by_path.items()]


def _print_tables(results: Sequence[Plan | PlanFailure]) -> None:
    from rich.console import Console

    from deployer.plan_report import plan_tables

    plans = [r for r in results if isinstance(r, Plan)]
    console = Console(highlight=False)
    for table in plan_tables(plans):
        console.print(table)
        console.print()
    if plans:
        console.print(f"{len(plans)} planned, {len(results) - len(plans)} failed")
