"""Serving: bind the port, load the model beside it, run uvicorn until SIGTERM or Ctrl-C.

The port is bound first, so "port in use" is a clear error, and ``/health`` answers 503 while
the model loads on its own thread (the imports of the web stack overlap the load). SIGTERM and
SIGINT stop accepting connections and drain the engine: a request still waiting for a slot gets a
503 with ``Retry-After`` at once (the client, or Modal, retries it on another container), a new
one too; the admitted ones have ``shutdown_grace_s`` to finish, then what is left is cut at its
next token (a stream ends with an error event, a plain request gets 503). :func:`serve` returns
normally (exit status 0).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from deployer.errors import ServeError
from deployer.runtime import logs
from deployer.runtime.chat.template import template_of
from deployer.runtime.config import API_KEY_ENV, RuntimeConfig
from deployer.runtime.engine.core import Engine
from deployer.runtime.engine.process import EngineProcess

ENGINE_ENV = "GGUF_DEPLOY_ENGINE"  # process (default) | thread: where the model thread runs

# after the grace period, the requests just cancelled get this long to send their answers before
# uvicorn kills their handlers (a traceback each); a generation stops at its next token, but a
# prompt being evaluated only when it is done
ANSWER_AFTER_CANCEL_S = 5.0


def serve(
    config: RuntimeConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    on_listening: Callable[[int], None] | None = None,
    on_ready: Callable[[Engine], None] | None = None,
) -> None:
    """Serve ``config`` on ``host:port`` until SIGTERM/SIGINT; blocks.

    ``port`` 0 picks a free port (``on_listening`` receives it). ``on_ready`` runs once the model
    is loaded. Raises :class:`ServeError` when the server cannot start or the model cannot load.
    """
    config = config.with_environment()
    if config.require_api_key and not config.api_key:
        raise ServeError(f"authentication is enabled but no API key is set: set {API_KEY_ENV} (or api_key)")
    model = Path(config.model_path)
    if not model.exists():
        raise ServeError(f"{model}: no such model file")
    if model.is_dir():
        raise ServeError(f"{model}: is a directory, not a .gguf file")
    engine = make_engine(config, os.environ.get(ENGINE_ENV))  # refused before the port is taken; starts nothing
    sock = bind(host, port)
    logs.configure()
    failed = threading.Event()
    engine.start(on_ready=on_ready, on_failure=lambda _engine: failed.set())  # loads while uvicorn imports
    try:
        server = _server(config, engine, failed)
        actual_port = sock.getsockname()[1]
        logs.event("listening", host=host, port=actual_port, model=config.model_name, auth=config.api_key is not None)
        if on_listening:
            on_listening(actual_port)
        server.run(sockets=[sock])
    finally:
        engine.close(timeout=config.shutdown_grace_s)
        sock.close()
    if engine.state == "failed":
        raise ServeError(engine.error or "the model could not be loaded")
    logs.event("stopped", model=config.model_name)


def make_engine(config: RuntimeConfig, choice: str | None = None) -> Engine | EngineProcess:
    """The engine of ``config``: in a process of its own (``process``, the default), or on a thread of
    the API server's (``thread``: a model with a projector, whose images are prepared with the model's
    own context, always runs so). ``choice`` is ``$GGUF_DEPLOY_ENGINE``."""
    if choice not in (None, "", "process", "thread"):
        raise ServeError(f"{ENGINE_ENV}={choice!r}: expected 'process' or 'thread'")
    if choice == "process" and config.mmproj_path:
        raise ServeError(
            f"{ENGINE_ENV}=process: a model with a projector ({config.mmproj_path}) runs its engine in the "
            "API server's process; unset it"
        )
    if choice == "thread" or config.mmproj_path:
        return Engine(config, load_model=_load_llama, load_chat=template_of)
    return EngineProcess(config, load_model=_load_llama, load_vocabulary=_load_vocabulary, load_chat=template_of)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``; :class:`ServeError` with the reason otherwise."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise ServeError(f"cannot listen on '{host}': {exc.strerror}") from exc
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart must not wait for TIME_WAIT
    try:
        sock.bind(address)
        sock.listen(128)  # connections made while the web stack imports wait in the backlog
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ServeError(f"port {port} on {host} is already in use; choose another port") from exc
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return sock


def _server(config: RuntimeConfig, engine: Engine, failed: threading.Event) -> Any:
    import uvicorn

    from deployer.runtime.app import build_app

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            import asyncio

            engine.drain()  # the queued requests get a 503 now; the running ones have the grace period
            asyncio.get_running_loop().call_later(config.shutdown_grace_s, engine.cancel_all)
            await super().shutdown(sockets)

        async def on_tick(self, counter: int) -> bool:
            if failed.is_set():  # the model did not load: nothing to serve
                self.should_exit = True
            return await super().on_tick(counter)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn re-raises the signal after a graceful shutdown, which turns Ctrl-C into a
            # traceback and SIGTERM into death by signal; here serve() simply returns
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            import signal

            handled = (signal.SIGINT, signal.SIGTERM)
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server(
        uvicorn.Config(
            build_app(config, engine),
            http="httptools",  # C parser and writer: h11 costs ~30 % more event-loop CPU per streamed token
            ws="none",
            lifespan="off",
            log_level="warning",
            access_log=False,  # our own log line per request replaces it
            server_header=False,
            timeout_graceful_shutdown=config.shutdown_grace_s + ANSWER_AFTER_CANCEL_S,
        )
    )


def _load_llama(config: RuntimeConfig) -> Any:
    """llama.cpp's model: imported here, on the model thread, so the web stack never waits for it."""
    from deployer.runtime import llama

    return llama.load(config)


def _load_vocabulary(config: RuntimeConfig) -> Any:
    """The model's vocabulary only, for the API server when the engine runs in its own process."""
    from deployer.runtime import llama

    return llama.load_vocabulary(config)
