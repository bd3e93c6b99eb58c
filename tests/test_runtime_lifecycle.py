"""The runtime process: loading, failing to load, stopping on SIGTERM, and per-model settings."""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import math
import os
import signal
import struct
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from deployer.runtime import API_KEY_ENV, RuntimeConfig
from tests.serving import gemma_config

pytestmark = pytest.mark.model


def _tiny(model: Path, **changes) -> RuntimeConfig:
    return RuntimeConfig(**{"model_name": "tiny", "model_path": str(model), "n_ctx": 256, **changes})


def _open_for_writing(fifo: Path, timeout: float = 60) -> int:
    """Open a FIFO once the server has opened it for reading (never blocks the test forever)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_health_is_503_while_loading_and_a_failed_load_exits_1(start_server, tmp_path):
    # the model file is a FIFO: llama.cpp blocks opening it, so "loading" lasts as long as the test wants
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    server = start_server(_tiny(fifo, api_key="k"), ready=False)
    health = server.health()
    assert health.status_code == 503 and health.json()["status"] == "loading"
    with server.http() as http:
        busy = http.post("/v1/completions", json={"prompt": "hi"})
    assert busy.status_code == 503 and busy.json()["error"]["code"] == "model_loading"
    assert int(busy.headers["retry-after"]) >= 1
    descriptor = _open_for_writing(fifo)  # unblocks llama.cpp, which then fails on what it reads
    with contextlib.suppress(BrokenPipeError):  # it may give up (and close) before the bytes arrive
        os.write(descriptor, b"this is not a GGUF file")
    os.close(descriptor)
    assert server.process.wait(60) == 1
    output = server.log_path.read_text()
    assert "Traceback" not in output
    assert f"error: {fifo}: llama.cpp could not load the model" in output.splitlines()[-1]
    assert [e["event"] for e in server.log_lines() if e["event"] in ("loading", "load_failed")] == [
        "loading",
        "load_failed",
    ]


def test_sigterm_when_idle_exits_0(start_server, tiny_llama_file):
    server = start_server(_tiny(tiny_llama_file))
    started = time.monotonic()
    assert server.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 10
    assert server.log_lines()[-1]["event"] == "stopped"


def test_sigterm_refuses_the_queue_at_once_and_cuts_a_long_stream_after_the_grace_period(start_server, gemma_file):
    # one slot: the second request waits for it
    config = gemma_config(
        gemma_file, n_ctx=1024, parallel=1, concurrency=2, shutdown_grace_s=2.0, require_api_key=False
    )
    server = start_server(config)
    body = {"prompt": "1, 2, 3, 4, 5,", "max_tokens": 900, "temperature": 0, "stream": True}
    received: list = []
    queued: list = []

    def read() -> None:
        try:
            with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as response:
                received.extend(line for line in response.iter_lines() if line.startswith("data: "))
        except httpx.HTTPError as exc:  # the connection is closed mid-stream
            received.append(exc)

    def wait_in_queue() -> None:  # behind the stream: it never starts
        queued.append(httpx.post(server.url + "/v1/completions", json={**body, "stream": False}, timeout=60))
        queued.append(len(received))  # how far the stream was when the refusal came

    reader = threading.Thread(target=read)
    reader.start()
    while len(received) < 3:
        time.sleep(0.02)
    waiter = threading.Thread(target=wait_in_queue)
    waiter.start()
    while server.health().json()["in_flight"] < 2:
        time.sleep(0.02)
    stopped = time.monotonic()
    assert server.stop(signal.SIGTERM) == 0
    reader.join(30)
    waiter.join(30)
    assert time.monotonic() - stopped < 6  # the grace period (2 s), not the 900 tokens (15 s here), nor twice it
    assert len(received) < 400
    # the cut is said, not hidden: the stream ends with an error event, the queued request gets a 503
    assert received[-1] == "data: [DONE]"
    assert json.loads(received[-2].removeprefix("data: "))["error"]["code"] == "shutting_down"
    answer, streamed_by_then = queued
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "shutting_down"
    # refused at once, to be retried elsewhere: while the admitted stream still ran on
    assert answer.headers["retry-after"] == "0"
    assert len(received) > streamed_by_then
    assert "Traceback" not in server.log_path.read_text()
    assert server.log_lines()[-1]["event"] == "stopped"


# ## Settings that differ per model


@pytest.fixture
def tiny_embedding_server(start_server, tiny_llama_file):
    return start_server(_tiny(tiny_llama_file, embeddings=True))


def _unit_length(vector: list[float]) -> float:
    return math.sqrt(sum(x * x for x in vector))


def test_embeddings_when_the_manifest_enables_them(tiny_embedding_server):
    client = tiny_embedding_server.client()
    default = client.embeddings.create(model="tiny", input=["w1 w2 w3", "w4"])  # the SDK asks for base64
    floats = client.embeddings.create(model="tiny", input=["w1 w2 w3", "w4"], encoding_format="float")
    assert [len(d.embedding) for d in default.data] == [256, 256]  # n_embd of the tiny llama
    assert [d.index for d in floats.data] == [0, 1]
    for a, b in zip(default.data, floats.data, strict=True):
        assert a.embedding == pytest.approx(b.embedding, abs=1e-6)
        assert _unit_length(b.embedding) == pytest.approx(1.0, abs=1e-4)
    assert default.data[0].embedding != pytest.approx(default.data[1].embedding)
    assert default.usage.prompt_tokens > 0
    with httpx.Client(base_url=tiny_embedding_server.url) as http:
        raw = http.post("/v1/embeddings", json={"input": "w1", "encoding_format": "base64"}).json()
        shorter = http.post("/v1/embeddings", json={"input": "w1", "dimensions": 8})
    vector = struct.unpack("<256f", base64.b64decode(raw["data"][0]["embedding"]))
    assert _unit_length(list(vector)) == pytest.approx(1.0, abs=1e-4)
    assert shorter.status_code == 400 and "256-dimensional" in shorter.json()["error"]["message"]


def test_a_model_without_chat_template_refuses_chat_but_completes(tiny_embedding_server):
    client = tiny_embedding_server.client()
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["code"] == "no_chat_template"
    assert "chat_format" in info.value.body["message"]
    reply = client.completions.create(model="tiny", prompt="w1 w2 w3", max_tokens=100_000, temperature=0)
    # max_tokens far beyond the context is clamped to it, not an error
    assert reply.usage.prompt_tokens + reply.usage.completion_tokens <= 256
    assert reply.usage.completion_tokens > 0


def test_api_key_from_the_environment(start_server, tiny_llama_file):
    server = start_server(_tiny(tiny_llama_file, require_api_key=True), env={API_KEY_ENV: "env-key"})
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert server.client(api_key="env-key").models.list().data[0].id == "tiny"
    assert next(e for e in server.log_lines() if e["event"] == "listening")["auth"] is True
