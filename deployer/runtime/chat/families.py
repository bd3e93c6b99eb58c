"""How a model writes tool calls and reasoning: a :class:`Syntax`, learned from its chat template, or hand-written.

Most syntaxes are learned (:mod:`deployer.runtime.chat.learn` renders probe conversations through the
model's own template and reads the markers off the differences). :data:`HAND_WRITTEN` keeps the few
that rendering cannot reveal, each with the reason; :data:`AMENDMENTS` adds to a learned syntax what a
template never writes back (a marker the model may put before its calls, an extra stop token).

A syntax is pure data; :mod:`deployer.runtime.chat.scan` reads text with it and
:mod:`deployer.runtime.chat.grammar` writes the GBNF that forces it.

Layouts (each call is ``call_open`` + core + ``call_close``; calls are joined by ``separator`` and
wrapped in ``block_open`` ... ``block_close``):

- ``json``: the core is a JSON object; ``name_path`` / ``args_path`` say where the name and the
  arguments are (``name_path == ()``: the name is the object's only key, its value the arguments);
- ``name-json``: NAME ``name_suffix`` {arguments JSON};
- ``tagged``: NAME ``name_suffix`` then per argument ``key_open`` KEY ``key_close`` VALUE ``value_close``
  (``key_close_json`` / ``value_close_json`` where the value is JSON, not a string); a closing marker may
  hold the key itself (``KEY_HOLE``: MiniMax M3's ``<city>Paris</city>``);
- ``harmony``: gpt-oss's channels (hand-written).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

KEY_HOLE = "\x1e"  # where a closing marker holds the argument's key (chat_learn writes it)


@dataclass(frozen=True)
class Syntax:
    """One way of writing tool calls (and reasoning), as the model writes it."""

    origin: str  # "learned", or the hand-written entry's name
    layout: str  # "json", "name-json", "tagged", "harmony"
    block_open: str = ""
    block_close: str = ""
    call_open: str = ""
    call_close: str = ""
    separator: str = ""
    name_suffix: str = ""
    indexed: bool = False  # name_suffix carries the call's index (0, 1, ...) where its first digit is
    name_path: tuple[str, ...] = ("name",)
    args_path: tuple[str, ...] = ("arguments",)
    key_open: str = ""
    key_close: str = ""
    value_close: str = ""
    key_close_json: str = ""
    value_close_json: str = ""
    param_separator: str = ""
    nested_lead: str | None = None  # objects and arrays written as nested elements, not JSON (chat_nested)
    item_key: str = ""  # the key of an array's elements (MiniMax M3's <item>)
    optional_open: str = ""  # a marker the model may write before its calls (Llama's <|python_tag|>)
    reasoning_open: str = ""
    reasoning_close: str = ""
    content_open: str = ""  # markers around the answer's text (Command R7B's <|START_RESPONSE|>)
    content_close: str = ""
    stop: tuple[str, ...] = ()
    call_id_length: int = 24  # random alphanumerics after call_id_prefix
    call_id_prefix: str = "call_"
    at_start_only: bool = field(default=False)  # no marker opens the calls: only an answer that starts with one

    @property
    def trigger(self) -> str:
        """The text that starts the calls ("" when nothing marks them)."""
        return (self.block_open.strip() or self.call_open.strip()) if self.layout != "harmony" else "<|channel|>"

    @property
    def markers(self) -> tuple[str, ...]:
        """Marker texts the engine must detokenize as text (special tokens in most vocabularies)."""
        if self.layout == "harmony":
            return ("<|start|>", "<|channel|>", "<|constrain|>", "<|message|>", "<|end|>", "<|call|>", "<|return|>")
        parts = [self.optional_open, self.block_open, self.call_open, self.call_close, self.block_close]
        if self.layout != "json":
            parts += [self.name_suffix.split("0")[-1] if self.indexed else self.name_suffix]
            parts += [self.key_open, self.key_close, self.value_close]
        out: list[str] = []
        for part in parts:
            for token in _marker_tokens(part):
                if token not in out:
                    out.append(token)
        return tuple(out)

    @property
    def thinks(self) -> bool:
        return bool(self.reasoning_close)

    def describe(self) -> str:
        """One line: how a call is written (and reasoning), for the plan and the README."""
        call = write_calls(self, [("get_weather", {"city": "Paris"})])
        return f"{self.origin if self.origin != 'learned' else self.layout}: {call.strip()}"


def _marker_tokens(text: str) -> list[str]:
    """The ``<...>`` / ``[...]`` tokens of a marker text (or the whole stripped text when it has none)."""
    import re

    found = re.findall(r"<[^<>\s]*>|\[[A-Z_/]+\]", text)
    return found or ([text.strip()] if text.strip() and "{" not in text and '"' not in text else [])


def write_calls(syntax: Syntax, calls: list[tuple[str, dict[str, Any]]]) -> str:
    """The text of ``calls`` as the model writes them (what the grammar forces, and what the parser reads)."""
    parts = [
        syntax.call_open + write_core(syntax, name, args, i) + syntax.call_close for i, (name, args) in enumerate(calls)
    ]
    return syntax.block_open + syntax.separator.join(parts) + syntax.block_close


def write_core(syntax: Syntax, name: str, args: dict[str, Any], index: int = 0) -> str:
    """One call's core (between call_open and call_close)."""
    if syntax.layout == "harmony":
        return f"<|channel|>commentary to=functions.{name} <|constrain|>json<|message|>{json.dumps(args)}"
    if syntax.layout == "json":
        return json_core(syntax, json.dumps(name), json.dumps(args, ensure_ascii=False))
    suffix = syntax.name_suffix.replace("0", str(index), 1) if syntax.indexed else syntax.name_suffix
    if syntax.layout == "name-json":
        return name + suffix + json.dumps(args, ensure_ascii=False)
    params = []
    for key, value in args.items():
        if isinstance(value, str):
            params.append(syntax.key_open + key + syntax.key_close + value + closing(syntax.value_close, key))
        else:
            text = json.dumps(value, ensure_ascii=False)
            params.append(syntax.key_open + key + syntax.key_close_json + text + closing(syntax.value_close_json, key))
    return name + suffix + syntax.param_separator.join(params)


