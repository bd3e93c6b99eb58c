"""Chat template families: how each one writes tool calls, and how to find them in generated text.

One table, :data:`FAMILIES`, in the spirit of llama.cpp's ``common/chat.cpp``: a family is detected
from the text of the model's chat template (every string of ``detect`` in it, none of ``absent``),
and says how the model writes a call (``syntax``), which grammar constrains it, and how its call ids
look. Adding a family is one more entry (and, for a new way of writing calls, one more scanner).

Scanners are pure functions of text. They return the pieces of the generated text that are settled
(plain text, or a complete unit of calls) and at most one unsettled unit (a call still being
written), so that streaming and the final message always agree.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Family:
    """One way of writing tool calls, and how to recognise a template that uses it."""

    name: str
    syntax: str  # a key of SCANNERS: "tagged", "xml", "json", "mistral-array", "mistral-args"
    detect: tuple[str, ...] = ()  # every one of these occurs in the template
    absent: tuple[str, ...] = ()  # none of these does
    open: str = ""  # the text that starts a call ("tagged", "mistral-*", and "json"'s optional tag)
    close: str = ""  # the text that ends one ("tagged")
    args_key: str = "arguments"  # the key the model writes the arguments under
    separator: str = "\n"  # between two calls, in the grammar
    stop: tuple[str, ...] = ()  # extra stop strings
    call_id_length: int = 24  # random alphanumerics after "call_"; 9 alone for Mistral (its templates check)
    call_id_prefix: str = "call_"
    example: str = field(default="", compare=False)  # documentation: one call as the model writes it

    @property
    def markers(self) -> tuple[str, ...]:
        """The family's marker texts (special tokens in most vocabularies)."""
        extra = ("[ARGS]",) if self.syntax == "mistral-args" else ()
        return tuple(m for m in (self.open, self.close, *extra) if m)


FAMILIES: tuple[Family, ...] = (
    Family(
        "mistral-v11",  # Devstral, Mistral Small 3.2, Magistral: [TOOL_CALLS]name[ARGS]{...}
        "mistral-args",
        detect=("[TOOL_CALLS]", "[ARGS]"),
        open="[TOOL_CALLS]",
        separator="",
        call_id_length=9,
        call_id_prefix="",
        example='[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}',
    ),
    Family(
        "mistral",  # Mistral 7B v0.3, Nemo, Small 3: [TOOL_CALLS][{"name": ..., "arguments": ...}]
        "mistral-array",
        detect=("[TOOL_CALLS]",),
        open="[TOOL_CALLS]",
        separator=", ",
        call_id_length=9,
        call_id_prefix="",
        example='[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]',
    ),
    Family(
        "qwen3-xml",  # Qwen3-Coder, Qwen 3.5, Nemotron 3 Nano: <tool_call><function=...><parameter=...>
        "xml",
        detect=("<tool_call>", "<function=", "<parameter="),
        open="<tool_call>",
        close="</tool_call>",
        example="<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>",
    ),
    Family(
        "hermes",  # Hermes 2/3, Qwen 2.5, Qwen 3, QwQ: <tool_call>{...}</tool_call>
        "tagged",
        detect=("<tool_call>",),
        absent=("<function=", "<arg_key>", "<invoke"),  # XML-style calls inside <tool_call>: not JSON
        open="<tool_call>",
        close="</tool_call>",
        example='<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    ),
    Family(
        "llama3",  # Llama 3.1, 3.2, 3.3: a JSON object, optionally after <|python_tag|>
        "json",
        detect=("<|start_header_id|>ipython<|end_header_id|>",),
        absent=("<function=",),  # functionary v3.1
        open="<|python_tag|>",
        args_key="parameters",
        separator="; ",
        stop=("<|eom_id|>",),
        example='{"name": "get_weather", "parameters": {"city": "Paris"}}',
    ),
)
# a template that renders tools in none of the ways above: JSON objects at the start of the answer
GENERIC = Family("generic", "json", example='{"name": "get_weather", "arguments": {"city": "Paris"}}')


def detect_family(template: str) -> Family:
    """The family of a chat template's text (:data:`GENERIC` when no entry matches)."""
    for family in FAMILIES:
        if all(s in template for s in family.detect) and not any(s in template for s in family.absent):
            return family
    return GENERIC


# ## Scanning


@dataclass
class CallScan:
    """One call as far as it has been written. ``args`` is the raw JSON text of the arguments."""

    name: str | None = None  # None until the name is complete (or when it is not a string)
    args: str | None = None  # None until the arguments start
    args_done: bool = False
    valid_shape: bool = True  # False when the call's JSON is not of the family's form
    params: list[tuple[str, str]] | None = None  # "xml": the parameters as written (typed by the tool's schema)


@dataclass
class Unit:
    """Calls written as one piece of text (one <tool_call>, one [TOOL_CALLS] array, one JSON object)."""

    calls: list[CallScan]
    raw: str  # the text, so that a unit whose calls are not valid comes back as content
    done: bool


Piece = str | Unit  # settled text, or a settled unit of calls
Scan = tuple[list[Piece], Unit | None, int, bool]  # settled pieces, unsettled unit, next position, fresh


def held_back(buf: str, markers: tuple[str, ...]) -> int:
    """How many characters at the end of ``buf`` could be the start of one of ``markers``."""
    longest = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(buf)), longest, -1):
            if buf.endswith(marker[:n]):
                longest = n
                break
    return longest


