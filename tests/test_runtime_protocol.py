"""OpenAI request bodies made plain, and refused with a 4xx naming the field (no model needed)."""

from __future__ import annotations

import pytest

from deployer.runtime.errors import ApiError
from deployer.runtime.protocols.checks import (
    MAX_N,
    normalize_chat,
    normalize_completion,
    normalize_embedding,
    parse_json,
)

USER = {"role": "user", "content": "Hi"}


@pytest.mark.parametrize(
    ("body", "check"),
    [
        pytest.param(
            {"messages": [{"role": "developer", "content": "Be brief."}, USER]},
            lambda c: c.params["messages"][0] == {"role": "system", "content": "Be brief."},
            id="developer-role-is-system",
        ),
        pytest.param(
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]},
            lambda c: c.params["messages"][0]["content"] == "a\nb",
            id="text-parts-joined",
        ),
        pytest.param(
            {"messages": [USER], "max_completion_tokens": 7, "max_tokens": 99},
            lambda c: c.params["max_tokens"] == 7 and "max_completion_tokens" not in c.params,
            id="max-completion-tokens-wins",
        ),
        pytest.param(
            {"messages": [USER], "stream": True, "stream_options": {"include_usage": True}},
            lambda c: c.stream and c.include_usage and "stream_options" not in c.params,
            id="include-usage",
        ),
        pytest.param(
            {
                "messages": [USER],
                "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object"}}},
            },
            lambda c: c.json_schema == {"type": "object"} and "response_format" not in c.params,
            id="json-schema-extracted",
        ),
        pytest.param(
            {"messages": [USER], "response_format": {"type": "json_object"}},
            lambda c: c.json_object and c.json_schema is None,
            id="json-object",
        ),
        pytest.param(
            {"messages": [USER], "response_format": {"type": "text"}, "temperature": None, "n": 3},
            lambda c: not c.json_object and "temperature" not in c.params and c.n == 3,
            id="nulls-mean-defaults",
        ),
        pytest.param(
            {"messages": [USER], "stop": ["", "END"]},
            lambda c: c.params["stop"] == ["END"],
            id="empty-stop-strings-dropped",
        ),
        pytest.param(
            {"messages": [{"role": "assistant", "content": None, "tool_calls": []}, USER]},
            lambda c: "content" not in c.params["messages"][0],
            id="assistant-tool-call-turn-without-content",
        ),
    ],
)
def test_chat_normalized(body, check):
    assert check(normalize_chat(body))


@pytest.mark.parametrize(
    ("body", "message", "param"),
    [
        pytest.param([USER], "the request body must be a JSON object, not an array", None, id="not-an-object"),
        pytest.param({}, "messages is required", "messages", id="missing-messages"),
        pytest.param({"messages": []}, "messages must be a non-empty list", "messages", id="empty-messages"),
        pytest.param({"messages": ["hi"]}, "messages[0] must be an object", "messages", id="message-not-object"),
        pytest.param({"messages": [{"role": "robot", "content": "x"}]}, "unknown role 'robot'", "messages", id="bad-role"),
        pytest.param({"messages": [{"role": "user"}]}, "messages[0].content is required", "messages", id="no-content"),
        pytest.param(
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "content of type 'image_url' is not supported",
            "messages[0].content",
            id="image-part",
        ),
        pytest.param({"messages": [USER], "max_tokens": -1}, "max_tokens must be at least 1, got -1", "max_tokens", id="negative-max-tokens"),
        pytest.param({"messages": [USER], "max_tokens": 0}, "max_tokens must be at least 1, got 0", "max_tokens", id="zero-max-tokens"),
        pytest.param({"messages": [USER], "max_tokens": "5"}, "max_tokens must be an integer, got a string", "max_tokens", id="string-max-tokens"),
        pytest.param({"messages": [USER], "max_completion_tokens": True}, "must be an integer, got a boolean", "max_completion_tokens", id="bool-max-completion"),
        pytest.param({"messages": [USER], "n": MAX_N + 1}, f"n must be at most {MAX_N}", "n", id="n-too-large"),
        pytest.param({"messages": [USER], "temperature": 3}, "temperature must be between 0 and 2, got 3", "temperature", id="temperature-range"),
        pytest.param({"messages": [USER], "stream_options": {"include_usage": True}}, "only allowed when stream is true", "stream_options", id="stream-options-without-stream"),
        pytest.param({"messages": [USER], "response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "json_schema must be an object with a name", "response_format", id="json-schema-without-name"),
        pytest.param({"messages": [USER], "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": []}}}, "must be a JSON schema object", "response_format", id="json-schema-not-an-object"),
        pytest.param({"messages": [USER], "response_format": {"type": "xml"}}, "response_format.type 'xml' is not supported", "response_format", id="unknown-format"),
        pytest.param({"messages": [USER], "response_format": {"type": "json_object"}, "grammar": "root ::= x"}, "either response_format or grammar", "response_format", id="two-grammars"),
        pytest.param({"messages": [USER], "seed": 1.5}, "seed must be an integer", "seed", id="float-seed"),
    ],
)  # fmt: skip
def test_chat_refused(body, message, param):
    with pytest.raises(ApiError) as info:
        normalize_chat(body)
    assert info.value.status == 400
    assert message in info.value.message
    assert info.value.param == param
    assert set(info.value.body()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    ("prompt", "text", "tokens"),
    [
        pytest.param("Once", "Once", None, id="text"),
        pytest.param(["Once"], "Once", None, id="one-text-in-a-list"),
        pytest.param([2, 100, 7], "", [2, 100, 7], id="token-array"),
        pytest.param([[2, 100]], "", [2, 100], id="one-token-array-in-a-list"),
    ],
)
def test_completion_prompts(prompt, text, tokens):
    call = normalize_completion({"prompt": prompt})
    assert (call.params["prompt"], call.prompt_tokens, call.kind) == (text, tokens, "completion")


