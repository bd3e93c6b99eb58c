"""Rendering chat in the model's own format: detection, tools in the prompt, tool-result turns, errors as 400s,
and grammars that make a real model write calls the parser reads back.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from deployer.runtime.chat.families import GENERIC, HAND_WRITTEN, hand_written
from deployer.runtime.chat.template import ChatTemplate
from deployer.runtime.errors import ApiError
from deployer.runtime.protocols.checks import normalize_chat
from tests.llamaparts import LLAMA_PARTS
from tests.test_chat_parse import ASK, TOOLS, WEATHER, template

TOOL_TEMPLATES = ["hermes", "qwen3", "qwen3_xml", "llama3", "mistral", "devstral", "generic"]


@pytest.mark.parametrize(
    ("name", "family", "call", "thinks"),
    [
        pytest.param("hermes", "learned:json", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                     "</tool_call>", False, id="hermes"),
        pytest.param("qwen3", "learned:json", '\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
                     "\n</tool_call>", True, id="qwen3-hermes-with-think"),
        pytest.param("qwen3_xml", "learned:tagged", "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n"
                     "</parameter>\n</function>\n</tool_call>", False, id="qwen3-coder-xml"),
        pytest.param("llama3", "learned:json", '{"name": "get_weather", "parameters": {"city": "Paris"}}', False,
                     id="llama3"),
        pytest.param("mistral", "learned:json", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]',
                     False, id="mistral-nemo"),
        pytest.param("devstral", "learned:name-json", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', False,
                     id="devstral"),
        pytest.param("generic", "learned:json", '{"name": "get_weather", "arguments": {"city": "Paris"}}', False,
                     id="generic-json"),
        pytest.param("deepseek_r1", "no-tools", None, True, id="r1-distill"),
        pytest.param("notools", "no-tools", None, False, id="gemma-like"),
    ],
)  # fmt: skip
def test_syntax_learned_from_the_template(name, family, call, thinks):
    from deployer.runtime.chat.families import write_calls

    loaded = template(name)
    assert (loaded.family, loaded.supports_tools, loaded.thinks) == (family, call is not None, thinks)
    if call is not None:
        assert write_calls(loaded.syntax, [("get_weather", {"city": "Paris"})]) == call


def test_hand_written_syntaxes_and_the_generic_fallback():
    assert hand_written("<|channel|> ... <|message|> ... <|call|>").layout == "harmony"
    assert hand_written("{{ messages }}") is None
    assert len({e.syntax.origin for e in HAND_WRITTEN}) == len(HAND_WRITTEN) and all(e.why for e in HAND_WRITTEN)
    # shows tools, but an earlier call renders as nothing: nothing to learn from, JSON at the start
    shows = ChatTemplate.load(
        **LLAMA_PARTS,
        template="{% for t in tools or [] %}{{ t.function.name }}{% endfor %}{% for m in messages %}{{ m.content }}"
        "{% endfor %}",
        chat_format=None,
        bos_token="",
        eos_token="",
    )
    assert shows.syntax == GENERIC and "without its name" in shows.learned_error


@pytest.mark.parametrize("name", TOOL_TEMPLATES)
def test_tool_definitions_reach_the_prompt(name):
    chat = template(name).render(ASK, tools=TOOLS, tool_choice="auto", parallel_tool_calls=True)
    assert "get_weather" in chat.prompt and "do_it" in chat.prompt
    parameter = {"generic": None, "qwen3_xml": "<name>city</name>"}.get(name, '"city"')
    if parameter:  # the generic fixture lists names and descriptions only
        assert parameter in chat.prompt, "the parameters schema is in the prompt"
    assert "The weather in a city" in chat.prompt
    assert "Paris" in chat.prompt and chat.grammar is None


@pytest.mark.parametrize("name", TOOL_TEMPLATES)
def test_tool_choice_none_leaves_tools_out(name):
    chat = template(name).render(ASK, tools=TOOLS, tool_choice="none", parallel_tool_calls=True)
    assert "get_weather" not in chat.prompt and chat.grammar is None


def _conversation(call_id: str) -> list[dict]:
    body = {
        "messages": [
            *ASK,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call_id, "content": "18 degrees and sunny"},
        ],
        "tools": TOOLS,
    }
    return normalize_chat(body).params["messages"]


@pytest.mark.parametrize("name", TOOL_TEMPLATES)
def test_a_tool_result_conversation_renders(name):
    messages = _conversation("abcDEF123")
    chat = template(name).render(messages, tools=TOOLS, tool_choice="auto", parallel_tool_calls=True)
    assert "18 degrees and sunny" in chat.prompt
    written = {"generic": None, "qwen3_xml": "<parameter=city>\nParis\n</parameter>"}.get(name, '{"city": "Paris"}')
    if written:
        assert written in chat.prompt, "the earlier call's arguments are written back as an object"


def test_a_template_rule_becomes_a_400_with_its_message():
    with pytest.raises(ApiError) as caught:
        template("mistral").render(_conversation("call_1"), tools=TOOLS, tool_choice="auto", parallel_tool_calls=True)
    assert caught.value.status == 400
    assert "Tool call IDs should be alphanumeric strings with length 9!" in caught.value.message


def test_a_broken_template_is_a_400_not_a_crash():
    broken = ChatTemplate.load(
        **LLAMA_PARTS, template="{{ messages[0].content + 1 }}", chat_format=None, bos_token="<s>", eos_token="</s>"
    )
    with pytest.raises(ApiError) as caught:
        broken.render(ASK)
    assert caught.value.status == 400 and "TypeError" in caught.value.message


def test_a_template_that_does_not_compile_fails_at_load():
    with pytest.raises(ValueError, match="not valid Jinja"):
        ChatTemplate.load(**LLAMA_PARTS, template="{% for %}", chat_format=None, bos_token="", eos_token="")


def test_the_sandbox_holds():
    sneaky = ChatTemplate.load(
        **LLAMA_PARTS, template="{{ messages.__class__.__mro__ }}", chat_format=None, bos_token="", eos_token=""
    )
    with pytest.raises(ApiError):
        sneaky.render(ASK)


@pytest.mark.parametrize("name", ["notools", "deepseek_r1"])
def test_a_template_without_tools_refuses_them(name):
    with pytest.raises(ApiError) as caught:
        template(name).render(ASK, tools=TOOLS, tool_choice="auto", parallel_tool_calls=True)
    assert caught.value.status == 400 and caught.value.code == "tools_not_supported"
    assert "no place for tools" in caught.value.message
    assert template(name).render(ASK, tools=TOOLS, tool_choice="none", parallel_tool_calls=True).prompt


@pytest.mark.model
def test_a_chat_format_refuses_tools_and_formats_chat():
    gemma = ChatTemplate.load(**LLAMA_PARTS, template=None, chat_format="gemma", bos_token="<bos>", eos_token="<eos>")
    with pytest.raises(ApiError) as caught:
        gemma.render(ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=True)
    assert caught.value.code == "tools_not_supported" and "chat_format 'gemma'" in caught.value.message
    messages = normalize_chat({"messages": [*ASK, {"role": "assistant"}, {"role": "user", "content": "And?"}]})
    chat = gemma.render(messages.params["messages"])
    assert chat.prompt.endswith("<start_of_turn>model\n") and "And?" in chat.prompt
    assert chat.stop == ("<end_of_turn>\n",) and chat.add_bos


def test_no_template_and_no_chat_format_is_none():
    assert ChatTemplate.load(**LLAMA_PARTS, template=None, chat_format=None, bos_token="<s>", eos_token="</s>") is None


@pytest.mark.parametrize("name", [*TOOL_TEMPLATES, "deepseek_r1", "notools"])
@pytest.mark.parametrize(
    "history",
    [
        pytest.param({"role": "assistant"}, id="no-content"),
        pytest.param({"role": "assistant", "content": None}, id="null-content"),
        pytest.param({"role": "assistant", "refusal": "I can't help with that."}, id="refusal"),
        pytest.param({"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]}, id="refusal-part"),
        pytest.param({"role": "assistant", "content": "Hi", "name": "bot"}, id="named"),
    ],
)
def test_assistant_turns_openai_allows_render(name, history):
    messages = normalize_chat({"messages": [*ASK, history, {"role": "user", "content": "Again"}]}).params["messages"]
    assert "Again" in template(name).render(messages).prompt


def test_prompt_opening_think_is_seen():
    chat = template("deepseek_r1").render(ASK)
    assert chat.prompt.endswith("<think>\n") and chat.spec.think_open
    assert chat.parser().feed("reasoning</think>answer") == [{"reasoning_content": "reasoning"}, {"content": "answer"}]


def test_bos_and_stop():
    llama = template("llama3").render(ASK)
    assert llama.prompt.startswith("<s>") and not llama.add_bos, "the template wrote BOS itself"
    hermes = template("hermes").render(ASK)
    assert hermes.add_bos and "</s>" in hermes.stop
    assert "<|eom_id|>" in template("llama3").render(ASK, tools=TOOLS, tool_choice="auto").stop


def test_named_choice_must_name_a_tool():
    with pytest.raises(ApiError) as caught:
        template("hermes").render(ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
    assert caught.value.status == 400 and "nope" in caught.value.message


@pytest.mark.model  # llama-cpp-python builds the grammar (the serve extra)
def test_named_choice_shows_every_tool_but_forces_one():
    choice = {"type": "function", "function": {"name": "get_weather"}}
    chat = template("hermes").render(ASK, tools=TOOLS, tool_choice=choice, parallel_tool_calls=True)
    assert "do_it" in chat.prompt and chat.grammar is not None
    assert '\\"do_it\\"' not in chat.grammar and '\\"get_weather\\"' in chat.grammar


@pytest.mark.model  # llama-cpp-python builds the grammar (the serve extra)
def test_unconvertible_schema_is_a_400():
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "$ref": "https://x/y"}}}
    with pytest.raises(ApiError) as caught:
        template("hermes").render(ASK, tools=[tool], tool_choice="required", parallel_tool_calls=True)
    assert caught.value.status == 400 and "'f'" in caught.value.message


# ## Grammars: a real (tiny, random) model writes calls that parse back and validate

# schemas a random-weight model finishes quickly: enums, booleans and small integers
FORECAST = {
    "type": "function",
    "function": {
        "name": "forecast",
        "parameters": {
            "type": "object",
            "properties": {"unit": {"enum": ["c", "f"]}, "tomorrow": {"type": "boolean"}},
            "required": ["unit", "tomorrow"],
            "additionalProperties": False,
        },
    },
}
ALARM = {
    "type": "function",
    "function": {
        "name": "alarm",
        "parameters": {
            "type": "object",
            "properties": {"on": {"type": "boolean"}},
            "required": ["on"],
            "additionalProperties": False,
        },
    },
}
SMALL_TOOLS = [FORECAST, ALARM]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    import llama_cpp

    from tests import ggufgen

    path = ggufgen.write_gguf(tmp_path_factory.mktemp("chat") / "tiny.gguf", ggufgen.TINY_LLAMA)
    llama = llama_cpp.Llama(str(path), n_ctx=4096, n_batch=512, verbose=False, seed=7)
    yield llama
    llama.close()


@pytest.mark.model
@pytest.mark.parametrize("name", ["hermes", "qwen3_xml", "llama3", "mistral", "devstral", "generic", "qwen3"])
@pytest.mark.parametrize(
    ("choice", "parallel"),
    [
        pytest.param("required", True, id="required"),
        pytest.param("required", False, id="required-one"),
        pytest.param({"type": "function", "function": {"name": "alarm"}}, True, id="named"),
    ],
)
def test_grammar_output_parses_back(tiny_llama, name, choice, parallel):
    from llama_cpp.llama_grammar import LlamaGrammar

    chat = template(name).render(ASK, tools=SMALL_TOOLS, tool_choice=choice, parallel_tool_calls=parallel)
    assert chat.grammar is not None
    # the think block of a thinking template is left to the model; force its end so that a random model gets there
    bias = {tiny_llama.tokenize(b"<", add_bos=False)[-1]: 8.0} if template(name).thinks else None
    out = tiny_llama.create_completion(
        tiny_llama.tokenize(chat.prompt.encode(), add_bos=chat.add_bos, special=True),
        max_tokens=1000,  # a random model stops where the grammar lets it, at random: room for many calls
        temperature=1.0,
        seed=3,
        grammar=LlamaGrammar.from_string(chat.grammar, verbose=False),
        logit_bias=bias,
    )
    text = out["choices"][0]["text"]
    parser = chat.parser()
    parser.feed(text)
    _, message, finish = parser.finish()
    calls = message.get("tool_calls", [])
    assert calls and finish == "tool_calls", f"{name}: {text!r}"
    if not parallel or isinstance(choice, dict):
        assert len(calls) == 1, text
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in SMALL_TOOLS}
    for call in calls:
        if isinstance(choice, dict):
            assert call["function"]["name"] == "alarm"
        jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]])


@pytest.mark.model
@pytest.mark.parametrize("name", ["hermes", "qwen3", "qwen3_xml", "llama3", "mistral", "devstral", "generic"])
def test_grammars_parse_in_llama_cpp(tiny_llama, name):
    import llama_cpp

    loaded = template(name)
    tools = [WEATHER, *SMALL_TOOLS]
    for parallel in (True, False):
        chat = loaded.render(ASK, tools=tools, tool_choice="required", parallel_tool_calls=parallel)
        sampler = llama_cpp.llama_sampler_init_grammar(tiny_llama._model.vocab, chat.grammar.encode(), b"root")
        assert sampler, chat.grammar
        llama_cpp.llama_sampler_free(sampler)


@pytest.mark.model  # llama-cpp-python builds the grammar (the serve extra)
def test_family_grammars_for_a_thinking_template_allow_the_think_block():
    chat = template("qwen3").render(ASK, tools=[WEATHER], tool_choice="required", parallel_tool_calls=True)
    assert '"<think>"' in chat.grammar.splitlines()[-1]
    forced = ChatTemplate.load(
        **LLAMA_PARTS,
        template=Path(__file__).parent.joinpath("chat_templates/qwen3.jinja").read_text() + "<think>\n",
        chat_format=None,
        bos_token="<s>",
        eos_token="</s>",
    )
    chat = forced.render(ASK, tools=[WEATHER], tool_choice="required", parallel_tool_calls=True)
    assert chat.spec.think_open and chat.grammar.splitlines()[-1].startswith("root ::= [^<]*")


def test_marker_texts_are_preserved_for_the_engine():
    assert template("devstral").render(ASK, tools=TOOLS).preserved == ("[TOOL_CALLS]", "[ARGS]")
    assert template("qwen3").render(ASK, tools=TOOLS).preserved == (
        "<tool_call>",
        "</tool_call>",
        "<think>",
        "</think>",
    )
    assert template("llama3").render(ASK, tools=TOOLS).preserved == ("<|python_tag|>",)
    assert template("hermes").render(ASK).preserved == ()


def test_the_chat_module_imports_neither_llama_cpp_nor_jinja():
    from tests.test_imports import _modules_after

    loaded = _modules_after("import deployer.runtime.chat.template")
    assert not {"llama_cpp", "jinja2", "jsonschema"} & loaded


@pytest.mark.parametrize("value", ["auto", "none"])
def test_the_manifest_switch_reaches_the_runtime(value):
    from deployer.loading import parse_manifest
    from deployer.runtime import runtime_config

    text = f'repo = "org/m-GGUF"\nfile = "m-Q8_0.gguf"\nquant = "Q8_0"\ncontext = 4096\n[server]\nreasoning_format = "{value}"\n'
    assert runtime_config(parse_manifest(text.encode(), "manifests/m.toml"), "/m.gguf").reasoning_format == value


def test_an_unknown_reasoning_format_is_a_clear_error():
    from deployer.errors import GgufDeployError
    from deployer.loading import parse_manifest

    text = (
        b'repo = "org/m-GGUF"\nfile = "m-Q8_0.gguf"\nquant = "Q8_0"\ncontext = 4096\n[server]\nreasoning_format = "x"\n'
    )
    with pytest.raises(GgufDeployError, match="reasoning_format"):
        parse_manifest(text, "manifests/m.toml")


def test_generation_blocks_render_their_body():
    marked = ChatTemplate.load(
        **LLAMA_PARTS,
        template="{% for m in messages %}{% generation %}[{{ m.content }}]{% endgeneration %}{% endfor %}",
        chat_format=None,
        bos_token="",
        eos_token="",
    )
    assert marked.render(ASK).prompt == f"[{ASK[0]['content']}]"


def test_templates_that_want_string_arguments_get_them():
    stringly = ChatTemplate.load(
        **LLAMA_PARTS,
        template="{% for m in messages %}{% for c in m.tool_calls or [] %}{{ 'args=' + c.function.arguments }}"
        "{% endfor %}{% endfor %}",
        chat_format=None,
        bos_token="",
        eos_token="",
    )
    messages = _conversation("abcDEF123")
    assert stringly.render(messages).prompt == 'args={"city": "Paris"}'


@pytest.mark.parametrize("value", [True, False])
def test_the_manifest_thinking_default_reaches_the_template(value):
    from deployer.loading import parse_manifest
    from deployer.runtime import runtime_config

    text = f'repo = "org/m-GGUF"\nfile = "m-Q8_0.gguf"\nquant = "Q8_0"\ncontext = 4096\n[server]\nthinking = {str(value).lower()}\n'
    config = runtime_config(parse_manifest(text.encode(), "manifests/m.toml"), "/m.gguf")
    assert config.thinking is value
    qwen3 = (Path(__file__).parent / "llama_templates" / "Qwen-Qwen3-0.6B.jinja").read_text(encoding="utf-8")
    chat = ChatTemplate.load(
        **LLAMA_PARTS, template=qwen3, chat_format=None, bos_token="", eos_token="", thinking=config.thinking
    )
    closed = chat.render(ASK).prompt.endswith("<think>\n\n</think>\n\n")
    assert closed is not value, "enable_thinking false closes the think block in the prompt"
    overridden = chat.render(ASK, variables={"enable_thinking": not value}).prompt
    assert overridden.endswith("<think>\n\n</think>\n\n") is value, "a request's own variable wins"


def test_a_thinking_default_that_is_not_a_boolean_is_a_clear_error():
    from deployer.errors import GgufDeployError
    from deployer.loading import parse_manifest

    text = b'repo = "org/m-GGUF"\nfile = "m-Q8_0.gguf"\nquant = "Q8_0"\ncontext = 4096\n[server]\nthinking = "yes"\n'
    with pytest.raises(GgufDeployError, match="thinking"):
        parse_manifest(text, "manifests/m.toml")


def test_the_sandbox_lets_templates_build_lists_but_not_reach_outside():
    builds = ChatTemplate.load(
        **LLAMA_PARTS,
        template="{% set seen = [] %}{% for m in messages %}{% set _ = seen.append(m.role) %}{% endfor %}"
        "{{ seen | join(',') }}",
        chat_format=None,
        bos_token="",
        eos_token="",
    )
    assert builds.render(ASK).prompt == "user", "Kimi K2's tool-result turn appends to a list of its own"
    for sneaky in (
        "{{ cycler.__init__.__globals__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ raise_exception.__globals__ }}",
        "{% include '/etc/passwd' %}",
        "{{ messages.__class__ }}",
    ):
        loaded = ChatTemplate.load(**LLAMA_PARTS, template=sneaky, chat_format=None, bos_token="", eos_token="")
        try:
            leaked = loaded.render(ASK).prompt  # an unsafe attribute reads as undefined: nothing
        except ApiError as refused:
            assert refused.status == 400, sneaky
        else:
            assert leaked == "", (sneaky, leaked)


def test_earlier_reasoning_reaches_a_template_that_reads_it_only_as_a_thinking_part():
    from tests.test_chat_templates import loaded

    history = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello", "reasoning_content": "PONDER"},
        {"role": "user", "content": "Again"},
    ]
    ministral = loaded("mistralai-Ministral-3-14B-Reasoning-2512").render(history)
    assert "[INST]Hi[/INST][THINK]PONDER[/THINK]Hello</s>[INST]Again" in ministral.prompt, ministral.prompt[-200:]
    # a template that prints a content list as text, or reads reasoning_content itself, gets no parts
    for name in ("LFM2.5-8B-A1B", "Qwen3.5-4B"):
        prompt = loaded(name).render(history).prompt
        assert "'type'" not in prompt and '"type"' not in prompt, (name, prompt[-200:])