def _skip_ws(buf: str, i: int) -> int:
    while i < len(buf) and buf[i].isspace():
        i += 1
    return i


@dataclass
class ObjectScan:
    """The top-level keys of a JSON object seen so far, with the spans of their values.

    Resumable: text only ever grows at the end, so a scan continues where it stopped (a long
    argument streamed token by token is read once, not once per token).
    """

    start: int
    end: int | None = None  # one past the closing brace; None while the object is open
    spans: dict[str, tuple[int, int | None]] = field(default_factory=dict)  # key -> value (start, end or None)
    malformed: bool = False
    at: int = 0  # where scanning goes on
    depth: int = 0
    in_string: bool = False
    escaped: bool = False
    expect: str = "key"
    key: str = ""
    key_start: int = 0
    value_start: int = 0


Memo = dict[int, ObjectScan]


def scan_object(buf: str, start: int, memo: Memo, limit: int | None = None) -> ObjectScan:
    """Scan the JSON object at ``buf[start] == "{"`` up to ``limit`` (lenient: ``json.loads`` checks values later)."""
    o = memo.get(start)
    if o is None:
        o = memo[start] = ObjectScan(start, at=start)
    for j in range(o.at, len(buf) if limit is None else limit):
        if o.end is not None:
            break
        c = buf[j]
        if o.in_string:
            if o.escaped:
                o.escaped = False
            elif c == "\\":
                o.escaped = True
            elif c == '"':
                o.in_string = False
                if o.depth == 1 and o.expect == "key-string":
                    o.key, o.expect = buf[o.key_start + 1 : j], "colon"
            continue
        if o.depth == 1 and o.expect == "value" and not c.isspace():
            o.value_start, o.expect = j, "in-value"
            o.spans[o.key] = (j, None)
        if c == '"':
            o.in_string = True
            if o.depth == 1 and o.expect == "key":
                o.key_start, o.expect = j, "key-string"
        elif c in "{[":
            o.depth += 1
        elif c in "}]":
            o.depth -= 1
            if o.depth == 0:
                if o.expect == "in-value":
                    o.spans[o.key] = (o.value_start, j)
                o.end, o.malformed = j + 1, c != "}"
        elif o.depth == 1 and c == ":" and o.expect == "colon":
            o.expect = "value"
        elif o.depth == 1 and c == ",":
            if o.expect == "in-value":
                o.spans[o.key] = (o.value_start, j)
            o.expect = "key"
    if o.end is None:
        o.at = len(buf) if limit is None else limit
    return o


