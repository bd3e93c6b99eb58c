"""The agent protocols end to end: OpenAI's Responses API and Anthropic's Messages API, through the
official ``openai`` and ``anthropic`` clients, against the real runtime over HTTP with real llama.cpp.

Tiny random-weight models (tests/ggufgen.py) carry the fixture templates of tests/chat_templates: what
they write is made certain where a test needs it, by the grammar of a forced tool choice (the server's
own) or by a ``grammar`` extension in the request that spells out the answer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import anthropic
import httpx
import openai
import pydantic
import pytest

from deployer.runtime import RuntimeConfig
from tests import ggufgen
from tests.serving import Server, launch

pytestmark = pytest.mark.model

TEMPLATES = Path(__file__).parent / "chat_templates"
KEY = "sk-agent-test"
MODEL = "tiny"
FORECAST = {
    "type": "object",
    "properties": {"unit": {"type": "string", "enum": ["c", "f"]}, "tomorrow": {"type": "boolean"}},
    "required": ["unit"],
}
SAY = 'root ::= "Hello there."'  # a grammar extension: the answer, then the end of the turn
ASK = [{"role": "user", "content": "Is it warm tomorrow?"}]


def _serve(folder: Path, template: str, **changes: Any) -> Server:
    source = (TEMPLATES / f"{template}.jinja").read_text(encoding="utf-8")
    path = ggufgen.write_gguf(folder / "tiny.gguf", ggufgen.TINY_LLAMA, chat_template=source)
    options = {"model_name": MODEL, "model_path": str(path), "n_ctx": 4096, "n_threads": 2, "api_key": KEY, **changes}
    return launch(RuntimeConfig(**options), folder)


@pytest.fixture(scope="module")
def hermes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = _serve(tmp_path_factory.mktemp("hermes"), "hermes")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = _serve(tmp_path_factory.mktemp("qwen3"), "qwen3")
    yield server
    server.stop()


def _claude(server: Server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)


def _events(response: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    """The (event name, data) pairs of a server-sent event stream."""
    out = []
    for block in response.text.split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "data" in lines:
            out.append((lines.get("event", ""), json.loads(lines["data"])))
    return out


# ## Responses: the openai SDK


def test_responses_create(hermes):
    reply = hermes.client().responses.create(model=MODEL, input="Is it warm?", max_output_tokens=8)
    assert reply.object == "response" and reply.id.startswith("resp_") and reply.model == MODEL
    assert reply.status == "incomplete" and reply.incomplete_details.reason == "max_output_tokens"
    assert [item.type for item in reply.output] == ["message"]
    assert reply.output_text == reply.output[0].content[0].text
    usage = reply.usage
    assert usage.output_tokens == 8 and usage.input_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details.cached_tokens >= 0 and usage.output_tokens_details.reasoning_tokens == 0


def test_responses_stream_is_assembled_by_the_sdk(hermes):
    with hermes.client().responses.stream(
        model=MODEL, input="Say hello", instructions="Be brief.", max_output_tokens=60, extra_body={"grammar": SAY}
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    for kind in (
        "output_item.added",
        "content_part.added",
        "output_text.done",
        "content_part.done",
        "output_item.done",
    ):
        assert f"response.{kind}" in kinds, kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text == "Hello there."
    assert final.status == "completed" and final.instructions == "Be brief."


class Forecast(pydantic.BaseModel):
    unit: Literal["c", "f"]
    tomorrow: bool


def test_responses_parse_with_a_pydantic_model(hermes):
    reply = hermes.client().responses.parse(model=MODEL, input=ASK, text_format=Forecast, max_output_tokens=300)
    assert reply.status == "completed", reply.output_text
    assert isinstance(reply.output_parsed, Forecast)


def test_function_call_round_trip_with_previous_response_id(hermes):
    client = hermes.client()
    tools = [{"type": "function", "name": "forecast", "description": "The weather", "parameters": FORECAST}]
    first = client.responses.create(
        model=MODEL, input=ASK, tools=tools, tool_choice="required", parallel_tool_calls=False, max_output_tokens=300
    )
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1 and first.status == "completed", first.output
    assert all(call.name == "forecast" and json.loads(call.arguments)["unit"] in "cf" for call in calls)
    outputs = [{"type": "function_call_output", "call_id": call.call_id, "output": "22 C, sunny"} for call in calls]
    second = client.responses.create(
        model=MODEL, previous_response_id=first.id, input=outputs, tools=tools, max_output_tokens=5
    )
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens > first.usage.input_tokens
    assert second.usage.input_tokens_details.cached_tokens > 0, "the second turn reuses the first turn's KV cache"
    assert client.responses.retrieve(first.id).output[0].call_id == calls[0].call_id
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.retrieve(first.id)
    assert "per container" in caught.value.message
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL, previous_response_id=first.id, input="and then?", max_output_tokens=5)


def test_codex_shaped_request(hermes):
    """What Codex CLI sends: instructions, function tools (and web_search), store false, a call and its output in
    the history, reasoning items, include, parallel_tool_calls, streaming."""
    shell = {"type": "object", "properties": {"command": {"type": "array", "items": {"type": "string"}}}}
    body = {
        "model": "gpt-5-codex",
        "instructions": "You are a coding agent.",
        "input": [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "List the files."}]},
            {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "Run ls."}],
             "content": None, "encrypted_content": None},
            {"type": "function_call", "name": "shell", "arguments": '{"command": ["ls"]}', "call_id": "call_1"},
            {"type": "function_call_output", "call_id": "call_1", "output": "README.md\nsrc"},
        ],
        "tools": [{"type": "function", "name": "shell", "description": "Run a command", "strict": False,
                   "parameters": shell}, {"type": "web_search"}],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "reasoning": {"effort": "medium", "summary": "auto"},
        "store": False,
        "stream": True,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "session-1",
        "max_output_tokens": 40,
        "grammar": SAY,
    }  # fmt: skip
    with hermes.http() as http:
        response = http.post("/v1/responses", json=body)
        assert response.status_code == 200, response.text
        assert response.headers["x-gguf-deploy-dropped-tools"] == "web_search"
        events = _events(response)
        kinds = [name for name, _ in events]
        assert [data["type"] for _, data in events] == kinds
        assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
        assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
        final = events[-1][1]["response"]
        assert final["output"][0]["content"][0]["text"] == "Hello there."
        assert [tool["type"] for tool in final["tools"]] == ["function"]
        assert http.get(f"/v1/responses/{final['id']}").status_code == 404, "store: false keeps nothing"
    assert any(line.get("event") == "hosted_tools_left_out" for line in hermes.log_lines())


def test_responses_reasoning_items_go_out_and_come_back(qwen3):
    client = qwen3.client()
    thought = {"grammar": 'root ::= "<think>Warm, I think.</think>Yes, warm."'}
    ask = {
        "model": MODEL,
        "input": ASK,
        "max_output_tokens": 60,
        "reasoning": {"effort": "high"},
        "extra_body": thought,
    }
    reply = client.responses.create(**ask)
    assert [item.type for item in reply.output] == ["reasoning", "message"]
    assert reply.output[0].content[0].text == "Warm, I think." and reply.output_text == "Yes, warm."
    assert 0 < reply.usage.output_tokens_details.reasoning_tokens < reply.usage.output_tokens
    with client.responses.stream(**ask) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert "response.reasoning_text.delta" in kinds and [item.type for item in final.output] == ["reasoning", "message"]
    # stateless, as Codex runs with store: false: the output items go back as input
    history = [
        *ASK,
        *[item.model_dump(exclude_none=True) for item in reply.output],
        {"role": "user", "content": "And?"},
    ]
    again = client.responses.create(model=MODEL, input=history, max_output_tokens=2, store=False)
    assert again.usage.input_tokens > reply.usage.input_tokens


@pytest.mark.parametrize(
    ("change", "param", "words"),
    [
        pytest.param({"tools": [{"type": "file_search"}]}, "tools", "hosted tool", id="hosted-tool"),
        pytest.param({"bogus": 1}, "bogus", "unknown field 'bogus'", id="unknown-field"),
        pytest.param({"input": [{"type": "item_reference", "id": "x"}]}, "input", "item_reference", id="bad-item"),
        pytest.param({"input": 3}, "input", "string or a list", id="input-type"),
        pytest.param({"max_output_tokens": 0}, "max_output_tokens", "max_output_tokens", id="max-output-tokens"),
        pytest.param({"text": {"format": {"type": "xml"}}}, "text.format", "xml", id="format"),
        pytest.param({"reasoning": {"effort": "huge"}}, "reasoning_effort", "huge", id="effort"),
        pytest.param({"cache_prompt": False}, "cache_prompt", "cache_prompt", id="cache-prompt-false"),
    ],
)
def test_responses_bad_input_is_a_400_naming_the_field(hermes, change, param, words):
    with hermes.http() as http:
        response = http.post("/v1/responses", json={"model": MODEL, "input": "hi", **change})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error


# ## Messages: the anthropic SDK


def test_messages_create(hermes):
    message = _claude(hermes).messages.create(model="claude-sonnet-4-5", max_tokens=8, messages=ASK)
    assert message.type == "message" and message.role == "assistant" and message.model == MODEL
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 8
    assert [block.type for block in message.content] == ["text"]
    counted = _claude(hermes).messages.count_tokens(model="claude-sonnet-4-5", messages=ASK)
    assert counted.input_tokens == message.usage.input_tokens + message.usage.cache_read_input_tokens


def test_messages_stream_and_final_message(hermes):
    with _claude(hermes).messages.stream(
        model="any-name", max_tokens=60, system=[{"type": "text", "text": "Be brief."}], messages=ASK,
        extra_body={"grammar": SAY},
    ) as stream:  # fmt: skip
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert {"content_block_start", "content_block_delta", "content_block_stop", "message_delta"} <= set(kinds)
    assert final.content[0].text == "Hello there." and final.stop_reason == "end_turn"


def test_stop_sequence_is_reported(hermes):
    message = _claude(hermes).messages.create(
        model="m", max_tokens=60, messages=ASK, stop_sequences=["there"], extra_body={"grammar": SAY}
    )
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == "there"
    assert message.content[0].text == "Hello "


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_tool_use_and_tool_result_round_trip(hermes, stream):
    claude = _claude(hermes)
    tools = [{"name": "forecast", "description": "The weather", "input_schema": FORECAST}]
    request = {"model": "m", "max_tokens": 300, "tools": tools, "messages": ASK}
    forced = {"type": "tool", "name": "forecast"}
    if stream:
        with claude.messages.stream(**request, tool_choice=forced) as events:
            first = events.get_final_message()
    else:
        first = claude.messages.create(**request, tool_choice=forced)
    assert first.stop_reason == "tool_use"
    uses = [block for block in first.content if block.type == "tool_use"]
    assert len(uses) == 1 and uses[0].name == "forecast" and uses[0].input["unit"] in ("c", "f")
    answer = [{"type": "tool_result", "tool_use_id": uses[0].id, "content": "22 C"}]
    turns = [*ASK, {"role": "assistant", "content": first.content}, {"role": "user", "content": answer}]
    second = claude.messages.create(**{**request, "max_tokens": 5, "messages": turns})
    assert second.usage.cache_read_input_tokens > 0, "the second turn reuses the first turn's KV cache"


def test_thinking_is_a_thinking_block_and_switches_the_template(qwen3):
    claude = _claude(qwen3)
    grammar = 'root ::= "<think>Warm, I think.</think>Yes, warm."'
    message = claude.messages.create(model="m", max_tokens=60, messages=ASK, extra_body={"grammar": grammar})
    assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in message.content] == [
        ("thinking", "Warm, I think."),
        ("text", "Yes, warm."),
    ]
    with claude.messages.stream(model="m", max_tokens=60, messages=ASK, extra_body={"grammar": grammar}) as stream:
        deltas = [e.delta.type for e in stream if e.type == "content_block_delta"]
        final = stream.get_final_message()
    assert "thinking_delta" in deltas and [b.type for b in final.content] == ["thinking", "text"]
    on = claude.messages.count_tokens(model="m", messages=ASK, thinking={"type": "enabled", "budget_tokens": 1024})
    off = claude.messages.count_tokens(model="m", messages=ASK, thinking={"type": "disabled"})
    assert off.input_tokens > on.input_tokens, "thinking off: the template writes an empty think block"


@pytest.mark.parametrize(
    ("body", "status", "kind", "words"),
    [
        pytest.param({"messages": ASK}, 400, "invalid_request_error", "max_tokens", id="no-max-tokens"),
        pytest.param({"max_tokens": 5, "messages": []}, 400, "invalid_request_error", "messages", id="no-messages"),
        pytest.param(
            {"max_tokens": 5, "messages": ASK, "temperature": 1.5},
            400,
            "invalid_request_error",
            "temperature",
            id="temperature",
        ),
        pytest.param(
            {"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
            400,
            "invalid_request_error",
            "messages[0].content[0]: this model has no vision projector",
            id="image-to-a-text-only-model",
        ),
        pytest.param(
            {"max_tokens": 5, "messages": ASK, "tools": [{"type": "web_search_20250305", "name": "web_search"}]},
            400,
            "invalid_request_error",
            "web_search_20250305",
            id="server-tool",
        ),
        pytest.param(
            {"max_tokens": 5, "messages": ASK, "bogus": 1}, 400, "invalid_request_error", "bogus", id="unknown"
        ),
    ],
)
def test_messages_bad_input_in_anthropic_shape(hermes, body, status, kind, words):
    response = httpx.post(
        f"{hermes.url}/v1/messages",
        json={"model": "m", **body},
        headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"},
        timeout=60,
    )
    assert response.status_code == status, response.text
    error = response.json()
    assert error["type"] == "error" and error["error"]["type"] == kind and words in error["error"]["message"], error


def test_messages_auth_and_routes_in_anthropic_shape(hermes):
    with pytest.raises(anthropic.AuthenticationError) as caught:
        anthropic.Anthropic(base_url=hermes.url, api_key="wrong", max_retries=0).messages.create(
            model="m", max_tokens=5, messages=ASK
        )
    assert caught.value.body["error"]["type"] == "authentication_error"
    bearer = httpx.post(
        f"{hermes.url}/v1/messages/count_tokens", json={"model": "m", "messages": ASK},
        headers={"Authorization": f"Bearer {KEY}", "anthropic-beta": "token-counting-2024-11-01"},
    )  # fmt: skip
    assert bearer.status_code == 200 and bearer.json()["input_tokens"] > 0
    missing = httpx.get(f"{hermes.url}/v1/messages/batches", headers={"x-api-key": KEY})
    assert missing.status_code in (404, 405) and missing.json()["type"] == "error"


def test_a_full_queue_is_529_overloaded(tmp_path):
    server = _serve(tmp_path, "hermes", concurrency=1, parallel=1)
    try:
        with httpx.stream(
            "POST", f"{server.url}/v1/messages", headers={"x-api-key": KEY},
            json={"model": "m", "max_tokens": 3000, "stream": True, "messages": ASK}, timeout=60,
        ) as running:  # fmt: skip
            lines = running.iter_lines()  # kept: a dropped iterator closes the response
            next(lines)  # in flight
            with pytest.raises(anthropic.InternalServerError) as caught:
                _claude(server).messages.create(model="m", max_tokens=5, messages=ASK)
        assert caught.value.status_code == 529
        assert caught.value.body["error"]["type"] == "overloaded_error"
        assert int(caught.value.response.headers["retry-after"]) >= 1
    finally:
        server.stop()


# ## What every protocol shares: extensions, prefill, tokenize, routes without /v1


def test_top_level_json_schema_is_honoured_not_ignored(hermes):
    reply = hermes.client().chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=20, extra_body={"json_schema": {"const": "42"}}
    )
    assert reply.choices[0].message.content == '"42"'


def test_unknown_chat_field_is_a_400_naming_it(hermes):
    with pytest.raises(openai.BadRequestError) as caught:
        hermes.client().chat.completions.create(model=MODEL, messages=ASK, max_tokens=2, extra_body={"top_kk": 3})
    assert caught.value.param == "top_kk" and "did you mean 'top_k'" in caught.value.message


def test_assistant_prefill_continues_the_last_message(hermes):
    client = hermes.client()
    prefilled = [*ASK, {"role": "assistant", "content": "Hello"}]
    grammar = {"grammar": 'root ::= " there."'}
    continued = client.chat.completions.create(model=MODEL, messages=prefilled, max_tokens=20, extra_body=grammar)
    closed = client.chat.completions.create(
        model=MODEL, messages=prefilled, max_tokens=20, extra_body={**grammar, "add_generation_prompt": True}
    )
    assert continued.choices[0].message.content == " there."
    # the closed turn adds the end of the assistant turn and the opening of a new one
    assert continued.usage.prompt_tokens < closed.usage.prompt_tokens
    claude = _claude(hermes).messages.create(model="m", max_tokens=20, messages=prefilled, extra_body=grammar)
    assert claude.content[0].text == " there."
    assert claude.usage.input_tokens + claude.usage.cache_read_input_tokens == continued.usage.prompt_tokens


def test_chat_template_kwargs_and_reasoning_effort_reach_the_template(qwen3):
    client = qwen3.client()

    def prompt_tokens(**extra: Any) -> int:
        reply = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=1, **extra)
        return reply.usage.prompt_tokens

    plain = prompt_tokens()
    assert prompt_tokens(extra_body={"chat_template_kwargs": {"enable_thinking": False}}) > plain
    assert prompt_tokens(reasoning_effort="none") > plain
    assert prompt_tokens(reasoning_effort="high") == plain
    with pytest.raises(openai.BadRequestError) as caught:
        prompt_tokens(extra_body={"chat_template_kwargs": {"messages": []}})
    assert caught.value.param == "chat_template_kwargs"


def test_tokenize_and_detokenize(hermes):
    with hermes.http() as http:
        tokens = http.post("/tokenize", json={"content": "Hello there."}).json()
        assert tokens["count"] == len(tokens["tokens"]) > 0
        round_trip = http.post("/detokenize", json={"tokens": tokens["tokens"]}).json()["content"]
        # the tiny vocabulary has no token for SentencePiece's space marker: its bytes come back as they are
        assert round_trip.replace("\u2581", " ").strip() == "Hello there."
        assert http.post("/detokenize", json={"tokens": [10**9]}).status_code == 400
        assert http.post("/tokenize", json={"text": "x"}).status_code == 400


def test_openai_routes_without_v1(hermes):
    client = hermes.client(base_url=hermes.url)
    assert [m.id for m in client.models.list()] == [MODEL]
    reply = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2)
    assert reply.usage.completion_tokens == 2
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2).usage.completion_tokens == 2
