"""Each family's *native* output (as llama.cpp's tests/test-chat.cpp writes it, pinned 0.3.36 release) read
back through the syntax learned from (or hand-written for) its real template: calls, reasoning and text,
whole and streamed in pieces.
"""

from __future__ import annotations

import json

import pytest

from tests.test_chat_parse import assert_deltas_add_up, parse_pieces, parse_whole
from tests.test_chat_templates import loaded

SPECIAL = {
    "type": "function",
    "function": {
        "name": "special_function",
        "description": "I'm special",
        "parameters": {"type": "object", "properties": {"arg1": {"type": "integer"}}, "required": ["arg1"]},
    },
}
GET_TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the time",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
EMPTY = {"type": "function", "function": {"name": "empty_args", "parameters": {"type": "object", "properties": {}}}}


def _tool(name: str, properties: dict) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": properties}}}


NUMBER, INTEGER = {"type": "number"}, {"type": "integer"}
TYPED = [
    _tool("magic_int", {"ref": INTEGER, "name": {"type": "string"}}),
    _tool("amount", {"orig": NUMBER}),
    _tool("toggle", {"enabled": {"type": "boolean"}}),
    _tool("imaginary_number", {"number": {"type": "object", "properties": {"real": NUMBER, "imaginary": NUMBER}}}),
    _tool("nested_args", {"tags": {"type": "array", "items": {"type": "string"}},
                          "entries": {"type": "array", "items": {"type": "object", "properties": {
                              "id": INTEGER, "label": {"type": "string"}}}}}),
]  # fmt: skip
TOOLS = [SPECIAL, GET_TIME, EMPTY, *TYPED]
CALL = [("special_function", {"arg1": 1})]
TOKYO = [("get_time", {"city": "Tokyo"})]
THOUGHT = "I'm\nthinking"
OFF, ON = {"enable_thinking": False}, {"enable_thinking": True}

# MiniMax M3: each argument is written as <KEY>value</KEY> (the key is the tag), every marker after ]<]minimax[>[
NS = "]<]minimax[>["
M3_BLOCK = NS + "<tool_call>\n{}" + NS + "</tool_call>"
M3_TOKYO = f'{NS}<invoke name="get_time">{NS}<city>Tokyo{NS}</city>{NS}</invoke>\n'
M3_SPECIAL = f'{NS}<invoke name="special_function">{NS}<arg1>1{NS}</arg1>{NS}</invoke>\n'
M3_EMPTY = f'{NS}<invoke name="empty_args">{NS}</invoke>\n'


def m3_invoke(name: str, *tags: str) -> str:
    return f'{NS}<invoke name="{name}">' + "".join(NS + tag for tag in tags) + f"{NS}</invoke>\n"


# Ministral 3 Reasoning: its template writes reasoning only from a content part of type "thinking"
MINISTRAL = "mistralai-Ministral-3-14B-Reasoning-2512"

