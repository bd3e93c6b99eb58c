"""Every chat template of llama.cpp's ``models/templates`` (pinned 0.3.36 release, tests/llama_templates/):
the syntax learned from it writes calls the template itself writes, which parse back whole and streamed;
tools and a tool-result turn render; a template that cannot show tools refuses them with a 400.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from functools import cache
from pathlib import Path

import pytest

from deployer.runtime.chat.families import write_calls
from deployer.runtime.chat.template import ChatTemplate
from deployer.runtime.errors import ApiError
from deployer.runtime.protocols.checks import normalize_chat
from tests.llamaparts import LLAMA_PARTS
from tests.test_chat_parse import TOOLS, assert_deltas_add_up, calls_of, parse_pieces, parse_whole

LLAMA = Path(__file__).parent / "llama_templates"
NAMES = sorted(p.stem for p in LLAMA.glob("*.jinja"))
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
# The templates with no place for tools: they neither show tool definitions nor write a call back.
NO_TOOLS = {
    "HuggingFaceTB-SmolLM3-3B",  # this (Unsloth) version has no tools at all
    "deepseek-ai-DeepSeek-R1-Distill-Llama-8B",
    "google-gemma-2-2b-it",
    "llama-cpp-rwkv-world",
    "microsoft-Phi-3.5-mini-instruct",
}
# Templates whose syntax the learner gets wrong, and why (each still answers: its calls come back as text).
KNOWN_WRONG: dict[str, str] = {}
PARIS = ("get_weather", {"city": "Paris"})
DO_IT = ("do_it", {"n": 42, "tags": ["a", "b"], "note": "two\nlines"})


@cache
def loaded(name: str) -> ChatTemplate:
    chat = ChatTemplate.load(
        **LLAMA_PARTS,
        template=(LLAMA / f"{name}.jinja").read_text(encoding="utf-8"),
        chat_format=None,
        bos_token="<s>",
        eos_token="</s>",
    )
    assert chat is not None
    return chat


def test_the_templates_are_all_there():
    assert len(NAMES) == 70
    assert {n for n in NAMES if not loaded(n).supports_tools} == NO_TOOLS


def _squeezed(text: str) -> str:
    return re.sub(r"\s+", "", text)


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.xfail(reason=KNOWN_WRONG[n], strict=True)) if n in KNOWN_WRONG else n
     for n in NAMES],
)  # fmt: skip
def test_a_template(name):
    chat = loaded(name)
    if not chat.supports_tools:
        with pytest.raises(ApiError) as caught:
            chat.render(ASK, tools=TOOLS, tool_choice="required")
        assert caught.value.status == 400 and caught.value.code == "tools_not_supported"
        assert chat.render(ASK, tools=TOOLS, tool_choice="none").prompt
        return
    syntax = chat.syntax
    assert syntax is not None
    rendered = chat.render(ASK, tools=TOOLS, tool_choice="auto")
    assert "get_weather" in rendered.prompt and "do_it" in rendered.prompt
    # the template's own call is what the learned syntax writes
    call = {
        "id": "call00001",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    history = normalize_chat(
        {
            "messages": [
                *ASK,
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call00001", "content": "18 degrees"},
            ]
        }
    )
    turn = chat.render(history.params["messages"], tools=TOOLS, tool_choice="auto")
    assert "18 degrees" in turn.prompt, "a tool-result turn renders"
    if syntax.origin == "learned":  # the template's own call parses back (outside any reasoning)
        result = turn.prompt.index("18 degrees")
        if syntax.trigger:
            start = turn.prompt.rindex(syntax.trigger, 0, result)
        elif syntax.layout == "json":
            start = turn.prompt.rindex("{", 0, turn.prompt.rindex('"get_weather"', 0, result))
        else:  # the prompt opens the block (Functionary v3.2's >>>): the name comes first
            start = turn.prompt.rindex("get_weather", 0, result)
        outside = replace(rendered, spec=replace(rendered.spec, think_open=False))
        own, _, _ = parse_whole(outside, turn.prompt[start:result])
        assert calls_of(own)[:1] == [PARIS], (turn.prompt[start:result], own)
    # what the syntax writes parses back, whole and streamed, with reasoning before it
    text = write_calls(syntax, [PARIS, DO_IT]).replace("\x1f", "abcDEF123")
    if chat.thinks and not rendered.spec.think_open and syntax.reasoning_open and syntax.layout != "harmony":
        text = f"{syntax.reasoning_open}Paris first.{syntax.reasoning_close}\n" + text
    elif rendered.spec.think_open:
        text = f"Paris first.{syntax.reasoning_close}\n" + text
    elif syntax.layout == "harmony":
        text = f"<|channel|>analysis<|message|>Paris first.<|end|><|start|>assistant{text}"
    message, finish, deltas = parse_whole(rendered, text)
    assert calls_of(message) == [PARIS, DO_IT], (text, message)
    assert finish == "tool_calls" and not message["content"], message
    if chat.thinks:
        assert message.get("reasoning_content") == "Paris first.", message
    assert_deltas_add_up(message, deltas)
    streamed, _, deltas = parse_pieces(rendered, list(text))
    assert calls_of(streamed) == [PARIS, DO_IT] and streamed.get("content") == message.get("content")
    assert_deltas_add_up(streamed, deltas)
    assert json.loads(streamed["tool_calls"][1]["function"]["arguments"]) == DO_IT[1]


NESTED = ("do_it", {"n": 42, "tags": ["a", ["b"]], "point": {"x": 1.5, "label": "p"}, "note": "two\nlines"})


@pytest.mark.parametrize(
    "name", [n for n in NAMES if loaded(n).syntax is not None and loaded(n).syntax.nested_lead is not None]
)
def test_objects_and_arrays_written_as_elements_parse_back(name):
    """A template that writes objects and arrays as nested elements (MiniMax M3's <tags><item>a</item></tags>):
    its own call with such arguments parses back to the same values."""
    chat = loaded(name)
    call = {"id": "call00001", "type": "function", "function": {"name": NESTED[0], "arguments": json.dumps(NESTED[1])}}
    history = normalize_chat({"messages": [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
                                           {"role": "tool", "tool_call_id": "call00001", "content": "done"}]})  # fmt: skip
    prompt = chat.render(history.params["messages"], tools=TOOLS, tool_choice="auto").prompt
    assert chat.syntax is not None and "<item>" in prompt, "the template writes the array as elements"
    result = prompt.index("done")
    text = prompt[prompt.rindex(chat.syntax.trigger, 0, result) : result]
    rendered = chat.render(ASK, tools=TOOLS, tool_choice="auto")
    message, _, _ = parse_whole(replace(rendered, spec=replace(rendered.spec, think_open=False)), text)
    assert calls_of(message)[:1] == [NESTED], (text, message)


# ## Grammars: a tiny random model under each template's grammar writes calls that parse back

SMALL = [
    {
        "type": "function",
        "function": {
            "name": "alarm",
            "parameters": {
                "type": "object",
                "properties": {"on": {"type": "boolean"}, "label": {"type": "string", "maxLength": 8}},
                "required": ["on"],
                "additionalProperties": False,
            },
        },
    },
    {"type": "function", "function": {"name": "stop_all", "parameters": {"type": "object", "properties": {}}}},
]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    import llama_cpp

    from tests import ggufgen

    path = ggufgen.write_gguf(tmp_path_factory.mktemp("templates") / "tiny.gguf", ggufgen.TINY_LLAMA)
    llama = llama_cpp.Llama(str(path), n_ctx=4096, n_batch=512, verbose=False, seed=7)
    yield llama
    llama.close()


@pytest.mark.model
@pytest.mark.parametrize("name", [n for n in NAMES if n not in NO_TOOLS])
def test_required_and_named_grammars_write_calls_that_parse(tiny_llama, name):
    from llama_cpp.llama_grammar import LlamaGrammar

    chat = loaded(name)
    for choice, parallel in (("required", False), ({"type": "function", "function": {"name": "alarm"}}, False)):
        rendered = chat.render(ASK, tools=SMALL, tool_choice=choice, parallel_tool_calls=parallel)
        assert rendered.grammar is not None
        close = rendered.spec.reasoning[1][:1]  # a random model must be nudged to end its reasoning
        bias = {tiny_llama.tokenize(close.encode(), add_bos=False)[-1]: 8.0} if chat.thinks and close else None
        out = tiny_llama.create_completion(
            tiny_llama.tokenize(rendered.prompt.encode(), add_bos=rendered.add_bos, special=True)[-3000:],
            max_tokens=600,
            temperature=1.0,
            seed=3,
            grammar=LlamaGrammar.from_string(rendered.grammar, verbose=False),
            logit_bias=bias,
        )
        text = out["choices"][0]["text"]
        message, finish, deltas = parse_whole(rendered, text)
        calls = message.get("tool_calls", [])
        assert calls and finish == "tool_calls", (choice, text, rendered.grammar)
        assert isinstance(choice, str) or [c["function"]["name"] for c in calls] == ["alarm"], text
        for call in calls:
            json.loads(call["function"]["arguments"])
        streamed, _, deltas = parse_pieces(rendered, list(text))
        assert streamed.get("tool_calls") and len(streamed["tool_calls"]) == len(calls)
        assert_deltas_add_up(streamed, deltas)


# ## The README's table: what is learned from each template, generated here

TABLE_START, TABLE_END = "<!-- learned-syntax:start -->", "<!-- learned-syntax:end -->"


def readme_table() -> str:
    """The README's table of every template's learned syntax (``python -m tests.test_chat_templates`` prints it)."""
    rows = ["| template | what the server learns (one call to `get_weather(city=\"Paris\")`, reasoning markers) |",
            "|---|---|"]  # fmt: skip
    for name in NAMES:
        summary = loaded(name).summary().replace("|", "\\|")
        wrong = f" — **wrong**: {KNOWN_WRONG[name]}" if name in KNOWN_WRONG else ""
        rows.append(f"| `{name}` | ```` {summary} ````{wrong} |")  # four backticks: summaries may hold three
    return "\n".join(rows)


def test_the_readme_table_is_current():
    from tests.conftest import ROOT

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split(TABLE_START)[1].split(TABLE_END)[0].strip()
    assert block == readme_table(), "README's learned-syntax table is stale: run `python -m tests.test_chat_templates`"


if __name__ == "__main__":
    print(readme_table())


# ## The hand-written table: only what rendering cannot reveal, and in agreement with the learner


def test_hand_written_entries_cover_what_learning_cannot_and_agree_where_it_can():
    from deployer.runtime.chat.families import HAND_WRITTEN
    from deployer.runtime.chat.learn import NotLearned, learn

    for entry in HAND_WRITTEN:
        matching = [
            n for n in NAMES if all(s in (LLAMA / f"{n}.jinja").read_text(encoding="utf-8") for s in entry.detect)
        ]
        assert matching, f"{entry.syntax.origin}: no template in tests/llama_templates/ to test it on"
        for name in matching:
            chat = loaded(name)
            assert chat.syntax is not None and chat.syntax.origin == entry.syntax.origin, name
            try:
                learned = learn(lambda m, gen, v, chat=chat: chat._probe(m, gen, v))
            except NotLearned:
                continue  # nothing learned to compare: the entry is what makes tools work
            # both apply: a call as the learned syntax writes it reads the same under the hand-written one
            rendered = chat.render(ASK, tools=TOOLS, tool_choice="auto")
            text = write_calls(learned, [PARIS])
            message, _, _ = parse_whole(rendered, text)
            assert calls_of(message) == [PARIS], (name, text, message)