def call_of_object(buf: str, obj: ObjectScan, args_keys: tuple[str, ...]) -> CallScan:
    """The call written as a JSON object ``{"name": ..., "<args key>": {...}}``, as far as it goes."""
    call = CallScan()
    if obj.malformed:
        call.valid_shape = False
    if "name" in obj.spans:
        begin, end = obj.spans["name"]
        if end is not None:
            try:
                name = json.loads(buf[begin:end])
            except json.JSONDecodeError:
                name = None
            if isinstance(name, str):
                call.name = name
            else:
                call.valid_shape = False
    elif obj.end is not None:
        call.valid_shape = False
    key = next((k for k in args_keys if k in obj.spans), None)
    if key is not None:
        begin, end = obj.spans[key]
        call.args = buf[begin : len(buf) if end is None else end].rstrip()
        call.args_done = end is not None
    elif obj.end is not None:
        call.args, call.args_done = "{}", True  # a function without parameters
    return call


def _until_open(family: Family, buf: str, pos: int, final: bool, pieces: list[Piece]) -> tuple[int, bool]:
    """Text from ``pos`` up to the family's next opening marker goes to ``pieces``: (the marker's position,
    True), or, with no marker yet, (where the text that might begin one starts, False)."""
    k = buf.find(family.open, pos)
    if k < 0:
        end = len(buf) if final else len(buf) - held_back(buf[pos:], (family.open,))
        if end > pos:
            pieces.append(buf[pos:end])
        return end, False
    if k > pos:
        pieces.append(buf[pos:k])
    return k, True


def scan_tagged(family: Family, buf: str, pos: int, fresh: bool, final: bool, memo: Memo) -> Scan:
    """``<tool_call>{"name": ..., "arguments": ...}</tool_call>``, anywhere in the text."""
    pieces: list[Piece] = []
    while True:
        k, found = _until_open(family, buf, pos, final, pieces)
        if not found:
            return pieces, None, k, fresh
        body = _skip_ws(buf, k + len(family.open))
        close = buf.find(family.close, body)
        stop = len(buf) if close < 0 else close
        obj = (
            scan_object(buf, body, memo, stop) if body < stop and buf[body] == "{" else ObjectScan(body, malformed=True)
        )
        call = call_of_object(buf, obj, (family.args_key, "parameters"))
        if close < 0:
            unit = Unit([call], buf[k:], False)
            if final:
                unit.calls[0].valid_shape = False
                pieces.append(unit)
                return pieces, None, len(buf), False
            return pieces, unit, k, fresh
        if obj.end is None or buf[obj.end : close].strip():
            call.valid_shape = False
        pieces.append(Unit([call], buf[k : close + len(family.close)], True))
        pos, fresh = close + len(family.close), True


_XML_CALL = re.compile(r"\s*<function=([^>\n]+)>\n?(.*?)</function>\s*", re.S)
_XML_PARAM = re.compile(r"\s*<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>\s*", re.S)


def scan_xml(family: Family, buf: str, pos: int, fresh: bool, final: bool, memo: Memo) -> Scan:
    """``<tool_call><function=name><parameter=key>value</parameter>...</function></tool_call>``.

    Settled whole: the arguments are made from the parameters once the call is complete.
    """
    pieces: list[Piece] = []
    while True:
        k, found = _until_open(family, buf, pos, final, pieces)
        if not found:
            return pieces, None, k, fresh
        close = buf.find(family.close, k)
        if close < 0 and not final:
            return pieces, Unit([CallScan()], buf[k:], False), k, fresh
        end = len(buf) if close < 0 else close + len(family.close)
        call = CallScan(valid_shape=False)
        found = _XML_CALL.fullmatch(buf, k + len(family.open), close) if close >= 0 else None
        if found:
            params, at, body = [], 0, found[2]
            while (param := _XML_PARAM.match(body, at)) is not None:
                params.append((param[1].strip(), param[2]))
                at = param.end()
            call = CallScan(found[1].strip(), None, False, valid_shape=not body[at:].strip(), params=params)
        pieces.append(Unit([call], buf[k:end], True))
        pos, fresh = end, True