# (template, variables, native output, content, calls, reasoning)
CASES = [
    pytest.param("openai-gpt-oss-120b", {}, "<|channel|>analysis<|message|>I'm\nthinking<|end|><|start|>assistant"
                 "<|channel|>final<|message|>Hello, world!\nWhat's up?", "Hello, world!\nWhat's up?", [], THOUGHT,
                 id="gpt-oss-analysis-then-final"),
    pytest.param("openai-gpt-oss-120b", {}, "<|channel|>analysis<|message|>I'm\nthinking<|end|><|start|>assistant"
                 '<|channel|>commentary to=functions.special_function <|constrain|>json<|message|>{"arg1": 1}<|call|>',
                 None, CALL, THOUGHT, id="gpt-oss-call"),
    pytest.param("openai-gpt-oss-120b", {}, '<|channel|>analysis to=functions.special_function<|message|>{"arg1": 1}',
                 None, CALL, None, id="gpt-oss-recipient-in-channel-header"),
    pytest.param("openai-gpt-oss-120b", {}, ' to=functions.special_function<|channel|>analysis<|message|>{"arg1": 1}',
                 None, CALL, None, id="gpt-oss-recipient-in-role-header"),
    pytest.param("meetkai-functionary-medium-v3.2", {}, 'special_function\n{"arg1": 1}', None, CALL, None,
                 id="functionary-v3.2-prompt-opened"),
    pytest.param("meetkai-functionary-medium-v3.2", {}, 'get_time\n{"city": "Tokyo"}>>>special_function\n{"arg1": 1}',
                 None, [*TOKYO, *CALL], None, id="functionary-v3.2-two-calls"),
    pytest.param("deepseek-ai-DeepSeek-V3.1", OFF, "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_time<｜tool▁sep｜>"
                 '{"city": "Tokyo"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>', None, TOKYO, None, id="deepseek-v3.1"),
    pytest.param("deepseek-ai-DeepSeek-V3.1", ON, "REASONING</think><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_time"
                 '<｜tool▁sep｜>{"city": "Tokyo"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>', None, TOKYO, "REASONING",
                 id="deepseek-v3.1-thinking"),
    pytest.param("deepseek-ai-DeepSeek-V3.2", ON, 'Let me check the time</think>\n\n<｜DSML｜function_calls>\n'
                 '<｜DSML｜invoke name="get_time">\n<｜DSML｜parameter name="city" string="true">Tokyo</｜DSML｜parameter>'
                 "\n</｜DSML｜invoke>\n</｜DSML｜function_calls>", None, TOKYO, "Let me check the time",
                 id="deepseek-v3.2"),
    pytest.param("deepseek-ai-DeepSeek-V3.2", OFF, '<｜DSML｜function_calls>\n<｜DSML｜invoke name="special_function">\n'
                 '<｜DSML｜parameter name="arg1" string="false">1</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
                 "</｜DSML｜function_calls>", None, CALL, None, id="deepseek-v3.2-integer"),
    pytest.param("GLM-4.6", OFF, "<tool_call>special_function\n<arg_key>arg1</arg_key>\n<arg_value>1</arg_value>\n"
                 "</tool_call>", None, CALL, None, id="glm-4.6"),
    pytest.param("GLM-4.7-Flash", ON, "I'm\nthinking</think><tool_call>special_function<arg_key>arg1</arg_key>"
                 "<arg_value>1</arg_value></tool_call>", None, CALL, THOUGHT, id="glm-4.7-thinking"),
    pytest.param("GLM-4.7-Flash", OFF, "<tool_call>special_function<arg_key>arg1</arg_key><arg_value>1</arg_value>"
                 "</tool_call>", None, CALL, None, id="glm-4.7"),
    pytest.param("moonshotai-Kimi-K2", {}, "<|tool_calls_section_begin|><|tool_call_begin|>functions.special_function:0"
                 '<|tool_call_argument_begin|>{"arg1": 1}<|tool_call_end|><|tool_calls_section_end|>', None, CALL, None,
                 id="kimi-k2"),
    pytest.param("Kimi-K2-Instruct", {}, "<|tool_calls_section_begin|><|tool_call_begin|>functions.special_function:0"
                 '<|tool_call_argument_begin|>{"arg1": 1}<|tool_call_end|><|tool_calls_section_end|>', None, CALL, None,
                 id="kimi-k2-instruct"),
    pytest.param("MiniMax-M2", ON, "Let's call a tool:\n</think>\n\n<minimax:tool_call>\n<invoke name=\"empty_args\">\n"
                 "</invoke>\n</minimax:tool_call>", None, [("empty_args", {})], "Let's call a tool:", id="minimax-m2"),
    pytest.param("MiniMax-M2", ON, '\n</think>\n\n<minimax:tool_call>\n<invoke name="special_function">\n<parameter '
                 'name="arg1">1</parameter>\n</invoke>\n</minimax:tool_call>', None, CALL, None, id="minimax-m2-param"),
    pytest.param("MiniMax-M3", {}, "</mm:think>Hello, world!\nWhat's up?", "Hello, world!\nWhat's up?", [], None,
                 id="minimax-m3-bare-think-close"),
    pytest.param("MiniMax-M3", {}, "<mm:think>I'm\nthinking</mm:think>Hello, world!\nWhat's up?",
                 "Hello, world!\nWhat's up?", [], THOUGHT, id="minimax-m3-thinking"),
    pytest.param("MiniMax-M3", {}, "<mm:think>Let me check the time</mm:think>" + M3_BLOCK.format(M3_TOKYO), None,
                 TOKYO, "Let me check the time", id="minimax-m3-call"),
    pytest.param("MiniMax-M3", {}, "</mm:think>" + M3_BLOCK.format(M3_SPECIAL), None, CALL, None,
                 id="minimax-m3-integer"),
    pytest.param("MiniMax-M3", {}, "<mm:think>Let's call a tool:</mm:think>" + M3_BLOCK.format(M3_EMPTY), None,
                 [("empty_args", {})], "Let's call a tool:", id="minimax-m3-no-arguments"),
    pytest.param("MiniMax-M3", {}, "<mm:think>Calling both</mm:think>" + M3_BLOCK.format(M3_TOKYO + M3_SPECIAL), None,
                 [*TOKYO, *CALL], "Calling both", id="minimax-m3-two-calls"),
    pytest.param("MiniMax-M3", {}, "<mm:think>Thinking about it</mm:think>Let me call the function."
                 + M3_BLOCK.format(M3_SPECIAL), "Let me call the function.", CALL, "Thinking about it",
                 id="minimax-m3-text-then-call"),
    pytest.param("MiniMax-M3", {}, "</mm:think>" + M3_BLOCK.format(m3_invoke("magic_int", "<ref>-14", "</ref>",
                 "<name>foo bar", "</name>")), None, [("magic_int", {"ref": -14, "name": "foo bar"})], None,
                 id="minimax-m3-negative-and-string"),
    pytest.param("MiniMax-M3", {}, "</mm:think>" + M3_BLOCK.format(m3_invoke("amount", "<orig>3.14", "</orig>")
                 + m3_invoke("toggle", "<enabled>true", "</enabled>")), None,
                 [("amount", {"orig": 3.14}), ("toggle", {"enabled": True})], None, id="minimax-m3-decimal-boolean"),
    pytest.param("MiniMax-M3", {}, "<mm:think>Nested object</mm:think>" + M3_BLOCK.format(m3_invoke(
                 "imaginary_number", "<number>", "<real>1.5", "</real>", "<imaginary>-2.5", "</imaginary>",
                 "</number>")), None, [("imaginary_number", {"number": {"real": 1.5, "imaginary": -2.5}})],
                 "Nested object", id="minimax-m3-nested-object"),
    pytest.param("MiniMax-M3", {}, "<mm:think>Nested arrays</mm:think>" + M3_BLOCK.format(m3_invoke(
                 "nested_args", "<tags>", "<item>alpha", "</item>", "<item>beta", "</item>", "</tags>", "<entries>",
                 "<item>", "<id>1", "</id>", "<label>one", "</label>", "</item>", "</entries>")), None,
                 [("nested_args", {"tags": ["alpha", "beta"], "entries": [{"id": 1, "label": "one"}]})],
                 "Nested arrays", id="minimax-m3-nested-arrays"),
    pytest.param("Qwen3.5-4B", ON, "I'm\nthinking\n</think>\n\nHello, world!\nWhat's up?", "Hello, world!\nWhat's up?",
                 [], THOUGHT, id="qwen3.5-thinking"),
    pytest.param("Qwen3.5-4B", OFF, "<tool_call>\n<function=special_function>\n<parameter=arg1>\n1\n</parameter>\n"
                 "</function>\n</tool_call>", None, CALL, None, id="qwen3.5-call"),
    pytest.param("Qwen3-Coder", {}, "<tool_call>\n<function=special_function>\n<parameter=arg1>\n1\n</parameter>\n"
                 "</function>\n</tool_call>", None, CALL, None, id="qwen3-coder"),
    pytest.param("meta-llama-Llama-3.1-8B-Instruct", {}, '<|python_tag|>{"name": "special_function", "parameters": '
                 '{"arg1": 1}}', None, CALL, None, id="llama-3.1-python-tag"),
    pytest.param("meta-llama-Llama-3.3-70B-Instruct", {}, '{"name": "special_function", "parameters": {"arg1": 1}}',
                 None, CALL, None, id="llama-3.3-json"),
    pytest.param("mistralai-Mistral-Nemo-Instruct-2407", {}, '[TOOL_CALLS][{"name": "special_function", "arguments": '
                 '{"arg1": 1}, "id": "123456789"}]', None, CALL, None, id="mistral-nemo"),
    pytest.param(MINISTRAL, {}, "Hello, world!\nWhat's up?", "Hello, world!\nWhat's up?", [], None,
                 id="ministral-3-reasoning-plain"),
    pytest.param(MINISTRAL, {}, "[THINK]I'm\nthinking[/THINK]Hello, world!\nWhat's up?", "Hello, world!\nWhat's up?",
                 [], THOUGHT, id="ministral-3-reasoning-thinking"),
    pytest.param(MINISTRAL, {}, '[THINK]I\'m\nthinking[/THINK][TOOL_CALLS]special_function[ARGS]{"arg1":1}', None, CALL,
                 THOUGHT, id="ministral-3-reasoning-call"),
    pytest.param(MINISTRAL, {}, '[THINK]Let me think about [TOOL_CALLS]special_function[ARGS]{"arg1":1} and more[/THINK]'
                 '[TOOL_CALLS]special_function[ARGS]{"arg1": 1}', None, CALL,
                 'Let me think about [TOOL_CALLS]special_function[ARGS]{"arg1":1} and more',
                 id="ministral-3-reasoning-call-marker-in-reasoning"),
    pytest.param("Mistral-Small-3.2-24B-Instruct-2506", {}, '[TOOL_CALLS]special_function[CALL_ID]123456789[ARGS]'
                 '{"arg1": 1}', None, CALL, None, id="mistral-small-3.2"),
    pytest.param("unsloth-mistral-Devstral-Small-2507", {}, '[TOOL_CALLS]special_function[ARGS]{"arg1": 1}', None, CALL,
                 None, id="devstral"),
    pytest.param("ibm-granite-granite-4.0", {}, '<tool_call>\n{"name": "special_function", "arguments": {"arg1": 1}}\n'
                 "</tool_call>", None, CALL, None, id="granite-4.0"),
    pytest.param("ibm-granite-granite-3.3-2B-Instruct", {}, "<think>I'm\nthinking</think>Hello, world!\nWhat's up?",
                 "Hello, world!\nWhat's up?", [], THOUGHT, id="granite-3.3-thinking"),
    pytest.param("CohereForAI-c4ai-command-r7b-12-2024-tool_use", {}, "<|START_THINKING|>I'm\nthinking<|END_THINKING|>"
                 '<|START_ACTION|>[\n    {"tool_call_id": "0", "tool_name": "special_function", "parameters": '
                 '{"arg1": 1}}\n]<|END_ACTION|>', None, CALL, THOUGHT, id="command-r7b"),
    pytest.param("CohereForAI-c4ai-command-r7b-12-2024-tool_use", {}, "<|START_THINKING|>I'm\nthinking<|END_THINKING|>"
                 "<|START_RESPONSE|>Hello, world!\nWhat's up?<|END_RESPONSE|>", "Hello, world!\nWhat's up?", [], THOUGHT,
                 id="command-r7b-response"),
    pytest.param("meetkai-functionary-medium-v3.1", {}, '<function=special_function>{"arg1": 1}</function>', None, CALL,
                 None, id="functionary-v3.1"),
    pytest.param("ByteDance-Seed-OSS", {}, "<seed:think>I'm thinking about the answer</seed:think>\nHello, world!",
                 "Hello, world!", [], "I'm thinking about the answer", id="seed-oss-thinking"),
    pytest.param("ByteDance-Seed-OSS", {}, "<seed:tool_call>\n<function=special_function>\n<parameter=arg1>1"
                 "</parameter>\n</function>\n</seed:tool_call>", None, CALL, None, id="seed-oss-call"),
    pytest.param("NVIDIA-Nemotron-3-Nano-30B-A3B-BF16", ON, "I'm\nthinking\n</think>\nHello, world!\nWhat's up?",
                 "Hello, world!\nWhat's up?", [], THOUGHT, id="nemotron-3-nano-thinking"),
    pytest.param("NVIDIA-Nemotron-3-Nano-30B-A3B-BF16", OFF, "<tool_call>\n<function=special_function>\n<parameter=arg1>"
                 "\n1\n</parameter>\n</function>\n</tool_call>", None, CALL, None, id="nemotron-3-nano-call"),
    pytest.param("NVIDIA-Nemotron-Nano-v2", {}, "I'm\nthinking\n</think>\n<TOOLCALL>[{\"name\": \"special_function\", "
                 '"arguments": {"arg1": 1}}]</TOOLCALL>', None, CALL, THOUGHT, id="nemotron-nano-v2"),
    pytest.param("LFM2.5-8B-A1B", {}, "<think>I'm\nthinking</think><|tool_call_start|>[special_function(arg1=1)]"
                 "<|tool_call_end|>", None, CALL, THOUGHT, id="lfm2.5"),
    pytest.param("LFM2.5-8B-A1B", {}, "<think>I need to call a function</think>Let me check the time."
                 '<|tool_call_start|>[get_time(city="Paris")]<|tool_call_end|>', "Let me check the time.",
                 [("get_time", {"city": "Paris"})], "I need to call a function", id="lfm2.5-text-and-call"),
    pytest.param("Apertus-8B-Instruct", {}, '<|tools_prefix|>[{"special_function": {"arg1": 1}}]<|tools_suffix|>',
                 None, CALL, None, id="apertus"),
]  # fmt: skip


def _calls(message: dict) -> list:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message.get("tool_calls", [])]


@pytest.mark.parametrize(("name", "variables", "text", "content", "calls", "reasoning"), CASES)
def test_native_output_parses(name, variables, text, content, calls, reasoning):
    chat = loaded(name).render(
        [{"role": "user", "content": "Hi"}], tools=TOOLS, tool_choice="auto", variables=variables or None
    )
    message, finish, deltas = parse_whole(chat, text)
    assert (message["content"], _calls(message), message.get("reasoning_content")) == (content, calls, reasoning), (
        chat.prompt[-80:],
        message,
    )
    assert finish == ("tool_calls" if calls else None)
    assert_deltas_add_up(message, deltas)
    for size in (1, 3, 7):
        streamed, _, deltas = parse_pieces(chat, [text[i : i + size] for i in range(0, len(text), size)])
        assert (streamed["content"], _calls(streamed), streamed.get("reasoning_content")) == (content, calls, reasoning)
        assert_deltas_add_up(streamed, deltas)
