"""Reading a model's answer back: reasoning, tool calls in the model's syntax, and text.

    ChatParser(spec).feed(text) -> deltas       as the text is generated (OpenAI's delta fragments)
    ChatParser(spec).finish() -> (deltas, message, finish_reason)

Concatenating every delta gives the final message exactly; the parser holds back what it cannot
settle yet (a marker half written, a call still open), so streaming and the whole answer agree.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import string
from dataclasses import dataclass
from typing import Any

from deployer.runtime.chat.families import GENERIC, Syntax
from deployer.runtime.chat.harmony import scan_harmony
from deployer.runtime.chat.nested import nested_value
from deployer.runtime.chat.scan import CallScan, Memo, Reasoning, Unit, held_back
from deployer.runtime.chat.scan import scan as scan_text

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_ID_ALPHABET = string.ascii_letters + string.digits


@dataclass(frozen=True)
class ParseSpec:
    """What a parser needs to know about one rendered request."""

    family: Syntax | None  # None: no tool calls are parsed
    tools: tuple[dict[str, Any], ...] = ()
    parallel: bool = True
    constrained: bool = False  # a grammar forces the calls: arguments stream as they are written
    thinking: bool = False  # split reasoning off into reasoning_content
    think_open: bool = False  # the prompt already opened the reasoning
    reasoning: tuple[str, str] = (THINK_OPEN, THINK_CLOSE)  # its markers
    harmony: bool = False  # gpt-oss: the channels say what is reasoning (the scanner splits it)


class _ThinkSplitter:
    """Splits ``<think>...</think>`` (at the start of the answer, or opened by the prompt) off the text."""

    def __init__(self, opened: bool, markers: tuple[str, str]) -> None:
        self.state = "think" if opened else "start"
        self.pending = ""
        self.open, self.close = markers

    def feed(self, text: str, final: bool) -> tuple[str, str]:
        """(reasoning, content) settled by ``text``."""
        self.pending += text
        if self.state == "start":
            head = self.pending.lstrip()
            if self.open and head.startswith(self.open):
                self.state, self.pending = "think", head[len(self.open) :]
            elif self.close and head.startswith(self.close):
                # an empty reasoning closed bare: MiniMax M3's template writes </mm:think> before an answer without any
                self.state, out, self.pending = "content", head[len(self.close) :], ""
                return "", out
            elif any(m and m.startswith(head) for m in (self.open, self.close)) and not final:
                return "", ""
            else:
                self.state, out, self.pending = "content", self.pending, ""
                return "", out
        if self.state == "think":
            k = self.pending.find(self.close)
            if k >= 0:
                reasoning, rest = self.pending[:k], self.pending[k + len(self.close) :]
                self.state, self.pending = "content", ""
                return reasoning, rest
            keep = 0 if final else held_back(self.pending, (self.close,))
            reasoning, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep :]
            return reasoning, ""
        out, self.pending = self.pending, ""
        return "", out


@dataclass
class _ToolCall:
    id: str
    name: str
    arguments: str
    done: bool = True


class ChatParser:
    """Reads one choice's generated text into OpenAI's message and stream deltas.

    ``feed`` returns the deltas the text settles; ``finish`` the rest, the full message and the
    finish_reason it implies. Concatenating every delta gives the message exactly.
    """

    def __init__(self, spec: ParseSpec) -> None:
        self._spec = spec
        self._think = _ThinkSplitter(spec.think_open, spec.reasoning) if spec.thinking and not spec.harmony else None
        self._reasoning = ""  # raw reasoning text so far
        self._buf = ""  # raw answer text (after the reasoning)
        self._pos, self._fresh = 0, True  # where the settled part of _buf ends
        self._memo: Memo = {}  # JSON objects scanned so far, by where they start
        self._content = ""  # settled content text
        self._calls: list[_ToolCall] = []  # settled calls
        self._preview: list[_ToolCall] = []  # calls being written (constrained output only)
        self._tools = {t["function"]["name"]: t["function"] for t in spec.tools}
        self._sent_content = self._sent_reasoning = ""
        self._sent_calls: list[int] = []  # characters of arguments sent, per call index
        self._ids: list[str] = []
        self._final = False

    @property
    def _passthrough(self) -> bool:
        return self._think is None and self._spec.family is None and not self._spec.harmony

    def feed(self, text: str) -> list[dict[str, Any]]:
        """Deltas (``{"content"}``, ``{"reasoning_content"}``, ``{"tool_calls"}``) settled by ``text``."""
        if self._passthrough:
            self._content += text
            self._sent_content = self._content
            return [{"content": text}] if text else []
        self._advance(text, final=False)
        return self._deltas()

    def finish(self) -> tuple[list[dict[str, Any]], dict[str, Any], str | None]:
        """(deltas still held back, the message, "tool_calls" when the answer is complete calls, else None)."""
        deltas: list[dict[str, Any]] = []
        self._final = True
        if not self._passthrough:
            self._advance("", final=True)
            deltas = self._deltas()
        calls = self._calls + self._preview
        content = self._shown_content()
        message: dict[str, Any] = {
            "role": "assistant",
            "content": content if content or not calls else None,
            "refusal": None,
        }
        if (self._think is not None or self._spec.harmony) and self._shown_reasoning():
            message["reasoning_content"] = self._shown_reasoning()
        if calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls
            ]
        finish = "tool_calls" if calls and all(c.done for c in calls) else None
        return deltas, message, finish

    # -- settling text

    def _advance(self, text: str, final: bool) -> None:
        if self._think is not None:
            reasoning, text = self._think.feed(text, final)
            self._reasoning += reasoning
        self._buf += text
        family = self._spec.family
        if family is None and not self._spec.harmony:
            self._content += self._buf[self._pos :]
            self._pos = len(self._buf)
            return
        scanner = scan_harmony if self._spec.harmony else scan_text
        pieces, open_unit, self._pos, self._fresh = scanner(
            family or GENERIC, self._buf, self._pos, self._fresh, final, self._memo
        )
        for piece in pieces:
            if isinstance(piece, str):
                self._content += piece
            elif isinstance(piece, Reasoning):
                self._reasoning += piece.text
            elif family is None:  # harmony without tools: a call is text
                self._content += piece.raw
            else:
                self._settle(piece)
        self._preview = []
        if open_unit is not None and self._spec.constrained:
            self._preview = self._as_calls(open_unit.calls, len(self._calls), done=False)

    def _settle(self, unit: Unit) -> None:
        calls = self._as_calls(unit.calls, len(self._calls), done=unit.done)  # before _valid: XML arguments
        if self._spec.constrained and calls:  # the grammar wrote them, and they may have been streamed already
            self._calls += calls
            return
        valid = unit.done and all(self._valid(c) for c in unit.calls)
        if valid and (self._spec.parallel or not self._calls) and (self._spec.parallel or len(calls) == 1):
            self._calls += calls
        else:
            self._content += unit.raw  # not a call this request can take: the model's text, as written

    def _as_calls(self, scans: list[CallScan], first: int, done: bool) -> list[_ToolCall]:
        out = []
        for scan in scans:
            if scan.params is not None and scan.name is not None and done:  # tagged: arguments from the parameters
                schema = self._tools.get(scan.name, {}).get("parameters")
                args = tagged_arguments(scan.params, schema, self._spec.family)
                scan.args, scan.args_done, scan.params = args, True, None
        for index, scan in enumerate(scans, first):
            if scan.name is None:
                break
            args = scan.args or ""
            if done and scan.args_done:
                args = _arguments_text(args)
            out.append(_ToolCall(self._id(index), scan.name, args, done and scan.args_done))
        return out

    def _id(self, index: int) -> str:
        while len(self._ids) <= index:
            family = self._spec.family or GENERIC
            tail = "".join(secrets.choice(_ID_ALPHABET) for _ in range(family.call_id_length))
            self._ids.append(family.call_id_prefix + tail)
        return self._ids[index]

    def _valid(self, scan: CallScan) -> bool:
        """A complete call of an offered tool whose arguments are JSON valid for its schema."""
        if not scan.valid_shape or scan.name not in self._tools or scan.args is None or not scan.args_done:
            return False
        try:
            arguments = json.loads(_arguments_text(scan.args))
        except json.JSONDecodeError:
            return False
        return isinstance(arguments, dict) and _matches(arguments, self._tools[scan.name].get("parameters"))

    # -- what has been shown

    def _shown_content(self) -> str:
        family = self._spec.family
        if family is not None and family.content_close:  # the answer's own wrapper is no part of it
            markers = (family.content_open, family.content_close)
            text = self._content.replace(family.content_open, "").replace(family.content_close, "")
            return text[: len(text) - (0 if self._final else held_back(text, markers))].strip()
        text = (
            self._content.lstrip()
            if self._think is not None or self._spec.family or self._spec.harmony
            else self._content
        )
        return text.rstrip() if self._spec.family is not None or self._spec.harmony else text

    def _shown_reasoning(self) -> str:
        return self._reasoning.strip()

    def _deltas(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        reasoning = self._shown_reasoning()
        if len(reasoning) > len(self._sent_reasoning):
            out.append({"reasoning_content": reasoning[len(self._sent_reasoning) :]})
            self._sent_reasoning = reasoning
        content = self._shown_content()
        if len(content) > len(self._sent_content):
            out.append({"content": content[len(self._sent_content) :]})
            self._sent_content = content
        for index, call in enumerate(self._calls + self._preview):
            if index == len(self._sent_calls):
                head = {"index": index, "id": call.id, "type": "function", "function": {"name": call.name}}
                head["function"]["arguments"] = ""
                out.append({"tool_calls": [head]})
                self._sent_calls.append(0)
            sent = self._sent_calls[index]
            if len(call.arguments) > sent:
                out.append({"tool_calls": [{"index": index, "function": {"arguments": call.arguments[sent:]}}]})
                self._sent_calls[index] = len(call.arguments)
        return out


_PYTHON_LITERALS = {"True": "true", "False": "false", "None": "null"}  # Python-call syntax (LFM2)


def tagged_arguments(params: list[tuple[str, str, bool]], schema: Any, syntax: Syntax | None = None) -> str:
    """The JSON arguments of tagged parameters: text where the tool's schema wants a string, else JSON when it
    parses, else nested elements where the syntax writes objects and arrays so (MiniMax M3)."""
    properties = schema.get("properties", {}) if isinstance(schema, dict) else {}
    out: dict[str, Any] = {}
    for key, text, as_json in params:
        spec = properties.get(key) if isinstance(properties, dict) else None
        kind = spec.get("type") if isinstance(spec, dict) else None
        if as_json:  # written as a JSON value (a quoted string too: LFM2's city="Paris")
            with contextlib.suppress(json.JSONDecodeError):
                out[key] = json.loads(_PYTHON_LITERALS.get(text.strip(), text))
                continue
        if kind == "string" or (isinstance(kind, list) and "string" in kind and text.strip() != "null"):
            out[key] = text
            continue
        try:
            out[key] = json.loads(text)
        except json.JSONDecodeError:
            out[key] = (
                nested_value(syntax, text, spec) if syntax is not None and syntax.nested_lead is not None else text
            )
    return json.dumps(out, ensure_ascii=False)


def _arguments_text(raw: str) -> str:
    """The arguments JSON text (a JSON string holding the object is unwrapped, as llama.cpp does)."""
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        return raw
    return value if isinstance(value, str) else raw


def _matches(arguments: dict[str, Any], schema: Any) -> bool:
    if not isinstance(schema, dict) or not schema:
        return True
    import jsonschema

    try:
        validator = jsonschema.validators.validator_for(schema)(schema)
        return bool(validator.is_valid(arguments))
    except (jsonschema.SchemaError, jsonschema.exceptions.RefResolutionError, ValueError, TypeError):
        return True  # a schema the validator cannot read: the tool's own code checks the arguments
