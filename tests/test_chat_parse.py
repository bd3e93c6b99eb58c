"""Reading each family's answers back: tool calls, reasoning and text, whole and streamed in random pieces.

Every case goes through the real path: a fixture template (tests/chat_templates/, one per family)
is loaded, its family detected, a request rendered, and the parser of that rendering reads the text.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deployer.runtime.chat.template import ChatTemplate, RenderedChat
from tests.llamaparts import LLAMA_PARTS

TEMPLATES = Path(__file__).parent / "chat_templates"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
ANYTHING = {"type": "function", "function": {"name": "do_it", "parameters": {"type": "object"}}}
TOOLS = [WEATHER, ANYTHING]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@cache
def template(name: str, reasoning_format: str = "auto") -> ChatTemplate:
    loaded = ChatTemplate.load(
        **LLAMA_PARTS,
        template=(TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8"),
        chat_format=None,
        bos_token="<s>",
        eos_token="</s>",
        reasoning_format=reasoning_format,
    )
    assert loaded is not None
    return loaded


@cache
def rendered(name: str, choice: str = "auto", parallel: bool = True, reasoning_format: str = "auto") -> RenderedChat:
    tools = TOOLS if template(name).supports_tools else None
    return template(name, reasoning_format).render(ASK, tools=tools, tool_choice=choice, parallel_tool_calls=parallel)


def parse_whole(chat: RenderedChat, text: str) -> tuple[dict[str, Any], str | None, list[dict[str, Any]]]:
    parser = chat.parser()
    deltas = parser.feed(text)
    rest, message, finish = parser.finish()
    return message, finish, deltas + rest


def parse_pieces(chat: RenderedChat, pieces: list[str]) -> tuple[dict[str, Any], str | None, list[dict[str, Any]]]:
    parser = chat.parser()
    deltas = [d for piece in pieces for d in parser.feed(piece)]
    rest, message, finish = parser.finish()
    return message, finish, deltas + rest


def assemble(deltas: list[dict[str, Any]]) -> dict[str, Any]:
    """The message the deltas add up to, the way the openai SDK's stream helpers assemble it."""
    out: dict[str, Any] = {"content": "", "reasoning_content": "", "tool_calls": []}
    for delta in deltas:
        assert len(delta) == 1, delta  # one kind of fragment per delta
        for key in ("content", "reasoning_content"):
            out[key] += delta.get(key, "")
        for call in delta.get("tool_calls", []):
            index = call["index"]
            if index == len(out["tool_calls"]):
                assert {"id", "type", "function"} <= set(call), f"the first delta of a call carries its id: {call}"
                out["tool_calls"].append({"id": call["id"], "type": call["type"], "function": dict(call["function"])})
            else:
                assert "id" not in call and index < len(out["tool_calls"]), call
                out["tool_calls"][index]["function"]["arguments"] += call["function"]["arguments"]
    return out


def assert_deltas_add_up(message: dict[str, Any], deltas: list[dict[str, Any]]) -> None:
    built = assemble(deltas)
    assert built["content"] == (message["content"] or ""), (built, message)
    assert built["reasoning_content"] == message.get("reasoning_content", ""), (built, message)
    assert built["tool_calls"] == message.get("tool_calls", []), (built, message)


def calls_of(message: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message.get("tool_calls", [])]


PARIS = ("get_weather", {"city": "Paris"})
OSLO = ("get_weather", {"city": "Oslo", "unit": "c"})

