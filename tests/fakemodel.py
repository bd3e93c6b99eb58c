"""A fake model with the llama.cpp edge's interface: the real HTTP app and engine, without llama.cpp.

Tokens are bytes (id = byte + 3; 0 is BOS, 1 is EOS). Every sequence answers ``reply`` byte by byte,
then EOS; an ``endless`` model never stops (until ``max_tokens``), ``delay_s`` slows each decode step
(a stream stays in flight long enough to be cut or queued behind), and a ``gate`` holds every decode
until the test sets it (what a server does while a prompt decodes, seen without a clock). Served by uvicorn on a thread
(``serve_fake``), so the official clients talk to it over real HTTP in the pull-request check.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from deployer.runtime import RuntimeConfig
from deployer.runtime.engine.sampling import Sampling

BOS, EOS, OFFSET = 0, 1, 3
GATE_TIMEOUT_S = 30  # a gate never set (a failed test) lets the decode go then: the server can stop
TEMPLATE = (Path(__file__).parent / "chat_templates" / "hermes.jinja").read_text(encoding="utf-8")


class FakeModel:
    """Deterministic tokens, no llama.cpp: every member of :class:`ModelInterface` (a test checks)."""

    errors: tuple[type[BaseException], ...] = ()

    def __init__(self, config: RuntimeConfig, reply: str = "Hello from the fake model.", *, endless: bool = False,
                 delay_s: float = 0.0, gate: threading.Event | None = None) -> None:  # fmt: skip
        self.n_ctx, self.n_batch, self.n_threads = config.n_ctx, config.n_batch, 1
        self.n_vocab, self.n_embd = 256 + OFFSET, 4
        self.bos, self.eos, self.eog_tokens = BOS, EOS, (EOS,)
        self.metadata = {"tokenizer.chat_template": TEMPLATE}
        self.reply = list(reply.encode())
        self.endless, self.delay_s, self.gate = endless, delay_s, gate
        self.windowed = False  # no sliding-window layers: no context checkpoints
        self.projector = None  # text only: an image is a 400

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool = True) -> list[int]:
        return ([BOS] if add_special else []) + [b + OFFSET for b in text.encode()]

    def piece(self, token: int) -> bytes:
        return bytes([token - OFFSET]) if token >= OFFSET else b""

    def token_text(self, token: int) -> str:
        return {BOS: "<s>", EOS: "</s>"}.get(token, self.piece(token).decode(errors="replace"))

    def is_eog(self, token: int) -> bool:
        return token == EOS

    def decode(self, entries: Sequence[tuple[int, Sequence[int], int, bool]]) -> list[int]:
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.gate is not None:
            self.gate.wait(GATE_TIMEOUT_S)
        return [row for row, entry in enumerate(entries) if entry[3]]

    def evaluate_image(self, chunk: Any, pos: int, seq: int, logits: bool) -> None:
        raise AssertionError("the fake model has no projector: no image reaches it")

    def logits(self, row: int) -> Any:
        import numpy as np

        return np.zeros(self.n_vocab, dtype=np.float32)  # every token equally likely

    def save_window(self, seq: int) -> Any:
        raise AssertionError("the fake model has no windowed layers")

    def restore_window(self, seq: int, state: Any) -> None:
        raise AssertionError("the fake model has no windowed layers")

    def sampler(self, sampling: Sampling, seed: int) -> FakeSampler:
        return FakeSampler(self)

    # grammars are llama.cpp's: the fake model accepts any with a root rule and never enforces one
    def check_grammar(self, text: str) -> bool:
        return "root" in text and "::=" in text

    def json_grammar(self, schema: dict[str, Any] | None) -> str:
        return 'root ::= "{}"'

    def schema_converter(self) -> Any:
        raise ValueError("the fake model has no JSON-schema converter")

    def chat_formatter(self, name: str) -> Any:
        raise ValueError(f"chat_format '{name}' is not one the fake model knows")

    def forget(self, seq: int, start: int = 0) -> None:
        pass

    def copy(self, source: int, target: int) -> None:
        pass

    def can_rewind(self, seq: int) -> bool:
        return True

    def embed(self, tokens: list[int]) -> list[float]:
        return [float(len(tokens)), 1.0, 0.0, 0.0]

    def close(self) -> None:
        pass


@dataclass
class FakeSampler:
    model: FakeModel
    at: int = 0

    def sample(self, row: int, banned: Sequence[int] = ()) -> int:
        reply = self.model.reply
        if self.at < len(reply) or self.model.endless:
            token = reply[self.at % len(reply)] + OFFSET
            self.at += 1
            return token
        return EOS if EOS not in banned else ord(" ") + OFFSET

    def close(self) -> None:
        pass


@dataclass
class FakeServer:
    url: str
    api_key: str | None
    engine: Any
    _server: Any
    _thread: threading.Thread

    def client(self, **kwargs: Any) -> Any:
        import openai

        options = {"base_url": f"{self.url}/v1", "api_key": self.api_key or "unused", "max_retries": 0}
        return openai.OpenAI(**{**options, "timeout": 30, **kwargs})

    def claude(self, **kwargs: Any) -> Any:
        import anthropic

        options = {"base_url": self.url, "api_key": self.api_key or "unused", "max_retries": 0, "timeout": 30}
        return anthropic.Anthropic(**{**options, **kwargs})

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self.engine.close()


def serve_fake(config: RuntimeConfig, **model: Any) -> FakeServer:
    """The real app and engine over a :class:`FakeModel`, on a free loopback port, on a thread."""
    import uvicorn

    from deployer.runtime.app import build_app
    from deployer.runtime.chat.template import template_of
    from deployer.runtime.engine.core import Engine

    engine = Engine(config, load_model=lambda c: FakeModel(c, **model), load_chat=template_of)
    engine.start()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(config, engine), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return FakeServer(url, config.api_key, engine, server, thread)
        except httpx.TransportError:
            pass
        time.sleep(0.02)
    raise AssertionError("the fake server did not become ready")
