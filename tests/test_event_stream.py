"""A stream's body chunks: written by the ticket's sink as the engine's batch is read (no task woken per
token), queued behind a send that waits for a slow client, and always in order (deployer/runtime/app.py);
several steps read at once written once per stream; the head sent when the job leaves the queue."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deployer.runtime.access import SERVER_SEND, RequestLog
from deployer.runtime.app import _EventStream, _Watch
from deployer.runtime.engine.core import DONE, Tally, Ticket, coalesce


class Encoder:
    def events(self, pieces: list[str]) -> bytes:
        return "".join(pieces).encode() if pieces else b"first;"  # no pieces: the stream's opening

    def error_event(self, error: Any) -> bytes:
        return b"<error>"

    def end(self, tally: Tally) -> bytes:
        return b"<end>"


class Client:
    """The ASGI server's side: what was sent, in order; a send may wait until ``release``."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.hold: set[bytes] = set()  # bodies whose send waits for release
        self.release = asyncio.Event()
        self.fail: set[bytes] = set()

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            body = message["body"]
            if body in self.fail:
                raise ConnectionError("the transport broke")
            if body in self.hold:
                await self.release.wait()
            self.bodies.append(body)

    async def receive(self) -> dict[str, Any]:
        await asyncio.Event().wait()  # the client never leaves
        raise AssertionError


STARTED: list[Ticket] = []  # the tickets of the test running now (see _run)


def _run(test: Callable[[], Awaitable[Any]]) -> Any:
    """Run ``test``; a stream it leaves waiting (after a failed assertion) is let go, so a failure never hangs."""

    async def main() -> Any:
        try:
            return await asyncio.wait_for(test(), 10)
        finally:
            for ticket in STARTED:
                if not ticket.done.done():
                    ticket.put(DONE, (Tally(), "done", 0.0))
            STARTED.clear()

    return asyncio.run(main())


async def _start(client: Client) -> tuple[Ticket, asyncio.Task[None]]:
    ticket = Ticket(asyncio.get_running_loop(), None)
    STARTED.append(ticket)
    log = RequestLog("req_1", "POST", "/v1/completions")
    stream = _EventStream(ticket, Encoder(), log, _Watch(client.receive, ticket))  # type: ignore[arg-type]
    scope = {"type": "http", SERVER_SEND: client.send}
    task = asyncio.ensure_future(stream(scope, client.receive, client.send))
    for _ in range(3):  # the response's start and first chunk go out; the sink is in place
        await asyncio.sleep(0)
    assert ticket.sink is not None
    return ticket, task


def _end(ticket: Ticket) -> None:
    ticket.put("end", Tally())
    ticket.put(DONE, (Tally(), "done", 0.0))


def test_pieces_are_written_as_the_batch_is_read():
    async def run() -> list[bytes]:
        client = Client()
        ticket, task = await _start(client)
        ticket.put("pieces", ["a"])
        assert client.bodies == [b"first;", b"a"]  # at once: no task was woken for it
        ticket.put("pieces", ["b", "c"])
        assert client.bodies[-1] == b"bc"
        _end(ticket)
        await task
        return client.bodies

    assert _run(run) == [b"first;", b"a", b"bc", b"<end>"]


def test_pieces_behind_a_send_that_waits_for_the_client_keep_their_order():
    async def run() -> list[bytes]:
        client = Client()
        client.hold = {b"b"}
        ticket, task = await _start(client)
        ticket.put("pieces", ["a"])
        ticket.put("pieces", ["b"])  # its send waits: what comes next queues behind it
        ticket.put("pieces", ["c"])
        ticket.put("pieces", ["d"])
        await asyncio.sleep(0.01)
        assert client.bodies == [b"first;", b"a"]
        client.release.set()
        await asyncio.sleep(0.01)
        assert client.bodies == [b"first;", b"a", b"b", b"cd"]  # the queued ones in one write
        ticket.put("pieces", ["e"])  # and the sink writes again
        assert client.bodies[-1] == b"e"
        _end(ticket)
        await task
        return client.bodies

    assert _run(run) == [b"first;", b"a", b"b", b"cd", b"e", b"<end>"]