# (template, generated text, content, calls, reasoning)
CASES = [
    pytest.param(
        "hermes",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        None, [PARIS], None, id="hermes-one-call",
    ),
    pytest.param(
        "hermes",
        'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}\n</tool_call>',
        "Let me look.", [PARIS, OSLO], None, id="hermes-text-then-two-calls",
    ),
    pytest.param("hermes", "It is sunny in Paris.", "It is sunny in Paris.", [], None, id="hermes-plain-text"),
    pytest.param(
        "hermes", 'A <tool_call> costs "{x}"', 'A <tool_call> costs "{x}"', [], None, id="hermes-unclosed-call-is-text"
    ),
    pytest.param(
        "qwen3",
        '<think>\nParis, so get_weather.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "Paris"}}\n</tool_call>',
        None, [PARIS], "Paris, so get_weather.", id="qwen3-think-then-call",
    ),
    pytest.param(
        "qwen3", "<think>short</think>The answer.", "The answer.", [], "short", id="qwen3-think-then-text"
    ),
    pytest.param(
        "qwen3_xml",
        "I will check.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n"
        "</tool_call>\n<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n"
        "<parameter=unit>\nc\n</parameter>\n</function>\n</tool_call>",
        "I will check.", [PARIS, OSLO], None, id="qwen3-xml-two-calls",
    ),
    pytest.param(
        "qwen3_xml",
        '<tool_call>\n<function=do_it>\n<parameter=n>\n42\n</parameter>\n<parameter=tags>\n["a", "b"]\n'
        "</parameter>\n<parameter=note>\nline one\nline two\n</parameter>\n</function>\n</tool_call>",
        None, [("do_it", {"n": 42, "tags": ["a", "b"], "note": "line one\nline two"})], None, id="qwen3-xml-typed-values",
    ),
    pytest.param(
        "llama3", '{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [PARIS], None, id="llama3-json"
    ),
    pytest.param(
        "llama3",
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',
        None, [PARIS], None, id="llama3-python-tag",
    ),
    pytest.param(
        "llama3",
        '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_weather", "parameters": '
        '{"city": "Oslo", "unit": "c"}}',
        None, [PARIS, OSLO], None, id="llama3-two-calls",
    ),
    pytest.param(
        "llama3", 'Use {"name": "x"} here.', 'Use {"name": "x"} here.', [], None, id="llama3-json-inside-text-is-text"
    ),
    pytest.param(
        "llama3", '{"answer": 42}', '{"answer": 42}', [], None, id="llama3-json-that-is-no-call-is-text"
    ),
    pytest.param(
        "llama3",
        '<|python_tag|>brave_search.call(query="x")',
        '<|python_tag|>brave_search.call(query="x")', [], None, id="llama3-builtin-tool-is-text",
    ),
    pytest.param(
        "mistral",
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
        '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}, "id": "abcdefghi"}]',
        None, [PARIS, OSLO], None, id="mistral-array",
    ),
    pytest.param(
        "mistral", "[TOOL_CALLS] nothing", "[TOOL_CALLS] nothing", [], None, id="mistral-marker-without-array-is-text"
    ),
    pytest.param(
        "devstral",
        'Checking.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo", '
        '"unit": "c"}',
        "Checking.", [PARIS, OSLO], None, id="devstral-name-args",
    ),
    pytest.param(
        "generic", '{"name": "get_weather", "arguments": {"city": "Paris"}}', None, [PARIS], None, id="generic-json"
    ),
    pytest.param("generic", "Just text {with braces}", "Just text {with braces}", [], None, id="generic-text"),
    pytest.param(
        "deepseek_r1", "First, 2+2.\n</think>\n\nIt is 4.", "It is 4.", [], "First, 2+2.", id="r1-prompt-opened-think"
    ),
    pytest.param("deepseek_r1", "No end tag", "", [], "No end tag", id="r1-unclosed-think-is-all-reasoning"),
    pytest.param("notools", "  Hello\n", "  Hello\n", [], None, id="no-tools-template-is-passthrough"),
]  # fmt: skip

