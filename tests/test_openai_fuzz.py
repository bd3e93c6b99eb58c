"""Fuzz every generation endpoint with requests the protocol's own spec allows: no answer may be a 5xx.

The requests come from the official ``openai`` package's request types
(``openai.types.chat.CompletionCreateParams``, ``openai.types.CompletionCreateParams``), which are
generated from OpenAI's OpenAPI spec. :func:`strategy` walks those TypedDicts (required and optional
keys, literals, unions, nested objects, wire aliases) into hypothesis strategies. Only sizes are
bounded (a few tokens, a few choices) so that the run stays short on a tiny real model.

Every answer must be a 2xx or a 4xx in OpenAI's error shape; a 200 must parse as the SDK's response
type, streamed or not.
"""

from __future__ import annotations

import collections.abc
import json
import os
import types
import typing
from functools import cache
from pathlib import Path
from typing import Any

import anthropic
import anthropic.types.message_create_params as messages_api
import httpx
import openai
import openai.types as api
import openai.types.chat as chat_api
import openai.types.responses.response_create_params as responses_api
import pydantic
import pytest
import typing_extensions
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deployer.runtime import RuntimeConfig
from tests import ggufgen
from tests.serving import Server, launch

pytestmark = pytest.mark.model

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-1000, 1000) | st.floats(-10, 10) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
# fields whose size decides how long a request runs: bounded (values outside are still tried for n and tokens)
BOUNDED: dict[str, st.SearchStrategy[Any]] = {
    "max_tokens": st.integers(-1, 6) | st.none(),
    "max_completion_tokens": st.integers(-1, 6) | st.none(),
    "max_output_tokens": st.integers(-1, 6) | st.none(),
    "n": st.integers(-1, 3) | st.sampled_from([None, 129]),
    "best_of": st.integers(0, 2) | st.none(),
    "top_logprobs": st.integers(-1, 21) | st.none(),
    "logprobs": st.booleans() | st.integers(-1, 6) | st.none(),
    # names: mostly the form the spec's pattern allows (tool and function names), sometimes anything
    "name": st.from_regex(r"[a-zA-Z0-9_-]{1,12}", fullmatch=True) | st.text(max_size=8),
    "prompt": st.text(max_size=20) | st.lists(st.text(max_size=8), max_size=2) | st.lists(st.integers(-1, 5000), max_size=5),
}  # fmt: skip


def _alias(metadata: tuple[Any, ...], key: str) -> str:
    return next((m.alias for m in metadata if getattr(m, "alias", None)), key)


