"""The real HTTP app and engine over a fake model (tests/fakemodel.py): the pull-request check runs these
without llama.cpp. Every protocol's encoder, streamed and not, through the official clients; auth,
the error statuses, the full queue, a client that leaves, /metrics."""

from __future__ import annotations

import time
from collections.abc import Iterator

import anthropic
import httpx
import openai
import pytest

from deployer.runtime import RuntimeConfig
from tests.fakemodel import FakeServer, serve_fake

KEY = "sk-fake"
REPLY = "Hello from the fake model."
ASK = [{"role": "user", "content": "Hi"}]


def _config(**changes: object) -> RuntimeConfig:
    options = {"model_name": "fake", "model_path": "/nonexistent.gguf", "n_ctx": 2048, "api_key": KEY, **changes}
    return RuntimeConfig(**options)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeServer]:
    server = serve_fake(_config(max_body_bytes=4096))
    yield server
    server.stop()


# ## Every protocol's encoder


def test_chat_and_completions(fake):
    client = fake.client()
    reply = client.chat.completions.create(model="x", messages=ASK)
    assert reply.choices[0].message.content == REPLY and reply.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model="x", messages=ASK, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REPLY
    text = client.completions.create(model="x", prompt="Hi", max_tokens=5)
    assert text.choices[0].text == REPLY[:5] and text.choices[0].finish_reason == "length"


def test_responses(fake):
    client = fake.client()
    reply = client.responses.create(model="x", input="Hi")
    assert reply.output_text == REPLY and reply.status == "completed"
    with client.responses.stream(model="x", input="Hi") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == REPLY
    cut = client.responses.create(model="x", input="Hi", max_output_tokens=5)
    assert cut.status == "incomplete" and cut.output_text == REPLY[:5]


def test_messages(fake):
    claude = fake.claude()
    message = claude.messages.create(model="claude-x", max_tokens=100, messages=ASK)
    assert message.content[0].text == REPLY and message.stop_reason == "end_turn"
    with claude.messages.stream(model="claude-x", max_tokens=100, messages=ASK) as stream:
        final = stream.get_final_message()
    assert final.content[0].text == REPLY and final.usage.output_tokens == len(REPLY)
    stopped = claude.messages.create(model="m", max_tokens=100, messages=ASK, stop_sequences=["fake"])
    assert (stopped.stop_reason, stopped.stop_sequence, stopped.content[0].text) == (
        "stop_sequence",
        "fake",
        "Hello from the ",
    )
    assert claude.messages.count_tokens(model="m", messages=ASK).input_tokens == message.usage.input_tokens


# ## Errors, auth, limits


def test_auth_in_each_protocols_shape(fake):
    with pytest.raises(openai.AuthenticationError):
        fake.client(api_key="wrong").responses.create(model="x", input="Hi")
    with pytest.raises(anthropic.AuthenticationError) as caught:
        fake.claude(api_key="wrong").messages.create(model="x", max_tokens=5, messages=ASK)
    assert caught.value.body["error"]["type"] == "authentication_error"
    assert httpx.post(f"{fake.url}/v1/messages", json={}).status_code == 401


def test_404_405_413(fake):
    headers = {"Authorization": f"Bearer {KEY}"}
    missing = httpx.get(f"{fake.url}/v1/nowhere", headers=headers)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = httpx.get(f"{fake.url}/v1/messages", headers=headers)
    assert wrong.status_code == 405 and wrong.json()["type"] == "error"
    big = httpx.post(f"{fake.url}/v1/responses", headers=headers, json={"input": "x" * 5000})
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"


def test_full_queue_429_and_529_and_a_client_that_leaves_frees_its_slot():
    server = serve_fake(_config(concurrency=1, parallel=1), endless=True, delay_s=0.01)
    try:
        body = {"model": "m", "messages": ASK, "max_tokens": 100000, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers={"x-api-key": KEY}) as held:
            lines = held.iter_lines()  # kept: a dropped iterator closes the response
            next(lines)
            with pytest.raises(openai.RateLimitError) as busy:
                server.client().chat.completions.create(model="x", messages=ASK)
            assert int(busy.value.response.headers["retry-after"]) >= 1
            with pytest.raises(anthropic.InternalServerError) as overloaded:
                server.claude().messages.create(model="x", max_tokens=5, messages=ASK)
            assert overloaded.value.status_code == 529
        deadline = time.monotonic() + 10  # the stream was closed: its slot is free at the next step
        while server.engine.in_flight and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.engine.in_flight == 0
        assert (
            server.client().chat.completions.create(model="x", messages=ASK, max_tokens=3).usage.completion_tokens == 3
        )
    finally:
        server.stop()


def test_metrics_count_requests_by_route(fake):
    fake.client().responses.create(model="x", input="Hi")
    fake.claude().messages.create(model="x", max_tokens=5, messages=ASK)
    text = httpx.get(f"{fake.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert 'route="/v1/responses"' in text and 'route="/v1/messages"' in text


def test_audio_to_a_text_only_model_is_a_400_in_each_protocols_shape(fake):
    import base64

    from tests.audio import wav

    clip = {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav(0.02)).decode(), "format": "wav"}}
    with pytest.raises(openai.BadRequestError, match="this model has no audio projector: it reads text only") as chat:
        fake.client().chat.completions.create(model="x", messages=[{"role": "user", "content": [clip]}])
    assert chat.value.body["param"] == "messages" and "messages[0].content[0]" in chat.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="this model has no audio projector") as responses:
        fake.client().responses.create(model="x", input=[{"role": "user", "content": [clip]}])
    assert responses.value.body["param"] == "input" and "input[0].content[0]" in responses.value.body["message"]
    with pytest.raises(anthropic.BadRequestError, match="the Messages API has no audio blocks"):
        fake.claude().messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": [clip]}])
