"""``gguf-deploy validate`` and ``gguf-deploy schema``."""

from __future__ import annotations

import json

import click

from deployer.cli import app_prefix
from deployer.errors import EXIT_FAILURE
from deployer.loading import DEFAULT_MANIFESTS_DIR, load_manifests
from deployer.manifest import manifest_schema

DEFAULT_PATHS = (DEFAULT_MANIFESTS_DIR,)


@click.command()
@click.argument("paths", nargs=-1, type=click.Path(path_type=str))
@click.option("-q", "--quiet", is_flag=True, help="Print only problems.")
@click.pass_context
def validate(ctx: click.Context, paths: tuple[str, ...], quiet: bool) -> None:
    """Check manifests against the format, without network access.

    PATHS are manifest files or folders searched for *.toml (default: manifests/). Every problem
    is one line, 'file:line: key: message', and all of them are reported in one run. The
    model's own limits (trained context, quant of the file, GPU memory) are checked by 'plan'.

    Exit status: 0 when every manifest is valid, 1 otherwise.
    """
    loaded, problems = load_manifests(paths or DEFAULT_PATHS, app_prefix=app_prefix(ctx))
    for problem in problems:
        click.echo(str(problem), err=True)
    if not quiet:
        for item in loaded:
            click.echo(f"{item.path}: ok ({item.app_name})")
    bad = len({p.path for p in problems})
    if problems:
        click.echo(f"{len(problems)} problem(s) in {bad} file(s); {len(loaded)} valid manifest(s)", err=True)
        ctx.exit(EXIT_FAILURE)
    if not loaded:
        click.echo("no manifests found", err=True)
        ctx.exit(EXIT_FAILURE)
    if not quiet:
        click.echo(f"{len(loaded)} valid manifest(s)")


@click.command()
def schema() -> None:
    """Print the manifest JSON schema (committed as schema/manifest.schema.json).

    Editors with a TOML language server (Taplo, Even Better TOML) validate as you type through
    the first line of every manifest: '#:schema ../schema/manifest.schema.json'.
    """
    click.echo(schema_text(), nl=False)


def schema_text() -> str:
    """The schema exactly as committed: two-space indented JSON with a final newline."""
    return json.dumps(manifest_schema(), indent=2, ensure_ascii=False) + "\n"