MALFORMED = [
    pytest.param("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>', id="bad-json"),
    pytest.param("hermes", '<tool_call>\n{"name": "launch", "arguments": {}}\n</tool_call>', id="unknown-tool"),
    pytest.param(
        "hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"town": "Paris"}}\n</tool_call>', id="off-schema"
    ),
    pytest.param("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par', id="cut-off"),
    pytest.param("hermes", '<tool_call>\n{"arguments": {"city": "Paris"}}\n</tool_call>', id="no-name"),
    pytest.param("hermes", '<tool_call>\n{"name": 7, "arguments": {}}\n</tool_call>', id="name-not-a-string"),
    pytest.param("hermes", '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": 1}"}\n</tool_call>',
                 id="string-arguments-off-schema"),
    pytest.param("qwen3_xml", "<tool_call>\n<function=get_weather>\n<parameter=city>\nPar", id="xml-cut-off"),
    pytest.param("qwen3_xml", "<tool_call>\n<function=get_weather>\n<parameter=city>\n1\n</parameter>\n"
                 "<parameter=unit>\nkelvin\n</parameter>\n</function>\n</tool_call>", id="xml-off-schema"),
    pytest.param("qwen3_xml", "<tool_call>\n<function=get_weather>\nParis\n</function>\n</tool_call>",
                 id="xml-text-outside-parameters"),
    pytest.param("llama3", '{"name": "get_weather", "parameters": {"city": "Paris"}', id="llama3-cut-off"),
    pytest.param("llama3", '{"name": "get_weather", "parameters": [1]}', id="llama3-array-arguments"),
    pytest.param("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "x"}]',
                 id="mistral-one-bad-call-in-array"),
    pytest.param("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}', id="mistral-cut-off"),
    pytest.param("devstral", "[TOOL_CALLS]get_weather[ARGS]not json", id="devstral-args-not-json"),
    pytest.param("devstral", "[TOOL_CALLS]get_weather", id="devstral-cut-off"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "text", "content", "calls", "reasoning"), CASES)
def test_family_output_parsed(name, text, content, calls, reasoning):
    message, finish, deltas = parse_whole(rendered(name), text)
    assert message["role"] == "assistant" and message["refusal"] is None
    assert message["content"] == content
    assert calls_of(message) == calls
    assert message.get("reasoning_content") == reasoning
    assert finish == ("tool_calls" if calls else None)
    for call in message.get("tool_calls", []):
        assert call["type"] == "function" and isinstance(call["function"]["arguments"], str)
    assert_deltas_add_up(message, deltas)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
@pytest.mark.parametrize(("name", "text", "content", "calls", "reasoning"), CASES)
def test_streamed_in_random_pieces_equals_the_whole(data, name, text, content, calls, reasoning):
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(text) - 1)), max_size=len(text)), label="cuts"))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    message, _, deltas = parse_pieces(rendered(name), pieces)
    assert message["content"] == content
    assert calls_of(message) == calls
    assert message.get("reasoning_content") == reasoning
    assert_deltas_add_up(message, deltas)


@pytest.mark.parametrize(("name", "text"), MALFORMED)
def test_malformed_calls_come_back_as_text_under_auto(name, text):
    message, finish, deltas = parse_whole(rendered(name), text)
    assert "tool_calls" not in message, message
    assert finish is None
    assert message["content"] == text.strip(), "the model's text is returned as written"
    assert_deltas_add_up(message, deltas)


@settings(max_examples=20, deadline=None)
@given(pieces=st.lists(st.sampled_from([t.values[1] for t in MALFORMED if t.values[0] == "hermes"]), max_size=3))
def test_malformed_calls_streamed_stay_text(pieces):
    text = "\n".join(pieces)
    cut = [text[i : i + 5] for i in range(0, len(text), 5)]
    message, _, deltas = parse_pieces(rendered("hermes"), cut)
    assert "tool_calls" not in message
    assert_deltas_add_up(message, deltas)


def test_parallel_tool_calls_false_keeps_one_call():
    text = (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    )
    message, finish, deltas = parse_whole(rendered("hermes", parallel=False), text)
    assert calls_of(message) == [PARIS] and finish == "tool_calls"
    assert "Oslo" in message["content"], "the second call is not silently dropped: it stays as text"
    assert_deltas_add_up(message, deltas)


def test_tool_choice_none_parses_nothing():
    chat = template("hermes").render(ASK, tools=TOOLS, tool_choice="none", parallel_tool_calls=True)
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    message, finish, _ = parse_whole(chat, text)
    assert message["content"] == text and "tool_calls" not in message and finish is None