def closing(marker: str, key: str) -> str:
    """An argument's closing marker, with its key where the marker holds it (``</city>``)."""
    return marker.replace(KEY_HOLE, key)


def json_core(syntax: Syntax, name_json: str, args_json: str) -> str:
    """The JSON call object, from the JSON texts of its name and arguments (the grammar passes rule names)."""
    if not syntax.name_path:
        return "{" + name_json + ": " + args_json + "}"
    fields: dict[tuple[str, ...], str] = {syntax.name_path: name_json, syntax.args_path: args_json}
    return _nest(fields, ())


def _nest(fields: dict[tuple[str, ...], str], at: tuple[str, ...]) -> str:
    keys: list[str] = []
    for path in fields:
        if path[: len(at)] == at and len(path) > len(at) and path[len(at)] not in keys:
            keys.append(path[len(at)])
    inner = []
    for key in keys:
        path = (*at, key)
        inner.append(json.dumps(key) + ": " + (fields[path] if path in fields else _nest(fields, path)))
    return "{" + ", ".join(inner) + "}"


# ## What rendering cannot reveal

# When no template-specific syntax can be learned but the template shows tools: JSON objects at the
# start of the answer (what most models write when told about tools in plain text).
GENERIC = Syntax("generic", "json", at_start_only=True)


@dataclass(frozen=True)
class HandWritten:
    """A syntax for templates that contain every string of ``detect``, and why it cannot be learned."""

    detect: tuple[str, ...]
    syntax: Syntax
    why: str