@cache
def strategy(tp: Any) -> st.SearchStrategy[Any]:
    """Hypothesis strategy for values of an ``openai`` request type (JSON-ready, aliases applied)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return strategy(args[0])
    if typing_extensions.is_typeddict(tp):
        hints = typing_extensions.get_type_hints(tp, include_extras=True)
        required, optional = {}, {}
        for key, hint in hints.items():
            metadata, inner, is_required = (), hint, False
            # the SDK's files use postponed annotations: Required[...] is only seen on the hint itself
            while typing.get_origin(inner) in (typing.Annotated, typing.Required, typing.NotRequired):
                is_required = is_required or typing.get_origin(inner) is typing.Required
                metadata += getattr(inner, "__metadata__", ())
                inner = typing.get_args(inner)[0]
            value = BOUNDED[key] if key in BOUNDED else st.deferred(lambda inner=inner: strategy(inner))
            if key == "messages":  # the spec's minItems, which the TypedDicts cannot say
                value = value.filter(bool)
            (required if is_required else optional)[_alias(metadata, key)] = value
        return st.fixed_dictionaries(required, optional=optional)
    if origin is typing.Literal:
        return st.sampled_from(args)
    if origin in (typing.Union, types.UnionType):
        return st.one_of([strategy(a) for a in args])
    if origin in (list, collections.abc.Iterable, collections.abc.Sequence, typing.List):  # noqa: UP006
        return st.lists(strategy(args[0]), max_size=3)
    if origin in (dict, collections.abc.Mapping, typing.Dict):  # noqa: UP006
        return st.dictionaries(st.text(max_size=6), strategy(args[1]), max_size=3)
    simple = {
        str: st.text(max_size=12),
        int: st.integers(-5, 300),
        float: st.floats(-3, 3, allow_nan=False),
        bool: st.booleans(),
        type(None): st.none(),
        object: JSON,
    }
    if tp in simple:
        return simple[tp]
    if isinstance(tp, type) and issubclass(tp, pydantic.BaseModel):  # a response object the SDK also accepts
        return st.nothing()
    if typing.IO in (tp, origin) or os.PathLike in (tp, origin) or tp is bytes or origin is tuple:
        return st.nothing()  # a file upload: never part of a JSON body
    raise TypeError(f"no strategy for {tp!r}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Server:
    """A tiny model with a Hermes-style template: tools, tool choices and grammars all reachable."""
    folder = tmp_path_factory.mktemp("fuzz")
    template = (Path(__file__).parent / "chat_templates" / "hermes.jinja").read_text(encoding="utf-8")
    path = ggufgen.write_gguf(folder / "tiny.gguf", ggufgen.TINY_LLAMA, chat_template=template)
    config = RuntimeConfig(model_name="tiny", model_path=str(path), n_ctx=4096, n_threads=2)
    running = launch(config, folder)
    yield running
    running.stop()


def _check(response: httpx.Response, body: dict[str, Any], kind: str) -> None:
    shown = json.dumps(body)[:2000]
    assert response.status_code < 500, f"{response.status_code} for {shown}:\n{response.text[:2000]}"
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"], response.text
        return
    if body.get("stream") is True:
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", response.text[-500:]
        for event in events[:-1]:
            data = json.loads(event)
            assert "error" not in data, f"an error in the stream for {shown}: {data}"
            if kind == "chat":
                chat_api.ChatCompletionChunk.model_validate(data)
            else:  # the SDK reads completion chunks as Completion, whose finish_reason is set only on the last
                assert all(isinstance(c["text"], str) for c in data["choices"]), data
        return
    data = response.json()
    if kind == "chat":
        reply = chat_api.ChatCompletion.model_validate(data)
        assert all("refusal" in c["message"] for c in data["choices"]), "message.refusal is required by the spec"
        assert all(c.message.role == "assistant" for c in reply.choices)
    else:
        api.Completion.model_validate(data)


def _bounded(body: dict[str, Any]) -> dict[str, Any]:
    """A request without a token limit would generate to the end of the context: give it a small one."""
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        return {**body, "max_tokens": 4}
    return body


FUZZ = settings(
    max_examples=100,  # about 10 s per endpoint on a tiny model
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@FUZZ
@given(body=(strategy(chat_api.completion_create_params.CompletionCreateParamsNonStreaming)
       | strategy(chat_api.completion_create_params.CompletionCreateParamsStreaming)).map(_bounded))  # fmt: skip
def test_chat_completions_never_answer_5xx(server, body):
    with server.http() as http:
        _check(http.post("/v1/chat/completions", json=body), body, "chat")


@FUZZ
@given(body=(strategy(api.completion_create_params.CompletionCreateParamsNonStreaming)
       | strategy(api.completion_create_params.CompletionCreateParamsStreaming)).map(_bounded))  # fmt: skip
def test_completions_never_answer_5xx(server, body):
    with server.http() as http:
        _check(http.post("/v1/completions", json=body), body, "completion")


def test_the_strategies_reach_the_interesting_shapes():
    """The walker really follows the spec's types: messages of every role, tools, tool choices, no-content turns."""
    seen: set[str] = set()

    @settings(max_examples=300, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
    @given(strategy(chat_api.completion_create_params.CompletionCreateParamsNonStreaming))
    def collect(body: dict[str, Any]) -> None:
        json.dumps(body)  # JSON-ready
        for message in body["messages"]:
            seen.add(f"role:{message['role']}")
            if message["role"] == "assistant" and message.get("content") is None:
                seen.add("assistant-without-content")
        if body.get("tools"):
            seen.add("tools")
        if isinstance(body.get("tool_choice"), dict):
            seen.add("named-tool-choice")

    collect()
    expected = {"role:user", "role:assistant", "role:tool", "role:system", "role:developer", "tools"}
    assert expected | {"assistant-without-content"} <= seen, seen


# ## The agent protocols: Responses (the openai package's types) and Messages (the anthropic package's)


def _check_agent(response: httpx.Response, body: dict[str, Any], kind: str) -> None:
    shown = json.dumps(body)[:2000]
    assert response.status_code < 500 or response.status_code == 529, (
        f"{response.status_code} for {shown}:\n{response.text[:2000]}"
    )
    if response.status_code >= 400:
        data = response.json()
        error = data["error"]
        assert isinstance(error["message"], str) and error["message"], response.text
        assert kind == "responses" or data["type"] == "error", response.text
        return
    if body.get("stream") is True:
        events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")]
        assert events, response.text[-500:]
        kinds = [event["type"] for event in events]
        assert "error" not in kinds and "response.failed" not in kinds, f"an error in the stream for {shown}: {events}"
        last = "message_stop" if kind == "messages" else ("response.completed", "response.incomplete")
        assert kinds[-1] in last, kinds
        return
    if kind == "messages":
        anthropic.types.Message.model_validate(response.json())
    else:
        openai.types.responses.Response.model_validate(response.json())


@FUZZ
@given(body=(strategy(responses_api.ResponseCreateParamsNonStreaming)
       | strategy(responses_api.ResponseCreateParamsStreaming)).map(
           lambda b: b if b.get("max_output_tokens") is not None else {**b, "max_output_tokens": 4}))  # fmt: skip
def test_responses_never_answer_5xx(server, body):
    with server.http() as http:
        _check_agent(http.post("/v1/responses", json=body), body, "responses")


@FUZZ
@given(
    body=strategy(messages_api.MessageCreateParamsNonStreaming) | strategy(messages_api.MessageCreateParamsStreaming)
)
def test_messages_never_answer_5xx(server, body):
    with server.http() as http:
        _check_agent(http.post("/v1/messages", json=body), body, "messages")
