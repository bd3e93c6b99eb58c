"""The runtime answers the official ``openai`` client over real HTTP, with real llama.cpp inference.

One Gemma 3 270M server for the module (tests/serving.py: the demo manifest, an API key, a 1024
context, n_batch 32 so that short prompts already exercise the prefix cache).
"""

from __future__ import annotations

import json
import threading
import time
from typing import Annotated

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, StringConstraints

from tests.serving import API_KEY, Server

pytestmark = pytest.mark.model

MODEL = "gemma-3-270m"
HELLO = [{"role": "user", "content": "Name three colors."}]
STORY = (
    "Once upon a time, in a small village by the sea, there lived an old fisherman named Tomas. "
    "Every morning he rowed out before dawn, and every evening he came back with stories. "
)


def _chat(server: Server, messages: list, **options) -> openai.types.chat.ChatCompletion:
    return server.client().chat.completions.create(model=MODEL, messages=messages, **options)


# ## The basics


def test_models_lists_the_manifest_name(gemma_server):
    assert [m.id for m in gemma_server.client().models.list().data] == [MODEL]
    assert gemma_server.client().models.retrieve(MODEL).id == MODEL


def test_chat_completion(gemma_server):
    reply = _chat(gemma_server, HELLO, max_tokens=16, temperature=0)
    choice = reply.choices[0]
    assert reply.model == MODEL
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert 0 < reply.usage.completion_tokens <= 16 and reply.usage.prompt_tokens > 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streaming_chat_matches_the_plain_answer_and_ends_with_usage(gemma_server):
    plain = _chat(gemma_server, HELLO, max_tokens=12, temperature=0)
    stream = _chat(
        gemma_server, HELLO, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == plain.choices[0].message.content
    assert finishes == [plain.choices[0].finish_reason]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (
        plain.usage.prompt_tokens,
        plain.usage.completion_tokens,
    )
    assert all(c.usage is None for c in chunks[:-1])


def test_streaming_without_include_usage_sends_no_usage_chunk(gemma_server):
    chunks = list(_chat(gemma_server, HELLO, max_tokens=4, temperature=0, stream=True))
    assert all(c.choices and c.usage is None for c in chunks)


def test_legacy_completion(gemma_server):
    reply = gemma_server.client().completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert reply.object == "text_completion" and reply.model == MODEL
    assert reply.choices[0].text.strip() and reply.usage.completion_tokens <= 8


def test_token_array_prompt_is_the_same_prompt(gemma_server, gemma_file):
    import llama_cpp

    vocab = llama_cpp.Llama(str(gemma_file), vocab_only=True, verbose=False)
    text = "The capital of France is"
    tokens = vocab.tokenize(text.encode(), add_bos=True, special=True)
    client = gemma_server.client()
    by_text = client.completions.create(model=MODEL, prompt=text, max_tokens=8, temperature=0)
    by_tokens = client.completions.create(model=MODEL, prompt=tokens, max_tokens=8, temperature=0)
    assert by_tokens.choices[0].text == by_text.choices[0].text
    assert by_tokens.usage.prompt_tokens == len(tokens)


def test_stop_sequence_ends_the_text_before_it(gemma_server):
    client = gemma_server.client()
    prompt = "Count: 1, 2, 3, 4,"
    free = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0).choices[0].text
    stop = free[len(free) // 2 : len(free) // 2 + 2]
    assert stop.strip(), f"the free text is too short to pick a stop sequence from: {free!r}"
    stopped = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stop=[stop])
    assert stopped.choices[0].text == free[: free.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("key", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_is_honoured(gemma_server, key):
    reply = _chat(
        gemma_server, [{"role": "user", "content": "Write a long story about the sea."}], temperature=0, **{key: 5}
    )
    assert reply.usage.completion_tokens == 5
    assert reply.choices[0].finish_reason == "length"


# ## Determinism: the same text whether or not the prompt prefix was cached


QUESTIONS = ("Summarize the story.", "Who is the main character?")


def _same_text_cached_or_not(ask, unrelated, questions, tag: str) -> list[tuple[str, str, str]]:
    """(uncached, cached, cached again) texts of each question, the cache primed in between.

    ``ask(prefix, question)`` sends prefix + STORY + question. Each question gets a prefix no earlier
    request had, so its first ask is uncached in every slot; ``unrelated()`` empties a one-slot cache.
    """
    texts = []
    for n, question in enumerate(questions):
        unrelated()
        prefix = f"Tale {tag}-{n}. "
        uncached = ask(prefix, question)
        ask(prefix, "What happens next?")  # shares the prefix and STORY: leaves them in a slot's cache
        texts.append((uncached, ask(prefix, question), ask(prefix, question)))
    return texts


@pytest.mark.parametrize(
    ("options", "questions"),
    [
        pytest.param({"temperature": 0}, QUESTIONS, id="temperature-0"),
        pytest.param({"temperature": 0.9, "seed": 11}, QUESTIONS[:1], id="seeded"),
    ],
)
def test_same_text_with_and_without_the_prefix_cache(gemma_server, options, questions, request):
    replies = []

    def ask(prefix: str, question: str) -> str:
        content = prefix + STORY + question
        reply = _chat(gemma_server, [{"role": "user", "content": content}], max_tokens=40, **options)
        replies.append(reply)
        return reply.choices[0].message.content

    def unrelated() -> None:
        _chat(gemma_server, [{"role": "user", "content": "Unrelated."}], max_tokens=1)

    for uncached, cached, again in _same_text_cached_or_not(ask, unrelated, questions, request.node.callspec.id):
        assert cached == uncached
        assert again == uncached
    cached_counts = [r.usage.prompt_tokens_details.cached_tokens for r in replies]
    assert cached_counts[0] == 0 and all(count >= 32 for count in cached_counts[2:4])  # whole n_batch chunks


# ## JSON


def test_json_mode_gives_json(gemma_server):
    """Free JSON has no length bound, so the model may spend the budget inside it: JSON whenever
    the grammar closed it (``stop``), and JSON's opening either way."""
    reply = _chat(
        gemma_server,
        [{"role": "user", "content": 'Reply in JSON with the key "color" and a color as its value.'}],
        response_format={"type": "json_object"},
        max_tokens=80,
        temperature=0,
    )
    choice = reply.choices[0]
    if choice.finish_reason == "stop":
        json.loads(choice.message.content)
    else:
        assert (choice.finish_reason, reply.usage.completion_tokens) == ("length", 80)
        assert choice.message.content.lstrip().startswith(("{", "["))


# Every string the grammar of PERSON accepts is short: llama-cpp-python's converter allows one space
# between tokens, a name of at most 12 characters (each at most 6, as a \uXXXX escape) and an
# integer of at most 17: under 120 characters in all. A token the grammar accepts is at least one
# character, so BOUNDED_BUDGET tokens always reach the closing brace and the end of generation.
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
BOUNDED_BUDGET = 160


def test_json_schema_response_format(gemma_server):
    reply = _chat(
        gemma_server,
        [{"role": "user", "content": "Give me a person."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}},
        max_tokens=BOUNDED_BUDGET,
        temperature=0,
    )
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON)


class Person(BaseModel):
    name: Annotated[str, StringConstraints(max_length=12)]  # bounded, as PERSON: the budget always suffices
    age: int


def test_sdk_structured_output_parse(gemma_server):
    reply = gemma_server.client().chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Give me a person."}],
        response_format=Person,
        max_tokens=BOUNDED_BUDGET,
        temperature=0,
    )
    assert isinstance(reply.choices[0].message.parsed, Person)
    assert len(reply.choices[0].message.parsed.name) <= 12  # the schema's bound reached the grammar