def xml_arguments(params: list[tuple[str, str]], schema: Any) -> str:
    """The JSON arguments of XML parameters: text where the tool's schema wants a string, else JSON when it parses."""
    properties = schema.get("properties", {}) if isinstance(schema, dict) else {}
    out: dict[str, Any] = {}
    for key, text in params:
        spec = properties.get(key) if isinstance(properties, dict) else None
        kind = spec.get("type") if isinstance(spec, dict) else None
        if kind == "string" or (isinstance(kind, list) and "string" in kind and text.strip() != "null"):
            out[key] = text
            continue
        try:
            out[key] = json.loads(text)
        except json.JSONDecodeError:
            out[key] = text
    return json.dumps(out, ensure_ascii=False)


def scan_json(family: Family, buf: str, pos: int, fresh: bool, final: bool, memo: Memo) -> Scan:
    """JSON call objects at the start of the answer (or after ``open``, e.g. ``<|python_tag|>``).

    A ``{`` counts as a possible call only where nothing but blanks and ``;`` came since the start
    or the previous call; elsewhere it is text.
    """
    pieces: list[Piece] = []
    markers = (family.open,) if family.open else ()
    while True:
        i = pos
        while i < len(buf) and (buf[i].isspace() or buf[i] == ";") and fresh:
            i += 1
        tagged = bool(family.open) and buf.startswith(family.open, i)
        if fresh and (tagged or (i < len(buf) and buf[i] == "{")):
            begin = _skip_ws(buf, i + len(family.open)) if tagged else i
            if begin >= len(buf) and not final:
                return pieces, Unit([CallScan()], buf[pos:], False), pos, fresh
            if begin < len(buf) and buf[begin] == "{":
                obj = scan_object(buf, begin, memo)
                call = call_of_object(buf, obj, (family.args_key, "arguments", "parameters"))
                if obj.end is None:
                    unit = Unit([call], buf[pos:], False)
                    if final:
                        call.valid_shape = False
                        return [*pieces, unit], None, len(buf), False
                    return pieces, unit, pos, fresh
                pieces.append(Unit([call], buf[pos : obj.end], True))
                pos = obj.end
                continue
            # a tag followed by something else (Llama's built-in tools): text
            pieces.append(buf[pos:begin])
            pos, fresh = begin, False
            continue
        k = buf.find(family.open, i) if family.open else -1
        if k >= 0:
            pieces.append(buf[pos:k])
            pos, fresh = k, True
            continue
        if fresh and i == len(buf) and not final:
            return pieces, None, pos, fresh  # only blanks so far: a call may still come
        end = len(buf) if final else len(buf) - held_back(buf[i:], markers)
        if end > pos:
            pieces.append(buf[pos:end])
            fresh = fresh and not buf[pos:end].strip(" \t\r\n;")
        return pieces, None, max(end, pos), fresh


def scan_mistral_array(family: Family, buf: str, pos: int, fresh: bool, final: bool, memo: Memo) -> Scan:
    """``[TOOL_CALLS][{"name": ..., "arguments": ...}, ...]``."""
    pieces: list[Piece] = []
    while True:
        k, found = _until_open(family, buf, pos, final, pieces)
        if not found:
            return pieces, None, k, fresh
        calls: list[CallScan] = []
        i = _skip_ws(buf, k + len(family.open))
        done, broken = False, i < len(buf) and buf[i] != "["
        i += 1
        while not done and not broken:
            i = _skip_ws(buf, i)
            if i >= len(buf):
                break
            if buf[i] == "]" and not calls:
                done = True
                i += 1
                break
            if buf[i] != "{":
                broken = True
                break
            obj = scan_object(buf, i, memo)
            calls.append(call_of_object(buf, obj, (family.args_key, "parameters")))
            if obj.end is None:
                break
            i = _skip_ws(buf, obj.end)
            if i < len(buf) and buf[i] == ",":
                i += 1
            elif i < len(buf) and buf[i] == "]":
                done = True
                i += 1
            elif i < len(buf):
                broken = True
        if broken or (final and not done):
            calls = calls or [CallScan()]
            calls[-1].valid_shape = False
            end = i if broken else len(buf)
            pieces.append(Unit(calls, buf[k:end], True))
            if not final and not broken:
                return pieces[:-1], Unit(calls, buf[k:], False), k, fresh
            pos = end
            continue
        if not done:
            return pieces, Unit(calls, buf[k:], False), k, fresh
        pieces.append(Unit(calls, buf[k:i], True))
        pos, fresh = i, True