@pytest.mark.parametrize(
    ("body", "message", "param"),
    [
        pytest.param({}, "prompt is required", "prompt", id="missing-prompt"),
        pytest.param({"prompt": ["a", "b"]}, "a batch of 2 prompts is not supported", "prompt", id="batch"),
        pytest.param({"prompt": []}, "prompt must not be an empty list", "prompt", id="empty-list"),
        pytest.param({"prompt": [1, -5]}, "must not be negative", "prompt", id="negative-token"),
        pytest.param({"prompt": 5}, "prompt must be a string or a list of token ids, got a number", "prompt", id="number"),
        pytest.param({"prompt": ["a", 5]}, "prompt must be a string or a list of token ids, got an array", "prompt", id="text-and-number-not-cut-to-the-text"),
        pytest.param({"prompt": [[["a"]]]}, "prompt must be a string or a list of token ids, got an array", "prompt", id="nested-too-deep"),
        pytest.param({"prompt": "x", "suffix": "y"}, "suffix (fill-in-the-middle) is not supported", "suffix", id="suffix"),
        pytest.param({"prompt": "x", "best_of": 3}, "best_of is not supported", "best_of", id="best-of"),
        pytest.param({"prompt": "x", "max_tokens": -3}, "max_tokens must be at least 1", "max_tokens", id="negative-max-tokens"),
    ],
)  # fmt: skip
def test_completion_refused(body, message, param):
    with pytest.raises(ApiError) as info:
        normalize_completion(body)
    assert info.value.status == 400 and message in info.value.message
    assert info.value.param == param


def test_json_schema_without_a_schema_is_any_json():
    call = normalize_chat(
        {"messages": [USER], "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}
    )
    assert call.json_object and call.json_schema is None


def test_logprobs_are_accepted():
    assert normalize_completion({"prompt": "x", "logprobs": 2}).params["logprobs"] == 2


@pytest.mark.parametrize(
    ("body", "inputs", "b64"),
    [
        pytest.param({"input": "hello"}, ["hello"], False, id="one-text"),
        pytest.param({"input": ["a", "b"], "encoding_format": "base64"}, ["a", "b"], True, id="base64-like-the-sdk"),
    ],
)
def test_embeddings_normalized(body, inputs, b64):
    call = normalize_embedding(body)
    assert (call.inputs, call.base64) == (inputs, b64)


@pytest.mark.parametrize(
    ("body", "message", "param"),
    [
        pytest.param({}, "input is required", "input", id="missing"),
        pytest.param({"input": [1, 2]}, "token-array inputs are not supported", "input", id="tokens"),
        pytest.param({"input": ""}, "must not contain empty strings", "input", id="empty"),
        pytest.param({"input": ["x"] * 2049}, "at most 2048 inputs per request, got 2049", "input", id="too-many"),
        pytest.param({"input": "x", "encoding_format": "int8"}, "encoding_format must be 'float' or 'base64'", "encoding_format", id="format"),
        pytest.param({"input": "x", "dimensions": 0}, "dimensions must be at least 1", "dimensions", id="zero-dimensions"),
    ],
)  # fmt: skip
def test_embeddings_refused(body, message, param):
    with pytest.raises(ApiError) as info:
        normalize_embedding(body)
    assert info.value.status == 400 and message in info.value.message
    assert info.value.param == param


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param(b'{"messages": [', "not valid JSON: Expecting value (line 1, column 15)", id="truncated"),
        pytest.param(b'{"temperature": NaN}', "NaN is not valid JSON", id="nan"),
        pytest.param(b"\xff\xfe", "not UTF-8", id="binary"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, "nested too deeply", id="deep-nesting"),
    ],
)
def test_parse_json_refuses(data, message):
    with pytest.raises(ApiError) as info:
        parse_json(data)
    assert info.value.status == 400 and message in info.value.message


def test_parse_json_accepts_json():
    assert parse_json(b'{"a": [1, 2.5, "\\u00e9"]}') == {"a": [1, 2.5, "é"]}