def test_reasoning_format_none_keeps_the_raw_text():
    text = "<think>hmm</think>The answer."
    message, _, deltas = parse_whole(rendered("qwen3", reasoning_format="none"), text)
    assert "reasoning_content" not in message
    assert message["content"] == text
    assert_deltas_add_up(message, deltas)


def test_call_ids_follow_the_family():
    hermes, _, _ = parse_whole(rendered("hermes"), '<tool_call>{"name": "do_it", "arguments": {}}</tool_call>')
    mistral, _, _ = parse_whole(rendered("mistral"), '[TOOL_CALLS][{"name": "do_it", "arguments": {}}]')
    assert hermes["tool_calls"][0]["id"].startswith("call_") and len(hermes["tool_calls"][0]["id"]) == 29
    mistral_id = mistral["tool_calls"][0]["id"]
    assert len(mistral_id) == 9 and mistral_id.isalnum(), "Mistral's templates refuse other ids"


def test_a_call_without_arguments_gets_an_empty_object():
    message, _, _ = parse_whole(rendered("hermes"), '<tool_call>{"name": "do_it"}</tool_call>')
    assert calls_of(message) == [("do_it", {})]


# ## Any arguments, in every family's syntax

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
WRITERS = {
    "hermes": lambda n, a: f'<tool_call>\n{{"name": "{n}", "arguments": {a}}}\n</tool_call>',
    "qwen3": lambda n, a: f'<tool_call>\n{{"name": "{n}", "arguments": {a}}}\n</tool_call>',
    "llama3": lambda n, a: f'{{"name": "{n}", "parameters": {a}}}',
    "mistral": lambda n, a: f'[TOOL_CALLS][{{"name": "{n}", "arguments": {a}}}]',
    "devstral": lambda n, a: f"[TOOL_CALLS]{n}[ARGS]{a}",
    "generic": lambda n, a: f'{{"name": "{n}", "arguments": {a}}}',
}


@settings(max_examples=30, deadline=None)
@given(
    family=st.sampled_from(sorted(WRITERS)),
    arguments=st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=4),
    ascii_only=st.booleans(),
    step=st.integers(1, 7),
)
def test_any_arguments_round_trip(family, arguments, ascii_only, step):
    written = json.dumps(arguments, ensure_ascii=ascii_only)
    text = WRITERS[family]("do_it", written)
    message, finish, deltas = parse_pieces(rendered(family), [text[i : i + step] for i in range(0, len(text), step)])
    assert calls_of(message) == [("do_it", arguments)], text
    assert message["tool_calls"][0]["function"]["arguments"] == written, "the arguments as the model wrote them"
    assert finish == "tool_calls"
    assert_deltas_add_up(message, deltas)


# ## Under a grammar, arguments stream as they are written


@pytest.mark.model  # llama-cpp-python builds the grammar (the serve extra)
def test_constrained_arguments_stream_in_pieces():
    chat = rendered("hermes", choice="required")
    assert chat.grammar is not None
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>'
    message, finish, deltas = parse_pieces(chat, [text[i : i + 4] for i in range(0, len(text), 4)])
    argument_deltas = [d for d in deltas if "tool_calls" in d and "id" not in d["tool_calls"][0]]
    assert len(argument_deltas) > 3, "arguments arrive in pieces while the model writes them"
    assert calls_of(message) == [("get_weather", {"city": "Paris", "unit": "c"})] and finish == "tool_calls"
    assert_deltas_add_up(message, deltas)


@pytest.mark.model  # llama-cpp-python builds the grammar (the serve extra)
def test_constrained_call_cut_by_max_tokens_keeps_what_was_streamed():
    chat = rendered("hermes", choice="required")
    message, finish, deltas = parse_pieces(chat, ['<tool_call>\n{"name": "get_weather", "arguments": {"ci'])
    assert message["tool_calls"][0]["function"]["arguments"] == '{"ci'
    assert finish is None, "the engine's own finish_reason (length) stands"
    assert_deltas_add_up(message, deltas)
