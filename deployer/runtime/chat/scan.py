"""Reading tool calls out of generated text with a :class:`~deployer.runtime.chat.families.Syntax`.

Pure functions of text. A scan returns the pieces of the text that are settled (plain text, reasoning,
or a complete unit of calls) and at most one unsettled unit (calls still being written), so that
streaming and the final message always agree. Markers are matched without their surrounding blanks
(models differ from their templates in newlines); a unit that breaks the syntax comes back as text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from deployer.runtime.chat.families import Syntax, closing

ID_HOLE = "\x1f"  # where a marker text holds the call's id (chat_learn writes it)
_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
_ID = re.compile(r"[A-Za-z0-9_\-]*")


@dataclass
class CallScan:
    """One call as far as it has been written. ``args`` is the raw JSON text of the arguments."""

    name: str | None = None  # None until the name is complete (or when it is not a string)
    args: str | None = None  # None until the arguments start
    args_done: bool = False
    valid_shape: bool = True  # False when the call is not of the syntax's form
    params: list[tuple[str, str, bool]] | None = None  # "tagged": (key, text, written as JSON), typed by the schema


@dataclass
class Unit:
    """Calls written as one piece of text (one <tool_call>, one [TOOL_CALLS] array, one JSON object)."""

    calls: list[CallScan]
    raw: str  # the text, so that a unit whose calls are not valid comes back as content
    done: bool


@dataclass(frozen=True)
class Reasoning:
    """Reasoning text settled by a scanner that finds it itself (Harmony's analysis channel)."""

    text: str


Scanned = str | Unit | Reasoning
Scan = tuple[list[Scanned], Unit | None, int, bool]  # settled pieces, unsettled unit, next position, fresh


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


class _Need(Exception):
    """The text ends before the syntax decides: more text will."""


class _Broken(Exception):
    """The text is not of the syntax (from the unit's start to ``end``)."""

    def __init__(self, end: int) -> None:
        self.end = end


class _Cut(_Broken):
    """The text ended inside a unit (max_tokens): what was written comes back as it stands."""


def _common_head(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


@dataclass
class _Reader:
    """One unit of calls read from ``buf[at:]`` (raises _Need / _Broken)."""

    syntax: Syntax
    buf: str
    at: int
    final: bool
    memo: Memo
    calls: list[CallScan] = field(default_factory=list)

    def ws(self) -> None:
        while self.at < len(self.buf) and self.buf[self.at].isspace():
            self.at += 1

    def ahead(self, marker: str) -> bool:
        """``marker`` comes next (the reading position stays)."""
        mark = self.at
        try:
            return self.lit(marker, optional=True)
        finally:
            self.at = mark

    def peek(self, text: str) -> bool:
        self.ws()
        if self.at >= len(self.buf):
            self.need() if not self.final else None
            return False
        return self.buf.startswith(text, self.at)

    def need(self) -> None:
        if self.final:
            raise _Cut(len(self.buf))
        raise _Need

    def lit(self, marker: str, optional: bool = False) -> bool:
        """Match ``marker`` (without its blanks; an id hole takes an id) at the reading position."""
        if ID_HOLE in marker:
            before, after = marker.split(ID_HOLE, 1)
            if not self.lit(before, optional):
                return False
            self.ws()
            found = _ID.match(self.buf, self.at)
            assert found is not None
            if found.end() == len(self.buf):
                self.need()
            self.at = found.end()
            return self.lit(after)
        text = marker.strip()
        self.ws()
        if not text:
            return True
        if self.buf.startswith(text, self.at):
            self.at += len(text)
            return True
        rest = self.buf[self.at :]
        if len(rest) < len(text) and text.startswith(rest) and not self.final:
            raise _Need
        if optional:
            return False
        raise _Broken(self.at)

    def until(self, stops: list[str], pattern: re.Pattern[str] | None = None) -> str:
        """The text up to the first of ``stops`` (left in place)."""
        stops = [s for s in stops if s]
        found = [k for k in (self.buf.find(s, self.at) for s in stops) if k >= 0]
        start = self.at
        text = self.buf[start : min(found)] if found else self.buf[start:]
        if not found:  # the end may be a stop half written
            text = text[: len(text) - held_back(text, tuple(stops))]
        if pattern is not None and text.strip() and not pattern.fullmatch(text.strip()):
            raise _Broken(start)  # the same place whether the stop has come yet or not
        if not found:
            self.need()
        self.at = start + len(text)
        return text

    def unit(self) -> None:
        s = self.syntax
        if s.optional_open:
            self.lit(s.optional_open, optional=True)
        self.lit(s.block_open)
        while True:
            self.lit(s.call_open)
            call = CallScan()
            self.calls.append(call)
            self.core(call, len(self.calls) - 1)
            self.lit(s.call_close)
            if not s.block_open.strip() and not s.separator.strip():  # calls with no block or separator: one unit each
                break
            if s.separator.strip():
                if self.lit(s.separator, optional=True):
                    continue
            elif s.call_open.strip() and self.ahead(s.call_open):
                continue
            elif not s.call_open.strip() and s.layout == "json" and self.peek("{"):
                continue  # objects one after another (MiniMax M1: one per line)
            break
        self.lit(s.block_close)

    def core(self, call: CallScan, index: int) -> None:
        s = self.syntax
        if s.layout == "json":
            self.json_core(call)
            return
        suffix = s.name_suffix.replace("0", ID_HOLE, 1) if s.indexed else s.name_suffix
        head = suffix.split(ID_HOLE)[0].strip()
        stops = [head] if head else [s.key_open.strip(), s.call_close.strip(), "{"]
        self.ws()
        call.name = self.until(stops, _NAME).strip()
        self.lit(suffix)
        if s.layout == "name-json":
            call.args, call.args_done = self.json_value()
            return
        self.params(call)

    def json_value(self) -> tuple[str, bool]:
        self.ws()
        if self.at >= len(self.buf):
            self.need()
        if self.buf[self.at] != "{":
            raise _Broken(self.at)
        obj = scan_object(self.buf, self.at, self.memo)
        if obj.end is None:
            self.calls[-1].args = self.buf[self.at :].rstrip()
            self.need()
        if obj.malformed:
            raise _Broken(obj.end)
        text, self.at = self.buf[self.at : obj.end], obj.end
        return text, True

    def json_any(self) -> str:
        """One JSON value at the reading position."""
        self.ws()
        if self.at >= len(self.buf):
            self.need()
        if self.buf[self.at] == "{":
            return self.json_value()[0]
        literal = re.match(r"(True|False|None)\b", self.buf[self.at :])  # Python-call syntax (LFM2)
        if literal and (self.final or literal.end() < len(self.buf) - self.at):
            self.at += literal.end()
            return literal[1]
        try:
            _, end = json.JSONDecoder().raw_decode(self.buf, self.at)
        except json.JSONDecodeError:
            self.need()  # more text may complete it (at the end: broken)
            raise _Broken(self.at) from None
        if end == len(self.buf) and not self.final:  # a number may go on
            self.need()
        text, self.at = self.buf[self.at : end], end
        return text

    def json_core(self, call: CallScan) -> None:
        s = self.syntax
        self.ws()
        start = self.at
        if self.at >= len(self.buf):
            self.need()
        if self.buf[self.at] != "{":
            raise _Broken(self.at)
        obj = scan_object(self.buf, start, self.memo)
        name_span = self._span(obj, s.name_path) if s.name_path else None
        if not s.name_path and obj.spans:
            key = next(iter(obj.spans))
            call.name, args_span = key, obj.spans[key]
        else:
            args_span = self._span(obj, s.args_path)
        if name_span is not None and name_span[1] is not None:
            try:
                name = json.loads(self.buf[name_span[0] : name_span[1]])
            except json.JSONDecodeError:
                name = None
            call.name = name if isinstance(name, str) else None
            call.valid_shape = call.valid_shape and isinstance(name, str)
        if args_span is not None:
            end = len(self.buf) if args_span[1] is None else args_span[1]
            call.args, call.args_done = self.buf[args_span[0] : end].rstrip(), args_span[1] is not None
        if obj.end is None:
            self.need()
        if obj.malformed:
            raise _Broken(obj.end)
        if call.name is None:
            call.valid_shape = False
        if args_span is None:
            call.args, call.args_done = "{}", True  # a function without parameters
        self.at = obj.end

    def _span(self, obj: ObjectScan, path: tuple[str, ...]) -> tuple[int, int | None] | None:
        span = obj.spans.get(path[0])
        for key in path[1:]:
            if span is None or span[1] is None or self.buf[span[0]] != "{":
                return None
            span = scan_object(self.buf, span[0], self.memo).spans.get(key)
        return span

    def params(self, call: CallScan) -> None:
        s = self.syntax
        call.params = []
        key_end = _common_head(s.key_close.strip(), s.key_close_json.strip()) or s.key_close.strip()
        while True:
            self.ws()
            if call.params and s.param_separator.strip():
                self.lit(s.param_separator, optional=True)
                self.ws()
            close = s.call_close.strip()
            if close and self.buf.startswith(close, self.at):
                return
            if close and close.startswith(self.buf[self.at :]):
                self.need()
            if s.key_open.strip():
                self.lit(s.key_open)
            elif not call.params and not close:
                return
            key = self.until([key_end], _NAME).strip()
            as_json = not self.lit(s.key_close, optional=True)
            if as_json:
                self.lit(s.key_close_json)
            value_close = closing(s.value_close_json if as_json else s.value_close, key).strip()
            if as_json and not value_close:  # a JSON value ends where the JSON does (Python-call syntax)
                text = self.json_any()
            else:
                stops = [value_close] if value_close else [s.param_separator.strip(), close, s.key_open.strip()]
                text = self.until(stops)
            self.lit(value_close)
            call.params.append((key, text.removeprefix("\n").removesuffix("\n"), as_json))


def scan(syntax: Syntax, buf: str, pos: int, fresh: bool, final: bool, memo: Memo) -> Scan:
    """The pieces of ``buf[pos:]``: text, and units of calls in ``syntax``."""
    pieces: list[Scanned] = []
    trigger = syntax.trigger if re.search(r"[\w<>|\[\]]{2,}", syntax.trigger) else ""
    openers = tuple(m for m in (trigger, syntax.optional_open) if m)
    while True:
        i = pos
        if fresh:
            while i < len(buf) and (buf[i].isspace() or buf[i] == ";"):
                i += 1
        # no marker opens the calls: an answer that starts with one (JSON, or a name where the prompt opened
        # the block: Functionary v3.2's >>>)
        at_start = fresh and not trigger and i < len(buf) and (buf[i] in "{[" or syntax.layout != "json")
        found = [k for k in (buf.find(m, i) for m in openers) if k >= 0]
        if at_start or found:
            k = i if at_start else min(found)
            if k > pos and not at_start:  # blanks (and Llama's ';') between calls belong to the calls
                pieces.append(buf[pos:k])
            first = pos if at_start else k
            reader = _Reader(syntax, buf, k, final, memo)
            try:
                reader.unit()
            except _Need:
                return pieces, Unit(reader.calls, buf[first:], False), first, fresh and not buf[pos:k].strip(" \t\r\n;")
            except _Cut:
                for call in reader.calls:
                    call.valid_shape = False
                pieces.append(Unit(reader.calls, buf[first:], False))
                return pieces, None, len(buf), False
            except _Broken as broken:
                end = max(broken.end, k + 1)
                pieces.append(buf[first:end])
                pos, fresh = end, False
                continue
            pieces.append(Unit(reader.calls, buf[first : reader.at], True))
            pos, fresh = reader.at, True
            continue
        if fresh and i == len(buf) and not final:
            return pieces, None, pos, fresh  # only blanks so far: a call may still come
        end = len(buf) if final else len(buf) - held_back(buf[i:], openers)
        if end > pos:
            pieces.append(buf[pos:end])
            fresh = fresh and not buf[pos:end].strip(" \t\r\n;")
        return pieces, None, max(end, pos), fresh