@pytest.mark.parametrize("choice", ["auto", "required", {"type": "function", "function": {"name": "get_person"}}])
def test_tools_on_a_format_without_tool_support_are_a_clear_400(gemma_server, choice):
    """The demo's ``gemma`` chat format cannot show tools to the model: never silently ignored."""
    tool = {"type": "function", "function": {"name": "get_person", "parameters": PERSON}}
    with pytest.raises(openai.BadRequestError) as info:
        _chat(gemma_server, [{"role": "user", "content": "Give me a person."}], tools=[tool], tool_choice=choice)
    assert "no tool support" in info.value.message and "chat_format 'gemma'" in info.value.message


# ## Auth


@pytest.mark.parametrize(
    ("key", "message"),
    [
        pytest.param(None, "You didn't provide an API key", id="no-key"),
        pytest.param("sk-wrong", "Incorrect API key provided", id="wrong-key"),
        pytest.param(API_KEY + "x", "Incorrect API key provided", id="key-with-a-suffix"),
    ],
)
def test_wrong_or_missing_key_is_401_in_openai_shape(gemma_server, key, message):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    for method, route in [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/embeddings")]:
        response = httpx.request(method, gemma_server.url + route, headers=headers, json={"messages": HELLO})
        assert response.status_code == 401, route
        assert response.json()["error"] == {
            "message": response.json()["error"]["message"],
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
        assert message in response.json()["error"]["message"]
        assert response.headers["www-authenticate"] == "Bearer"
    if key:  # the SDK refuses to send no key at all
        with pytest.raises(openai.AuthenticationError):
            gemma_server.client(api_key=key).models.list()


def test_health_needs_no_key(gemma_server):
    response = gemma_server.health()
    assert response.status_code == 200 and response.json()["status"] == "ok"


# ## Bad input: 4xx, never 500, always OpenAI's error shape


def _post(server: Server, route: str, body, headers: dict | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    with server.http() as http:
        return http.post(route, content=content, headers={"Content-Type": "application/json", **(headers or {})})


CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


@pytest.mark.parametrize(
    ("route", "body", "status", "text"),
    [
        pytest.param(CHAT, b'{"messages": [', 400, "not valid JSON", id="invalid-json"),
        pytest.param(CHAT, {"model": MODEL}, 400, "messages is required", id="missing-messages"),
        pytest.param(CHAT, {"messages": HELLO, "max_tokens": -5}, 400, "max_tokens must be at least 1", id="negative-max-tokens"),
        pytest.param(CHAT, {"messages": [{"role": "user", "content": "sea " * 1100}]}, 400, "maximum context length is 1024", id="prompt-longer-than-context"),
        pytest.param(COMPLETIONS, {"prompt": "sea " * 1100}, 400, "maximum context length is 1024", id="completion-prompt-too-long"),
        pytest.param(CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, "NaN is not valid JSON", id="nan"),
        pytest.param(CHAT, {"messages": HELLO, "stop": 5}, 400, "stop", id="wrong-type-caught-by-the-stock-types"),
        pytest.param(CHAT, {"messages": HELLO, "grammar": "root ::= ( "}, 400, "grammar could not be parsed", id="bad-grammar-would-segfault-llama-cpp"),
        pytest.param(CHAT, {"messages": HELLO, "response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, 400, "json_schema must be an object with a name", id="json-schema-without-name"),
        pytest.param(CHAT, {"messages": HELLO, "n": 50}, 400, "n must be at most", id="n-too-large"),
        pytest.param(CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:x"}}]}]}, 400, "text only", id="image-input"),
        pytest.param(CHAT, {"messages": HELLO, "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}], "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400, "tool_choice names 'g'", id="unknown-tool-choice"),
        pytest.param(COMPLETIONS, {"prompt": [10**9]}, 400, "outside the vocabulary", id="token-outside-vocabulary"),
        pytest.param(COMPLETIONS, {"prompt": ["a", "b"]}, 400, "a batch of 2 prompts", id="batched-prompts"),
        pytest.param(COMPLETIONS, {"prompt": "x", "logit_bias": {"99999999": 5}}, 400, "not a token id", id="bad-logit-bias"),
        pytest.param("/v1/embeddings", {"input": "hi"}, 400, "embeddings are not enabled", id="embeddings-off"),
        pytest.param(CHAT, b"x" * (300 * 1024), 413, "larger than 262,144 bytes", id="body-over-the-cap"),
        pytest.param("/v1/nowhere", {}, 404, "no route POST /v1/nowhere", id="unknown-route"),
    ],
)  # fmt: skip
def test_bad_input_is_a_4xx_in_openai_shape(gemma_server, route, body, status, text):
    response = _post(gemma_server, route, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert text in error["message"]
    assert gemma_server.health().status_code == 200  # and the server is still there


def test_wrong_method_and_unknown_model_are_4xx(gemma_server):
    with gemma_server.http() as http:
        wrong_method = http.get(CHAT)
        missing = http.get("/v1/models/gpt-4")
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "method_not_allowed"
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_chunked_body_over_the_cap_is_413(gemma_server):
    def body():
        for _ in range(300):
            yield b"x" * 1024

    with gemma_server.http() as http:
        response = http.post(CHAT, content=body())
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


# ## Concurrency: a bounded queue, nothing cut off, 429 beyond


def _stream_in_thread(server: Server, results: list, max_tokens: int) -> threading.Thread:
    def run() -> None:
        try:
            chunks = list(_chat(server, HELLO, max_tokens=max_tokens, temperature=0, stream=True))
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            results.append((text, [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]))
        except Exception as exc:
            results.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _wait_in_flight(server: Server, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while server.health().json()["in_flight"] < count:
        assert time.monotonic() < deadline, f"never {count} requests in flight"
        time.sleep(0.01)


def test_a_full_queue_answers_429_with_retry_after(gemma_server):
    limit = gemma_server.health().json()["concurrency"]  # slots + queue
    results: list = []
    threads = [_stream_in_thread(gemma_server, results, 64) for _ in range(limit)]
    _wait_in_flight(gemma_server, limit)
    with gemma_server.http() as http:
        started = time.monotonic()
        refused = http.post(CHAT, json={"messages": HELLO, "max_tokens": 4})
        waited = time.monotonic() - started
    for thread in threads:
        thread.join(120)
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["code"] == "server_busy"
    assert waited < 2  # refused at once, not after the queue drained
    assert len(results) == limit and all(not isinstance(r, Exception) and r[1] for r in results), results


# ## A client that goes away stops its generation


def _request_lines(server: Server, request_id: str) -> dict:
    [line] = server.request_log(request_id)  # exactly one line per request
    return line


def test_disconnect_stops_a_stream(gemma_server):
    request_id = "disconnect-stream-1"
    body = {"prompt": "1, 2, 3, 4, 5,", "max_tokens": 900, "temperature": 0, "stream": True}
    with (
        gemma_server.http() as http,
        http.stream("POST", COMPLETIONS, json=body, headers={"X-Request-Id": request_id}) as response,
    ):
        assert response.status_code == 200
        events = 0
        for line in response.iter_lines():
            events += line.startswith("data: ")
            if events == 3:
                break  # and the connection is closed
    started = time.monotonic()
    follow = gemma_server.client().completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    assert follow.choices[0].text is not None and time.monotonic() - started < 15
    line = _request_lines(gemma_server, request_id)
    assert line["status"] == 499
    assert line["completion_tokens"] < 100  # of 900: generation stopped soon after the client left


def test_disconnect_stops_a_plain_request(gemma_server):
    request_id = "disconnect-plain-1"
    body = {"prompt": "1, 2, 3, 4, 5,", "max_tokens": 900, "temperature": 0}
    with gemma_server.http(timeout=1.5) as http, pytest.raises(httpx.ReadTimeout):
        http.post(COMPLETIONS, json=body, headers={"X-Request-Id": request_id})
    line = _request_lines(gemma_server, request_id)
    assert line["status"] == 499
    assert 0 < line["completion_tokens"] < 300


# ## n, and the shapes today's SDKs send


def test_n_choices_plain(gemma_server):
    reply = _chat(gemma_server, HELLO, max_tokens=4, temperature=0.8, seed=5, n=2)
    assert [c.index for c in reply.choices] == [0, 1]
    assert all(c.message.content for c in reply.choices)
    assert reply.usage.completion_tokens <= 8  # both choices counted, the prompt once
    if all(c.finish_reason == "length" for c in reply.choices):
        assert reply.usage.completion_tokens == 8


def test_n_choices_streamed(gemma_server):
    chunks = list(_chat(gemma_server, HELLO, max_tokens=6, temperature=0.8, seed=5, n=2, stream=True))
    finishes = {c.choices[0].index: c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason}
    assert set(finishes) == {0, 1}
    assert len({c.id for c in chunks}) == 1


def test_content_parts_are_read(gemma_server):
    parts = [{"type": "text", "text": "Name a fruit."}, {"type": "text", "text": "One word."}]
    as_parts = _chat(gemma_server, [{"role": "user", "content": parts}], max_tokens=10, temperature=0)
    as_text = _chat(
        gemma_server, [{"role": "user", "content": "Name a fruit.\nOne word."}], max_tokens=10, temperature=0
    )
    assert as_parts.choices[0].message.content == as_text.choices[0].message.content
    assert as_parts.usage.prompt_tokens == as_text.usage.prompt_tokens  # the stock path drops list content


# ## Logs


def test_one_structured_log_line_per_request(gemma_server):
    with gemma_server.http() as http:
        ok = http.post(CHAT, json={"messages": HELLO, "max_tokens": 3}, headers={"X-Request-Id": "log-ok-1"})
        denied = httpx.get(gemma_server.url + "/v1/models", headers={"X-Request-Id": "log-401-1"})
    assert ok.headers["x-request-id"] == "log-ok-1" and denied.status_code == 401
    line = _request_lines(gemma_server, "log-ok-1")
    assert {k: line[k] for k in ("method", "route", "status", "stream")} == {
        "method": "POST",
        "route": CHAT,
        "status": 200,
        "stream": False,
    }
    assert line["prompt_tokens"] > 0 and 0 < line["completion_tokens"] <= 3
    assert line["latency_ms"] >= 0 and line["queue_ms"] >= 0 and line["cached_tokens"] >= 0
    assert _request_lines(gemma_server, "log-401-1")["status"] == 401
    generated = httpx.get(gemma_server.url + "/v1/models").headers["x-request-id"]
    assert generated.startswith("req_")
