"""Tool calls, reasoning and every assistant turn OpenAI allows, end to end: the official ``openai`` client,
the real runtime over HTTP, real llama.cpp, tiny models (tests/ggufgen.py) carrying each family's template.

The tiny models have random weights, so what they write is made certain where a test needs it: by the
grammar of ``tool_choice`` "required" / a named function (the server's own), or by a ``grammar`` in the
request (llama-cpp-python's extension) that spells out the text a real model of the family would write.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from deployer.runtime import RuntimeConfig
from tests import ggufgen
from tests.serving import Server, launch
from tests.test_chat_render import SMALL_TOOLS

pytestmark = pytest.mark.model

TEMPLATES = Path(__file__).parent / "chat_templates"
LLAMA_TEMPLATES = Path(__file__).parent / "llama_templates"  # llama.cpp's real templates
FAMILIES = ["hermes", "qwen3", "qwen3_xml", "llama3", "mistral", "devstral", "generic"]
ASK = [{"role": "user", "content": "Is it warm tomorrow?"}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in SMALL_TOOLS}
MODEL = "tiny"
# A random model under a grammar stops where the grammar lets it, at random: room for many calls, and
# for a thinking template a nudge to "<" (the byte token <0x3C> of ggufgen's vocabulary, id 3 + 0x3C),
# which the grammar lets through only to close the think block or open a call.
ROOM = 1000
CLOSE_THINKING = {"qwen3": {str(3 + ord("<")): 8.0}}


def _template_path(name: str) -> Path:
    path = TEMPLATES / f"{name}.jinja"
    return path if path.exists() else LLAMA_TEMPLATES / f"{name}.jinja"


def _serve(folder: Path, template: str | None, **changes: Any) -> Server:
    path = ggufgen.write_gguf(
        folder / "tiny.gguf",
        ggufgen.TINY_LLAMA,
        chat_template=None if template is None else _template_path(template).read_text(encoding="utf-8"),
    )
    config = RuntimeConfig(model_name=MODEL, model_path=str(path), n_ctx=4096, n_threads=2, **changes)
    return launch(config, folder)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    """One tiny-model server per fixture template, started on first use."""

    class Lazy(dict):
        def __missing__(self, name: str) -> Server:
            server = _serve(tmp_path_factory.mktemp(name), name.split(":")[0], **_CHANGES.get(name, {}))
            self[name] = server  # kept: the next test of this template reuses it
            return server

    started = Lazy()
    yield started
    for server in started.values():
        server.stop()


_CHANGES = {"qwen3:raw": {"reasoning_format": "none"}, "deepseek_r1:raw": {"reasoning_format": "none"}}


def _chat(server: Server, **options: Any) -> Any:
    options = {"model": MODEL, "messages": ASK, "max_tokens": 300, "temperature": 1.0, "seed": 1, **options}
    return server.client().chat.completions.create(**options)


def _check_calls(calls: list[Any], only: str | None = None) -> None:
    assert calls, "no tool_calls"
    for call in calls:
        assert call.type == "function" and call.id
        assert only is None or call.function.name == only
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


# ## tool_choice "required" and a named function: every family, streaming and not


@pytest.mark.parametrize("family", FAMILIES)
def test_required_gives_valid_tool_calls(servers, family):
    bias = CLOSE_THINKING.get(family)
    reply = _chat(servers[family], tools=SMALL_TOOLS, tool_choice="required", max_tokens=ROOM, logit_bias=bias)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    _check_calls(choice.message.tool_calls)
    assert choice.message.refusal is None


@pytest.mark.parametrize("family", FAMILIES)
def test_named_function_streams_and_the_sdk_assembles_it(servers, family):
    client = servers[family].client()
    named = {"type": "function", "function": {"name": "forecast"}}
    request = {"model": MODEL, "messages": ASK, "max_tokens": ROOM, "seed": 2, "tools": SMALL_TOOLS}
    if family in CLOSE_THINKING:
        request["logit_bias"] = CLOSE_THINKING[family]
    with client.chat.completions.stream(**request, tool_choice=named) as stream:
        argument_events = [e for e in stream if e.type == "tool_calls.function.arguments.delta"]
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    _check_calls(choice.message.tool_calls, only="forecast")
    assert len(choice.message.tool_calls) == 1
    assert len(argument_events) > 1, "arguments arrive in pieces"
    assert "".join(e.arguments_delta for e in argument_events) == choice.message.tool_calls[0].function.arguments


def test_raw_stream_deltas_have_openai_shape(servers):
    chunks = list(_chat(servers["hermes"], tools=SMALL_TOOLS, tool_choice="required", stream=True, max_tokens=ROOM))
    deltas = [c.choices[0].delta for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    first = deltas[0].tool_calls[0]
    assert first.index == 0 and first.id and first.type == "function" and first.function.name in SCHEMAS
    for delta in deltas[1:]:
        for call in delta.tool_calls:
            assert call.id is None or call.index > 0, "the id comes once, on a call's first delta"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_parallel_tool_calls_false_gives_one_call(servers):
    for seed in range(3):
        reply = _chat(
            servers["hermes"], tools=SMALL_TOOLS, tool_choice="required", parallel_tool_calls=False, seed=seed
        )
        assert len(reply.choices[0].message.tool_calls) == 1


# ## tool_choice "auto": what the model writes is parsed


HERMES_CALL = '<tool_call>\\n{\\"name\\": \\"forecast\\", \\"arguments\\": {\\"unit\\": \\"c\\", \\"tomorrow\\": true}}\\n</tool_call>'


def test_auto_parses_a_call_the_model_writes(servers):
    grammar = f'root ::= "Let me check.\\n{HERMES_CALL}"'
    reply = _chat(servers["hermes"], tools=SMALL_TOOLS, extra_body={"grammar": grammar})
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "tool_calls"
    assert message.content == "Let me check."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [
        ("forecast", {"unit": "c", "tomorrow": True})
    ]


def test_auto_returns_off_schema_arguments_as_text(servers):
    bad = '<tool_call>\\n{\\"name\\": \\"forecast\\", \\"arguments\\": {\\"unit\\": \\"kelvin\\"}}\\n</tool_call>'
    reply = _chat(servers["hermes"], tools=SMALL_TOOLS, extra_body={"grammar": f'root ::= "{bad}"'})
    message = reply.choices[0].message
    assert message.tool_calls is None and "kelvin" in message.content
    assert reply.choices[0].finish_reason == "stop"


def test_auto_without_a_call_is_a_plain_answer(servers):
    reply = _chat(servers["llama3"], tools=SMALL_TOOLS, max_tokens=8, extra_body={"grammar": 'root ::= "Sunny."'})
    assert reply.choices[0].message.content == "Sunny." and reply.choices[0].message.tool_calls is None


# ## A conversation with a tool result


@pytest.mark.parametrize("family", FAMILIES)
def test_tool_result_turn_is_answered(servers, family):
    call_id = "abcDEF123"  # 9 alphanumerics: Mistral's templates check
    messages = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": call_id, "type": "function", "function": {"name": "forecast", "arguments": '{"unit": "c"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "content": "21 degrees"},
    ]
    reply = _chat(
        servers[family], messages=messages, tools=SMALL_TOOLS, max_tokens=8, extra_body={"grammar": 'root ::= "Warm."'}
    )
    assert reply.choices[0].message.content == "Warm."


def test_a_template_rule_is_a_400_with_its_message(servers):
    messages = [
        *ASK,
        {
            "role": "assistant",
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "alarm", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "ok"},
    ]
    with pytest.raises(openai.BadRequestError) as caught:
        _chat(servers["mistral"], messages=messages, tools=SMALL_TOOLS)
    assert "Tool call IDs should be alphanumeric strings with length 9!" in caught.value.message


# ## Models that cannot take tools: a clear 400


def test_demo_model_gemma_format_refuses_tools(gemma_server):
    with pytest.raises(openai.BadRequestError) as caught:
        gemma_server.client().chat.completions.create(model="gemma-3-270m", messages=ASK, tools=SMALL_TOOLS)
    assert caught.value.status_code == 400 and caught.value.code == "tools_not_supported"
    assert "chat_format 'gemma'" in caught.value.message and "no tool support" in caught.value.message
    reply = gemma_server.client().chat.completions.create(
        model="gemma-3-270m", messages=ASK, tools=SMALL_TOOLS, tool_choice="none", max_tokens=4
    )
    assert reply.choices[0].message.tool_calls is None


def test_template_without_tools_refuses_them(servers):
    with pytest.raises(openai.BadRequestError) as caught:
        _chat(servers["notools"], tools=SMALL_TOOLS, tool_choice="required")
    assert caught.value.code == "tools_not_supported" and "no place for tools" in caught.value.message


# ## Reasoning


THOUGHT = 'root ::= "Warm, I think.</think>Yes, warm."'


@pytest.mark.parametrize("family", ["deepseek_r1", "qwen3"])
def test_think_is_split_off(servers, family):
    grammar = THOUGHT if family == "deepseek_r1" else 'root ::= "<think>Warm, I think.</think>Yes, warm."'
    reply = _chat(servers[family], max_tokens=40, extra_body={"grammar": grammar})
    message = reply.choices[0].message
    assert message.content == "Yes, warm."
    assert message.model_extra["reasoning_content"] == "Warm, I think."
    chunks = list(_chat(servers[family], max_tokens=40, stream=True, extra_body={"grammar": grammar}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == "Yes, warm."
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == "Warm, I think."


def test_reasoning_format_none_keeps_the_raw_text(servers):
    reply = _chat(servers["deepseek_r1:raw"], max_tokens=40, extra_body={"grammar": THOUGHT})
    assert reply.choices[0].message.content == "Warm, I think.</think>Yes, warm."
    assert "reasoning_content" not in (reply.choices[0].message.model_extra or {})


# ## Every assistant turn OpenAI allows is served


HISTORIES = [
    pytest.param({"role": "assistant"}, id="no-content"),
    pytest.param({"role": "assistant", "content": None}, id="null-content"),
    pytest.param({"role": "assistant", "refusal": "I can't help with that."}, id="refusal"),
    pytest.param({"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]}, id="refusal-part"),
    pytest.param({"role": "assistant", "content": "Hello", "name": "helper"}, id="named"),
]


@pytest.mark.parametrize("history", HISTORIES)
def test_assistant_turns_are_served_by_the_demo_model(gemma_server, history):
    messages = [*ASK, history, {"role": "user", "content": "Again?", "name": "ana"}]
    reply = gemma_server.client().chat.completions.create(model="gemma-3-270m", messages=messages, max_tokens=4)
    assert reply.choices[0].message.refusal is None and reply.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("history", HISTORIES)
@pytest.mark.parametrize("family", ["hermes", "llama3", "notools"])
def test_assistant_turns_are_served_with_a_template(servers, family, history):
    messages = [*ASK, history, {"role": "user", "content": "Again?"}]
    reply = _chat(servers[family], messages=messages, max_tokens=4)
    assert reply.choices[0].message.refusal is None


# ## A sample of llama.cpp's real templates, served: the syntax learned from each, through the SDK

REAL = [
    "Qwen3.5-4B",
    "GLM-4.7-Flash",
    "MiniMax-M2",
    "MiniMax-M3",
    "Kimi-K2-Thinking",
    "openai-gpt-oss-120b",
    "deepseek-ai-DeepSeek-V3.1",
    "Mistral-Small-3.2-24B-Instruct-2506",
    "google-gemma-4-31B-it",
]
NUDGE = {str(3 + ord("<")): 8.0}  # a random model under a thinking template's grammar: towards its closing marker


@pytest.mark.parametrize("template", REAL)
def test_real_templates_stream_required_calls_and_take_a_tool_result(servers, template):
    client = servers[template].client()
    request = {"model": MODEL, "messages": ASK, "max_tokens": ROOM, "seed": 2, "tools": SMALL_TOOLS,
               "logit_bias": NUDGE, "parallel_tool_calls": False}  # fmt: skip
    with client.chat.completions.stream(**request, tool_choice="required") as stream:
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    _check_calls(choice.message.tool_calls)
    call = choice.message.tool_calls[0]
    messages = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [{"id": "abcDEF123", "type": "function",
         "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": "abcDEF123", "content": "21 degrees"},
    ]  # fmt: skip
    reply = _chat(servers[template], messages=messages, tools=SMALL_TOOLS, max_tokens=8,
                  extra_body={"grammar": 'root ::= "Warm."'})  # fmt: skip
    message = reply.choices[0].message
    # where the prompt opens the reasoning (Qwen 3.5, GLM 4.7, MiniMax M2), the forced text is reasoning
    said = (message.content or "") + (message.model_extra or {}).get("reasoning_content", "")
    assert said == "Warm.", message


def test_a_real_template_without_tools_refuses_them(servers):
    with pytest.raises(openai.BadRequestError) as caught:
        _chat(servers["deepseek-ai-DeepSeek-R1-Distill-Llama-8B"], tools=SMALL_TOOLS)
    assert "no place for tools" in caught.value.message
