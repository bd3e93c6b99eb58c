"""Each wire protocol's decoder onto the one typed request, and the shared pieces of the encoders (no model)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deployer.runtime.errors import ApiError
from deployer.runtime.protocols import messages, openai, responses
from deployer.runtime.protocols.items import ItemStream
from deployer.runtime.protocols.request import GenerationRequest

ASK = [{"role": "user", "content": "hi"}]
TOOL = {"type": "object", "properties": {"unit": {"type": "string"}}}


def _error(decode: Any, body: Any) -> ApiError:
    with pytest.raises(ApiError) as caught:
        decode(body)
    assert caught.value.status == 400
    return caught.value


# ## Chat Completions and Completions


def test_chat_maps_sampling_extensions_and_template_variables():
    request = openai.decode_chat(
        {
            "model": "x",
            "messages": ASK,
            "temperature": 0.2,
            "top_k": 5,
            "repetition_penalty": 1.2,
            "stop": "END",
            "max_completion_tokens": 9,
            "chat_template_kwargs": {"enable_thinking": False},
            "reasoning_effort": "low",
            "logprobs": True,
            "top_logprobs": 3,
            "cache_prompt": True,
        }
    )
    assert isinstance(request, GenerationRequest)
    assert (request.temperature, request.top_k, request.repeat_penalty, request.stop) == (0.2, 5, 1.2, ["END"])
    assert request.max_tokens == 9 and request.logprobs == 3
    assert request.template_kwargs == {"enable_thinking": False, "reasoning_effort": "low"}  # the explicit form wins
    assert not request.continue_final


@pytest.mark.parametrize(
    ("change", "param"),
    [
        pytest.param({"bogus": 1}, "bogus", id="unknown"),
        pytest.param({"top_k": -1}, "top_k", id="extension-range"),
        pytest.param({"cache_prompt": False}, "cache_prompt", id="cache-prompt-false"),
        pytest.param({"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs", id="reserved-variable"),
        pytest.param({"repeat_penalty": 1.1, "repetition_penalty": 1.2}, "repetition_penalty", id="both-penalties"),
        pytest.param({"json_schema": {}, "response_format": {"type": "json_object"}}, "json_schema", id="two-formats"),
        pytest.param({"reasoning_effort": "max"}, "reasoning_effort", id="effort"),
        pytest.param({"modalities": ["audio"]}, "modalities", id="audio"),
        pytest.param({"stop": [1]}, "stop", id="stop-type"),
    ],
)
def test_chat_refuses_with_the_field_named(change, param):
    assert _error(openai.decode_chat, {"messages": ASK, **change}).param == param


def test_top_level_json_schema_is_the_answer_format():
    request = openai.decode_chat({"messages": ASK, "json_schema": {"const": "42"}})
    assert request.json_schema == {"const": "42"}


@pytest.mark.parametrize(
    ("extra", "continued"),
    [
        pytest.param({}, True, id="automatic"),
        pytest.param({"add_generation_prompt": True}, False, id="closed-explicitly"),
        pytest.param({"continue_final_message": True, "add_generation_prompt": False}, True, id="vllm"),
    ],
)
def test_a_final_assistant_message_is_continued(extra, continued):
    body = {"messages": [*ASK, {"role": "assistant", "content": "{"}], **extra}
    assert openai.decode_chat(body).continue_final is continued


def test_completions_keep_openai_defaults():
    request = openai.decode_completion({"prompt": "Hi", "n_probs": 2})
    assert request.kind == "completion" and request.max_tokens == 16 and request.logprobs == 2
    assert _error(openai.decode_completion, {"prompt": "Hi", "messages": []}).param == "messages"


# ## Responses


def test_responses_input_items_become_chat_turns():
    store = responses.ResponseStore()
    call = responses.decode(
        {
            "instructions": "Be brief.",
            "input": [
                {"role": "developer", "content": [{"type": "input_text", "text": "Rules."}]},
                {"type": "message", "role": "user", "content": "List files."},
                {"type": "reasoning", "summary": [{"type": "summary_text", "text": "Run ls."}]},
                {"type": "function_call", "call_id": "c1", "name": "shell", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "a.txt"},
            ],
            "tools": [{"type": "function", "name": "shell", "parameters": TOOL}, {"type": "web_search"}],
            "reasoning": {"effort": "none"},
            "text": {"format": {"type": "json_schema", "name": "x", "schema": TOOL}},
            "max_output_tokens": 7,
            "store": False,
        },
        store,
    )
    request = call.request
    assert [m["role"] for m in request.messages] == ["system", "system", "user", "assistant", "tool"]
    assistant = request.messages[3]
    assert assistant["reasoning_content"] == "Run ls." and assistant["tool_calls"][0]["id"] == "c1"
    assert [t["function"]["name"] for t in request.tools] == ["shell"] and call.dropped == ("web_search",)
    assert request.template_kwargs == {"reasoning_effort": "none", "enable_thinking": False}
    assert request.json_schema == TOOL and request.max_tokens == 7 and call.store is False


@pytest.mark.parametrize(
    ("body", "param"),
    [
        pytest.param({"input": "hi", "tools": [{"type": "code_interpreter"}]}, "tools", id="hosted"),
        pytest.param({"input": "hi", "background": True}, "background", id="unknown"),
        pytest.param({"input": "hi", "max_output_tokens": 0}, "max_output_tokens", id="renamed"),
        pytest.param({"input": [{"type": "image_generation_call"}]}, "input", id="item"),
        pytest.param({"input": "hi", "previous_response_id": "resp_x"}, "previous_response_id", id="not-stored"),
    ],
)
def test_responses_refuse_with_the_field_named(body, param):
    with pytest.raises(ApiError) as caught:
        responses.decode(body, responses.ResponseStore())
    assert caught.value.param == param and caught.value.status in (400, 404)


def test_the_store_is_lru_and_bounded_in_bytes():
    store = responses.ResponseStore(max_items=2, max_bytes=10_000)
    for name in ("a", "b", "c"):
        store.put({"id": name}, [])
    store.get("b")
    store.put({"id": "d"}, [{"content": "x" * 100}])
    with pytest.raises(ApiError) as caught:
        store.get("c")  # the least recently used
    assert caught.value.status == 404 and "per container" in caught.value.message
    assert store.get("b")[0] == {"id": "b"}
    store.put({"id": "big"}, [{"content": "x" * 20_000}])  # larger than the store: not kept, nothing evicted
    assert store.get("d") and store.bytes <= 10_000


# ## Messages


def test_messages_blocks_become_chat_turns():
    request = messages.decode(
        {
            "model": "claude-x",
            "max_tokens": 50,
            "system": [{"type": "text", "text": "Be brief."}],
            "messages": [
                {"role": "user", "content": "Weather?"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "Call it.", "signature": "s"},
                        {"type": "tool_use", "id": "t1", "name": "forecast", "input": {"unit": "c"}},
                    ],
                },
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "22", "is_error": True}],
                },
            ],
            "tools": [{"name": "forecast", "input_schema": TOOL}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
            "thinking": {"type": "disabled"},
            "stop_sequences": ["\n\n"],
            "top_k": 3,
        }
    )
    assert [m["role"] for m in request.messages] == ["system", "user", "assistant", "tool"]
    assert json.loads(request.messages[2]["tool_calls"][0]["function"]["arguments"]) == {"unit": "c"}
    assert request.messages[2]["reasoning_content"] == "Call it." and request.messages[3]["content"] == "Error: 22"
    assert request.tool_choice == "required" and request.parallel_tool_calls is False
    assert request.template_kwargs == {"enable_thinking": False, "thinking": False}
    assert request.stop == ["\n\n"] and request.top_k == 3 and request.max_tokens == 50


def test_messages_output_config_is_the_effort_and_the_format():
    request = messages.decode(
        {
            "max_tokens": 5,
            "messages": ASK,
            "output_config": {"effort": "max", "format": {"type": "json_schema", "schema": TOOL}},
        }
    )
    assert request.json_schema == TOOL and request.template_kwargs["reasoning_effort"] == "high"
    with pytest.raises(ApiError) as caught:
        messages.decode({"max_tokens": 5, "messages": ASK, "output_config": {"verbosity": 1}})
    assert "output_config.verbosity" in caught.value.message


def test_messages_errors_are_in_anthropic_shape():
    busy = ApiError(429, "busy", code="server_busy", headers={"Retry-After": "3"})
    response = messages.error_response(busy)
    assert response.status_code == 529 and response.headers["retry-after"] == "3"
    assert json.loads(response.body) == {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}
    assert messages.error_body(ApiError(401, "no"))["error"]["type"] == "authentication_error"
    assert messages.error_body(ApiError(500, "bug"))["error"]["type"] == "api_error"
    with pytest.raises(ApiError) as caught:
        messages.decode({"messages": ASK})
    assert "max_tokens" in caught.value.message


# ## Output items


def test_deltas_become_items_that_open_grow_and_close():
    stream = ItemStream()
    events = stream.feed(
        [
            {"reasoning_content": "Hm"},
            {"reasoning_content": "m."},
            {"content": "Let me check."},
            {"tool_calls": [{"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": ""}}]},
            {"tool_calls": [{"index": 0, "function": {"arguments": '{"a":'}}]},
            {"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]},
        ]
    )
    events += stream.close()
    shown = [(what, item.kind, text) for what, item, text in events]
    assert shown == [
        ("open", "reasoning", ""),
        ("delta", "reasoning", "Hm"),
        ("delta", "reasoning", "m."),
        ("close", "reasoning", ""),
        ("open", "text", ""),
        ("delta", "text", "Let me check."),
        ("close", "text", ""),
        ("open", "call", ""),
        ("delta", "call", '{"a":'),
        ("delta", "call", "1}"),
        ("close", "call", ""),
    ]
    assert [(i.index, i.text) for i in stream.items] == [(0, "Hmm."), (1, "Let me check."), (2, '{"a":1}')]


# ## The chat template: prefill and template variables (pure rendering, no model)


@pytest.mark.parametrize("name", ["hermes", "qwen3", "llama3", "mistral", "generic"])
def test_prefill_leaves_the_last_assistant_message_open(name):
    from tests.test_chat_parse import template

    turns = [*ASK, {"role": "assistant", "content": '{"answer":'}]
    continued = template(name).render(turns, continue_final=True).prompt
    closed = template(name).render(turns).prompt
    assert continued.endswith('{"answer":') and closed.startswith(continued) and len(closed) > len(continued)


def test_template_variables_reach_the_template():
    from tests.test_chat_parse import template

    qwen = template("qwen3")
    assert not qwen.render(ASK).prompt.endswith("</think>\n\n")
    assert qwen.render(ASK, variables={"enable_thinking": False}).prompt.endswith("<think>\n\n</think>\n\n")


STREAM_BODIES = [
    pytest.param({"messages": ASK, "stream": True, "n": 2}, id="chat"),
    pytest.param({"messages": ASK, "stream": True, "logprobs": True}, id="chat-logprobs"),
    pytest.param({"prompt": "Hi", "stream": True, "logprobs": 1, "n": 2}, id="completion-logprobs"),
    pytest.param({"prompt": "Hi", "stream": True, "n": 2}, id="completion"),
    pytest.param({"prompt": "Hi", "stream": True, "echo": True}, id="completion-echo"),
]


def _same_events(body: dict, steps: list) -> None:
    """Events written with the pre-encoded parts are exactly each whole chunk encoded on its own."""
    from deployer.runtime.protocols.openai import Responder, sse

    decode = openai.decode_chat if "messages" in body else openai.decode_completion
    echo = body["prompt"] if body.get("echo") else ""
    fast, plain = Responder(decode(body), "m", echo=echo), Responder(decode(body), "m", echo=echo)
    plain.id, plain.created = fast.id, fast.created
    written = b""
    for pieces in steps:
        events = fast.events(pieces)
        assert events == b"".join(map(sse, plain.chunks(pieces)))
        written += events
    assert written.count(b"data: ") >= 2  # the test compares something


@pytest.mark.parametrize("body", STREAM_BODIES)
def test_stream_events_are_the_chunks_encoded_one_by_one(body):
    from deployer.runtime.engine.sampling import Delta, TokenLogprob

    n = body.get("n", 1)
    steps = [
        [
            Delta(i, t, (TokenLogprob(t, t.encode(), -0.5, ((t, t.encode(), -0.5),)),))
            for i, t in enumerate(["Hel", 'a "q"\n'][:n])
        ],
        [Delta(i, t) for i, t in enumerate(["", "\u2028\x00\\"][:n])],  # no text: a chat chunk has no delta
        [
            Delta(i, t, (TokenLogprob(t, t.encode(), -0.1),), f)
            for i, (t, f) in enumerate([("lo", "stop"), ("é", "length")][:n])
        ],
    ]
    _same_events(body, steps)


@settings(max_examples=50)
@given(texts=st.lists(st.text(max_size=6), min_size=1, max_size=5))
@pytest.mark.parametrize("body", STREAM_BODIES)
def test_stream_events_of_any_text_are_the_chunks_encoded(body, texts):
    from deployer.runtime.engine.sampling import Delta

    _same_events(body, [[Delta(0, text)] for text in texts] + [[Delta(0, "", (), "length")]])


@pytest.mark.parametrize(
    ("bias", "expected"),
    [
        ({}, ()),
        ({"5": 1.5, "0": -100, "1023": 2}, ((5, 1.5), (0, -100), (1023, 2))),
        ({"7": 1, "07": 3}, ((7, 3),)),  # the same token twice: the last value, as the keys' order says
        ({"5": 1, "x1": 2, "2000": 3}, "logit_bias key 'x1' is not a token id of this model (0..1023)"),
        ({"5": 1, "1024": 2}, "logit_bias key '1024' is not a token id of this model (0..1023)"),
        ({"-1": 2}, "logit_bias key '-1' is not a token id"),
    ],
)
def test_logit_bias_keys_are_token_ids_of_the_model(bias, expected):
    from deployer.runtime.prepare import _logit_bias

    class Vocabulary:
        n_vocab = 1024

    if isinstance(expected, tuple):
        assert _logit_bias(Vocabulary(), bias, None) == expected  # type: ignore[arg-type]
    else:
        with pytest.raises(ApiError, match=re.escape(expected)):
            _logit_bias(Vocabulary(), bias, None)  # type: ignore[arg-type]