def test_a_send_that_fails_in_the_sink_ends_the_stream_with_its_error():
    async def run() -> None:
        client = Client()
        client.fail = {b"b"}
        ticket, task = await _start(client)
        ticket.put("pieces", ["a"])
        ticket.put("pieces", ["b"])  # raised in the sink: not into the engine's reader
        ticket.put("pieces", ["c"])
        _end(ticket)
        with pytest.raises(ConnectionError, match="the transport broke"):
            await task
        assert client.bodies == [b"first;", b"a"]

    _run(run)


def test_a_client_that_reads_late_gets_every_token_in_order(monkeypatch):
    """Over real HTTP (uvicorn, the fake model): a client that does not read for a while fills the
    server's buffers, so the server's sends wait for it (flow control: the one the sink started, or the
    stream task's, whichever was writing then; the unit test above holds the sink's own), and once the
    client reads, the stream is whole and in order."""
    import json
    import socket
    import time

    from uvicorn.protocols.http.flow_control import FlowControl
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from deployer.runtime import RuntimeConfig
    from tests.fakemodel import serve_fake

    paused = []
    pause_writing = FlowControl.pause_writing

    def counted(self: FlowControl) -> None:
        paused.append(1)
        pause_writing(self)

    monkeypatch.setattr(FlowControl, "pause_writing", counted)
    connection_made = HttpToolsProtocol.connection_made

    def small_send_buffer(self: HttpToolsProtocol, transport: Any) -> None:
        # or the kernel takes megabytes before the server's own buffer (what flow control watches) grows
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        connection_made(self, transport)

    monkeypatch.setattr(HttpToolsProtocol, "connection_made", small_send_buffer)
    tokens = 5000
    config = RuntimeConfig(model_name="fake", model_path="/nonexistent.gguf", n_ctx=tokens + 64)
    server = serve_fake(config, reply="0123456789", endless=True)
    try:
        body = json.dumps({"model": "fake", "prompt": "Hi", "max_tokens": tokens, "stream": True}).encode()
        host, port = server.url.removeprefix("http://").split(":")
        with socket.socket() as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.settimeout(30)  # a stalled stream fails the test rather than hanging it
            client.connect((host, int(port)))
            head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            client.sendall(head.encode() + body)
            time.sleep(1.5)  # not reading: the server's writes back up
            received = bytearray()
            while not received.endswith(b"\r\n0\r\n\r\n"):
                chunk = client.recv(1 << 16)
                assert chunk, "the server closed the stream early"
                received += chunk
    finally:
        server.stop()
    _, _, rest = bytes(received).partition(b"\r\n\r\n")  # the body, chunked
    stream = b""
    while True:
        size, _, rest = rest.partition(b"\r\n")
        if int(size, 16) == 0:
            break
        stream, rest = stream + rest[: int(size, 16)], rest[int(size, 16) + 2 :]
    events = [event[6:] for event in stream.decode().split("\n\n") if event.startswith("data: {")]
    text = "".join(json.loads(event)["choices"][0]["text"] for event in events)
    assert text == ("0123456789" * (tokens // 10 + 1))[:tokens]
    assert paused, "the client never held the server back: the test did not reach the case it is about"


STREAMS = {  # route: a streaming body, the stream's opening event (None: a token is the first), its ending
    "/v1/completions": ({"prompt": "Hi", "max_tokens": 4, "stream": True}, None, "data: [DONE]"),
    "/v1/chat/completions": (
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True},
        None,
        "data: [DONE]",
    ),
    "/v1/responses": (
        {"input": "Hi", "max_output_tokens": 4, "stream": True},
        "event: response.created",
        "event: response.incomplete",  # at max_output_tokens
    ),
    "/v1/messages": (
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True},
        "event: message_start",
        "event: message_stop",
    ),
}