def scan_mistral_args(family: Family, buf: str, pos: int, fresh: bool, final: bool, memo: Memo) -> Scan:
    """``[TOOL_CALLS]name[ARGS]{...}``, one after another."""
    pieces: list[Piece] = []
    while True:
        k, found = _until_open(family, buf, pos, final, pieces)
        if not found:
            return pieces, None, k, fresh
        call = CallScan()
        marker = buf.find("[ARGS]", k + len(family.open))
        end: int | None = None
        if marker >= 0:
            name = buf[k + len(family.open) : marker].strip()
            call.name = name
            call.valid_shape = bool(name) and "[" not in name and "{" not in name
            begin = _skip_ws(buf, marker + len("[ARGS]"))
            if begin < len(buf):
                if buf[begin] == "{":
                    obj = scan_object(buf, begin, memo)
                    stop = len(buf) if obj.end is None else obj.end
                    call.args, call.args_done, end = buf[begin:stop].rstrip(), obj.end is not None, obj.end
                else:
                    call.valid_shape, end = False, begin
        if end is None:
            if not final:
                return pieces, Unit([call], buf[k:], False), k, fresh
            call.valid_shape, end = False, len(buf)
        pieces.append(Unit([call], buf[k:end], True))
        pos, fresh = end, True


SCANNERS: dict[str, Callable[[Family, str, int, bool, bool, Memo], Scan]] = {
    "tagged": scan_tagged,
    "xml": scan_xml,
    "json": scan_json,
    "mistral-array": scan_mistral_array,
    "mistral-args": scan_mistral_args,
}


# ## Grammars: the family's own call syntax, as GBNF rules around each tool's argument rule


def gbnf_literal(text: str) -> str:
    """A GBNF string literal."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return '"' + escaped.replace("\t", "\\t") + '"'


def call_rule(family: Family, name: str, args_rule: str) -> str:
    """The GBNF of one call of ``name``, whose arguments match ``args_rule``."""
    if family.syntax == "mistral-args":
        return f"{gbnf_literal(family.open + name + '[ARGS]')} {args_rule}"
    head = gbnf_literal(f'{{"name": {json.dumps(name)}, "{family.args_key}": ')
    obj = f'{head} {args_rule} "}}"'
    if family.syntax == "tagged":
        return f"{gbnf_literal(family.open + chr(10))} {obj} {gbnf_literal(chr(10) + family.close)}"
    return obj


def xml_call_rule(family: Family, name: str, properties: list[tuple[str, str, bool]]) -> str:
    """The GBNF of one XML call: each property ``(key, value rule, required)`` in order, optional ones may be left out."""
    parts = [gbnf_literal(f"{family.open}\n<function={name}>\n")]
    for key, value_rule, required in properties:
        param = f"{gbnf_literal(f'<parameter={key}>' + chr(10))} {value_rule} {gbnf_literal(chr(10) + '</parameter>' + chr(10))}"
        parts.append(param if required else f"( {param} )?")
    parts.append(gbnf_literal(f"</function>\n{family.close}"))
    return " ".join(parts)


def calls_rule(family: Family, call: str, parallel: bool) -> str:
    """The GBNF of one call (or, when ``parallel``, one or more) of the rule ``call``."""
    more = f" ( {gbnf_literal(family.separator)} {call} )*" if family.separator else f" ( {call} )*"
    body = f"{call}{more if parallel else ''}"
    if family.syntax == "mistral-array":
        return f'{gbnf_literal(family.open + "[")} {body} "]"'
    return body
