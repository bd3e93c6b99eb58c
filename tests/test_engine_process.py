"""The engine in a process of its own (deployer.runtime.engine.process): what crosses, and what happens
when one of the two processes dies. Everything else a server does is the rest of the suite's: every
real-model server there runs this engine (the default)."""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from deployer.errors import ServeError
from deployer.runtime import RuntimeConfig
from deployer.runtime.engine.core import Engine
from deployer.runtime.engine.errors import Busy, Failed, ShuttingDown
from deployer.runtime.engine.process import RECEIVE_BYTES, Channel, EngineProcess
from deployer.runtime.errors import ApiError
from deployer.runtime.server import ENGINE_ENV, make_engine

# ## What crosses


def test_the_channel_carries_every_message_whole_in_order() -> None:
    a, b = socket.socketpair()
    sender, receiver = Channel(a), Channel(b)
    big = list(range(RECEIVE_BYTES // 2))  # pickles to more than one receive buffer
    messages = [("batch", [(i, "pieces", "x" * i)], None) for i in range(50)] + [("submit", 7, big)]
    writer = threading.Thread(target=lambda: [sender.send(m) for m in messages])  # more than a socket holds
    writer.start()
    got: list[object] = []
    deadline = time.monotonic() + 10
    while len(got) < len(messages) and time.monotonic() < deadline:
        got += receiver.received()  # never waits: what has arrived, in whole messages
    writer.join(10)
    assert got == messages
    assert receiver.received() == []
    sender.send(("close", 1.5))
    assert receiver.recv() == ("close", 1.5)
    sender.close()
    with pytest.raises(EOFError):
        receiver.received()


def test_errors_cross_the_process_boundary_with_their_fields() -> None:
    error = ApiError(400, "bad grammar", param="grammar", code="bad", headers={"x": "1"})
    back = pickle.loads(pickle.dumps(error))
    assert (back.status, back.message, back.param, back.code, back.type, back.headers) == (
        400,
        "bad grammar",
        "grammar",
        "bad",
        "invalid_request_error",
        {"x": "1"},
    )
    assert str(pickle.loads(pickle.dumps(ShuttingDown()))) == str(ShuttingDown())
    assert pickle.loads(pickle.dumps(Failed("LlamaError"))).kind == "LlamaError"
    busy = pickle.loads(pickle.dumps(Busy(8, 8, 3)))
    assert (busy.in_flight, busy.limit, busy.retry_after) == (8, 8, 3)


# ## Which engine


def test_the_engine_runs_in_its_own_process_unless_told_or_a_projector_needs_it_here(tmp_path: Path) -> None:
    config = RuntimeConfig(model_name="m", model_path=str(tmp_path / "m.gguf"), n_ctx=256)
    assert isinstance(make_engine(config), EngineProcess)
    assert isinstance(make_engine(config, "process"), EngineProcess)
    assert isinstance(make_engine(config, "thread"), Engine)
    vision = replace(config, mmproj_path=str(tmp_path / "mmproj.gguf"))
    assert isinstance(make_engine(vision), Engine)
    with pytest.raises(ServeError, match=f"{ENGINE_ENV}=process: a model with a projector .* runs its engine in"):
        make_engine(vision, "process")
    with pytest.raises(ServeError, match=f"{ENGINE_ENV}='threads': expected 'process' or 'thread'"):
        make_engine(config, "threads")


# ## With a real model


def _tiny(model: Path, **changes: object) -> RuntimeConfig:
    settings = {"model_name": "tiny", "model_path": str(model), "n_ctx": 2048, "parallel": 2, "n_threads": 1}
    return RuntimeConfig(**{**settings, **changes})  # type: ignore[arg-type]


def _engine_pid(server) -> int:
    ready = [e for e in server.log_lines() if e["event"] == "api_ready"]
    assert ready, server.log_tail()
    return int(ready[0]["engine_pid"])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")  # a zombie is gone too


@pytest.mark.model
def test_both_engines_answer_alike(start_server, tiny_llama_file) -> None:
    """The same request, greedy and seeded, with logprobs: the same tokens from either engine."""
    servers = {mode: start_server(_tiny(tiny_llama_file), env={ENGINE_ENV: mode}) for mode in ("process", "thread")}
    answers = {}
    for mode, server in servers.items():
        with server.http() as http:
            plain = http.post(
                "/v1/completions",
                json={"prompt": "Once upon", "max_tokens": 24, "temperature": 0, "logprobs": 2, "n": 2},
            ).json()
            seeded = http.post(
                "/v1/completions", json={"prompt": "Once upon", "max_tokens": 24, "seed": 5, "temperature": 1.0}
            ).json()
            with http.stream(
                "POST", "/v1/completions", json={"prompt": "Once", "max_tokens": 16, "temperature": 0, "stream": True}
            ) as stream:
                events = [line for line in stream.iter_lines() if line.startswith("data: {")]
        streamed = "".join(json.loads(e[6:])["choices"][0]["text"] for e in events)
        answers[mode] = (
            [(c["text"], c["logprobs"]["token_logprobs"], c["finish_reason"]) for c in plain["choices"]],
            plain["usage"],
            seeded["choices"][0]["text"],
            streamed,
        )
    assert answers["process"] == answers["thread"]
    assert answers["process"][0][0][0]  # some text came back


@pytest.mark.model
def test_when_the_engine_process_dies_requests_fail_and_the_server_exits_1(start_server, tiny_llama_file) -> None:
    server = start_server(_tiny(tiny_llama_file))
    engine = _engine_pid(server)
    with server.http() as http:
        body = {"prompt": "Once", "max_tokens": 1900, "min_tokens": 1900, "temperature": 0, "stream": True}
        with http.stream("POST", "/v1/completions", json=body) as stream:
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("data: {"))
            os.kill(engine, signal.SIGKILL)
            rest = list(lines)
    error = [json.loads(line[6:]) for line in rest if line.startswith("data: {") and '"error"' in line]
    assert error, rest[-3:]
    assert error[0]["error"]["type"] == "server_error"
    assert "internal error (EngineProcessExited)" in error[0]["error"]["message"]
    assert server.process.wait(30) == 1  # its supervisor (Modal) starts another container
    exited = [e for e in server.log_lines() if e["event"] == "engine_process_exited"]
    assert exited and "the engine process exited (signal 9)" in exited[0]["error"]
    assert "Traceback" not in server.log_path.read_text()


@pytest.mark.model
def test_the_engine_process_goes_with_the_server(start_server, tiny_llama_file) -> None:
    server = start_server(_tiny(tiny_llama_file))
    engine = _engine_pid(server)
    assert _alive(engine)
    server.process.kill()  # no shutdown at all: the kernel tells the engine (PR_SET_PDEATHSIG)
    server.process.wait(10)
    deadline = time.monotonic() + 10
    while _alive(engine) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(engine)


@pytest.mark.model
def test_metrics_count_what_the_engine_process_did(start_server, tiny_llama_file) -> None:
    server = start_server(_tiny(tiny_llama_file))
    with server.http() as http:
        http.post("/v1/completions", json={"prompt": "Once", "max_tokens": 8, "min_tokens": 8}).raise_for_status()
        text = http.get("/metrics").text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line and line[0] != "#"}
    assert values["gguf_deploy_generation_tokens_total"] == 8
    assert values["gguf_deploy_slots"] == 2 and values["gguf_deploy_slots_busy"] == 0
    assert values['gguf_deploy_engine_seconds_total{stage="decode"}'] > 0
    health = httpx.get(f"{server.url}/health", timeout=10).json()
    assert health["status"] == "ok" and health["in_flight"] == 0


@pytest.mark.model
@pytest.mark.parametrize("engine", ["process", "thread"])
def test_a_logit_bias_reaches_the_sampler(start_server, tiny_llama_file, engine) -> None:
    """+100 on one token: every token sampled is that one, at any temperature (the biases cross as an array)."""
    server = start_server(_tiny(tiny_llama_file), env={ENGINE_ENV: engine})
    with server.http() as http:
        piece = http.post("/detokenize", json={"tokens": [300]}).json()["content"]
        body = {"prompt": "Once", "max_tokens": 12, "min_tokens": 12, "temperature": 1.5, "seed": 3}
        answer = http.post("/v1/completions", json={**body, "logit_bias": {"300": 100, "301": -100}}).json()
    assert "choices" in answer, answer
    assert piece and answer["choices"][0]["text"] == piece * 12