@pytest.mark.parametrize("route", list(STREAMS))
def test_a_stream_starts_when_its_job_leaves_the_queue_while_its_prompt_decodes(route: str) -> None:
    """The response's head (and a protocol's opening event) goes out as soon as the job has a slot, so
    that it is not on the first token's path; the prompt's decode is held at the fake model's gate
    until the head has arrived (were the head to wait for the first token, the read would time out)."""
    import threading

    import httpx

    from deployer.runtime import RuntimeConfig
    from tests.fakemodel import serve_fake

    gate = threading.Event()
    config = RuntimeConfig(model_name="fake", model_path="/nonexistent.gguf", n_ctx=256)
    server = serve_fake(config, reply="Hello", gate=gate)
    body, opening, ending = STREAMS[route]
    try:
        with (
            httpx.Client(base_url=server.url, timeout=10) as http,
            http.stream("POST", route, json={"model": "fake", **body}) as response,
        ):
            assert not gate.is_set()  # no token yet: the decode waits at the gate
            assert response.status_code == 200, response.read()
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = response.iter_lines()
            if opening is not None:  # sent with the head, before any token
                assert next(lines) == opening
            gate.set()
            rest = [line for line in lines if line]
    finally:
        gate.set()
        server.stop()
    assert any('"H"' in line for line in rest), rest  # the first token's text ("Hello", byte by byte)
    assert ending in rest, rest


def test_steps_that_arrive_together_give_each_stream_one_write():
    """The event loop fell behind the model: two steps' items read at one wake-up; each job's pieces
    join into one item (one sink call, one write to its client), its other items keep their places."""
    step1 = [("a", "started", 0), ("a", "pieces", ["a1"]), ("b", "pieces", ["b1"])]
    step2 = [("b", "pieces", ["b2"]), ("a", "pieces", ["a2"]), ("c", "pieces", ["c1"])]
    step3 = [("a", "pieces", ["a3"]), ("a", "end", None), ("b", "error", "x"), ("b", "pieces", ["b3"])]
    assert coalesce([step1, step2, step3]) == [
        ("a", "started", 0),
        ("a", "pieces", ["a1", "a2", "a3"]),
        ("b", "pieces", ["b1", "b2"]),
        ("c", "pieces", ["c1"]),
        ("a", "end", None),
        ("b", "error", "x"),
        ("b", "pieces", ["b3"]),  # never joined across another item of its job
    ]
    assert coalesce([step1]) is step1  # one step: as it came


@given(
    st.lists(
        st.lists(st.tuples(st.sampled_from("abc"), st.sampled_from(["pieces", "pieces", "end", DONE]), st.integers())),
        min_size=1,
        max_size=5,
    )
)
def test_coalescing_keeps_every_jobs_items_in_order(batches):
    def step(batch: list[tuple[str, str, int]]) -> list[tuple[str, str, Any]]:  # one pieces item per job, as a step has
        pieces = {key: i for i, (key, kind, _) in reversed(list(enumerate(batch))) if kind == "pieces"}
        return [
            (k, kind, [n] if kind == "pieces" else n)
            for i, (k, kind, n) in enumerate(batch)
            if kind != "pieces" or pieces[k] == i
        ]

    batches = [step(batch) for batch in batches]

    def flat(items: list[tuple[str, str, Any]], key: str) -> list[tuple[str, Any]]:
        return [(kind, one) for k, kind, v in items if k == key for one in (v if kind == "pieces" else [v])]

    out = coalesce(batches)
    everything = [item for batch in batches for item in batch]
    for key in "abc":
        assert flat(out, key) == flat(everything, key)
        mine = [kind for k, kind, _ in out if k == key]
        assert all(not (x == y == "pieces") for x, y in itertools.pairwise(mine))