HAND_WRITTEN: tuple[HandWritten, ...] = (
    HandWritten(
        ("<|channel|>", "<|message|>", "<|call|>"),
        Syntax(
            "harmony",
            "harmony",
            call_close="<|call|>",
            separator="<|start|>assistant",
            reasoning_open="<|channel|>analysis<|message|>",
            reasoning_close="<|end|>",
            stop=("<|call|>",),
        ),
        "gpt-oss: the recipient (to=functions.NAME) sits in the channel header, the analysis channel is the "
        "reasoning and the final channel the answer; its template drops the analysis of earlier turns, so "
        "there is no call to learn the channels from",
    ),
    HandWritten(
        ("<|tool_list_start|>", "<|tool_response_start|>"),
        Syntax(
            "lfm2",
            "json",
            block_open="<|tool_call_start|>[",
            block_close="]<|tool_call_end|>",
            separator=", ",
            reasoning_open="<think>",
            reasoning_close="</think>",
        ),
        "LFM2: its template writes earlier calls back as the content the model wrote, so a call in "
        "tool_calls renders as nothing; the markers come from the model card",
    ),
    HandWritten(
        ("<|tool_call|>", "<|start_of_role|>"),
        Syntax("granite", "json", block_open="<|tool_call|>[", block_close="]", separator=", "),
        "Granite 3.x: its template renders no earlier call back; <|tool_call|>[...] is the model card's form",
    ),
)

# Added to a learned syntax of bare JSON calls where the template contains every string of the key:
# what the model may write that its template never writes back.
AMENDMENTS: tuple[tuple[tuple[str, ...], dict[str, Any], str], ...] = (
    (
        ("<|start_header_id|>ipython<|end_header_id|>",),
        {"optional_open": "<|python_tag|>", "stop": ("<|eom_id|>",)},
        "Llama 3.x writes <|python_tag|> before a call and ends it with <|eom_id|>; its template writes "
        "earlier calls back without the tag",
    ),
)


def hand_written(template: str) -> Syntax | None:
    """The hand-written syntax of a template's text, if one applies."""
    for entry in HAND_WRITTEN:
        if all(s in template for s in entry.detect):
            return entry.syntax
    return None


def amend(syntax: Syntax, template: str) -> Syntax:
    """A learned syntax with the amendments that apply to ``template``."""
    for detect, changes, _why in AMENDMENTS:
        if all(s in template for s in detect) and syntax.layout == "json" and not syntax.trigger:
            syntax = replace(syntax, **changes)
    return syntax


# ## What some templates read besides messages and tools


def _now(fmt: str) -> str:
    from datetime import datetime

    return datetime.now().strftime(fmt)


# Variables a template reads that transformers does not pass: given only where the template reads them
# and the request did not set them (llama.cpp's handlers pass the same).
TEMPLATE_VARIABLES: dict[str, Callable[[list[dict[str, Any]]], Any]] = {
    # firefunction v2: the tools as a JSON text, and the date
    "functions": lambda tools: json.dumps([t["function"] for t in tools], indent=4) if tools else "",
    "datetime": lambda tools: _now("%b %d %Y %H:%M:%S GMT"),
}


def cohere_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tools the way Command R+'s template reads them (name, description, parameter_definitions), beside OpenAI's."""
    out = []
    for tool in tools:
        function = tool.get("function") or {}
        parameters = function.get("parameters") or {}
        required = set(parameters.get("required") or ())
        definitions = {
            key: {
                "type": str(spec.get("type", "object")) if isinstance(spec, dict) else "object",
                "description": str(spec.get("description", "")) if isinstance(spec, dict) else "",
                "required": key in required,
            }
            for key, spec in (parameters.get("properties") or {}).items()
        }
        shaped = {"name": function.get("name", ""), "description": function.get("description", "")}
        out.append({**tool, **shaped, "parameter_definitions": definitions})
    return out


# Templates that read tools in another shape than OpenAI's: (a string only such templates contain, the converter).
TOOL_SHAPES: tuple[tuple[str, Callable[[list[dict[str, Any]]], list[dict[str, Any]]]], ...] = (
    ("parameter_definitions", cohere_tools),
)
