"""The ``gguf-deploy`` command line: a thin layer that parses arguments, calls the library and
renders the result. Errors become exit codes here and nowhere else.

Exit codes: 0 ok · 1 invalid input or a failed operation · 2 usage error · 130 interrupted.

Each command lives in a module of this package and is imported only when it runs (or when
``--help`` lists it), so ``gguf-deploy validate`` never pays for importing modal or llama.cpp.
Command modules import heavy libraries inside their functions, not at the top.
"""

from __future__ import annotations

import importlib
from typing import Any

import click

from deployer import __version__
from deployer.errors import GgufDeployError
from deployer.manifest import DEFAULT_APP_PREFIX

# command name -> "module:attribute"; the order is the order of `gguf-deploy --help`
COMMANDS: dict[str, str] = {
    "validate": "deployer.cli.validate:validate",
    "schema": "deployer.cli.validate:schema",
    "plan": "deployer.cli.plan:plan",
    "serve": "deployer.cli.serve:serve",
    "render": "deployer.cli.deploy:render",
    "deploy": "deployer.cli.deploy:deploy",
    "status": "deployer.cli.deploy:status",
    "destroy": "deployer.cli.deploy:destroy",
    "changed": "deployer.cli.gitops:changed",
    "new": "deployer.cli.gitops:new",
}


class _Group(click.Group):
    """Loads commands on demand and turns library errors into one line and an exit code."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None  # click reports the unknown command
        module_name, _, attribute = target.partition(":")
        return getattr(importlib.import_module(module_name), attribute)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except GgufDeployError as exc:
            for line in exc.show():
                click.echo(line, err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "-V", "--version", prog_name="gguf-deploy")
@click.option(
    "--app-prefix",
    default=DEFAULT_APP_PREFIX,
    show_default=True,
    envvar="GGUF_DEPLOY_APP_PREFIX",
    show_envvar=True,
    metavar="PREFIX",
    help="Prefix of every Modal app name: <PREFIX>-<manifest name>.",
)
@click.pass_context
def main(ctx: click.Context, app_prefix: str) -> None:
    """Serve GGUF models (llama.cpp) as OpenAI-compatible APIs on Modal, one TOML manifest per model.

    \b
    The pipeline:  manifest -> model facts (Hugging Face + GGUF header) -> plan (GPU) -> Modal app
    \b
    Typical use:
      gguf-deploy validate                    check every manifest in manifests/
      gguf-deploy plan manifests/x.toml       show the GPU choice and its memory estimate
      gguf-deploy serve manifests/x.toml      run the same server locally
      gguf-deploy deploy                      deploy every manifest to Modal

    Exit codes: 0 ok, 1 invalid input or failed operation, 2 usage error.
    """
    ctx.obj = {"app_prefix": app_prefix}


def app_prefix(ctx: click.Context) -> str:
    """The --app-prefix given to the root command."""
    return ctx.find_root().obj["app_prefix"]
