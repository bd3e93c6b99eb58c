"""The serving runtime: OpenAI's and Anthropic's APIs with continuous batching, on llama.cpp.

Runs locally (``gguf-deploy serve``) and in the Modal container
(``python -m deployer.runtime --config FILE.json``). Lean by design: importing it does not import
planning, rendering, modal, huggingface_hub or llama_cpp (a test checks); the web stack and
llama.cpp are imported when :func:`serve` runs, llama.cpp on the thread that loads the model.

Two processes by default: the API server (the event loop: HTTP, protocols, chat templates,
tokenizing with the model's vocabulary) and the engine process (the model thread: batching,
sampling, detokenizing), so that neither waits for the other's GIL (``engine/process.py``;
``GGUF_DEPLOY_ENGINE=thread`` keeps them in one, as a model with a projector always does).

    RuntimeConfig     the one configuration object (JSON in the container)
    runtime_config    pure: manifest + model path -> RuntimeConfig
    serve             blocking: bind, load, answer until SIGTERM/SIGINT

The rooms, and the one way the arrows point (a test checks):

    server, app, access, metrics      the process and the HTTP app: routes, auth, limits, logs
      -> protocols/                   the wire: one module per protocol (decoder and encoder) onto
                                      one GenerationRequest; prepare turns it into the engine's work
      -> chat/, media/                the prompt: chat templates and tool-call parsing; images
      -> engine/                      the model thread: scheduler, sampling, checkpoints, and the
                                      ModelInterface it drives; process: the same in a child process
    llama                             the one llama.cpp edge: implements ModelInterface; only the
                                      server names it (``load_model``)
    config, cpu, errors, logs         shared by all
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from deployer.runtime.config import API_KEY_ENV, RuntimeConfig, runtime_config

if TYPE_CHECKING:
    from collections.abc import Callable

    from deployer.runtime.engine.core import Engine

__all__ = ["API_KEY_ENV", "RuntimeConfig", "runtime_config", "serve"]


def serve(
    config: RuntimeConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    on_listening: Callable[[int], None] | None = None,
    on_ready: Callable[[Engine], None] | None = None,
) -> None:
    """Serve ``config`` on ``host:port`` until SIGTERM/SIGINT (see :func:`deployer.runtime.server.serve`)."""
    from deployer.runtime.server import serve as _serve

    _serve(config, host, port, on_listening=on_listening, on_ready=on_ready)
