"""Learning a chat template's tool-call and reasoning syntax by rendering probe conversations and diffing them.

The idea of llama.cpp's autoparser (``docs/autoparser.md``): render the same conversation with small
changes (no call / one call / two calls; no, one or two arguments; a string or a number; with and
without ``reasoning_content``), and the text that changes is the syntax. Sentinel names and values
make every piece findable; markers are never cut in half (a diff boundary inside ``<...>`` or
``[ABC]`` moves to the marker's edge).

    learn(render) -> Syntax | None      render(messages, add_generation_prompt, variables) -> text
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from deployer.runtime.chat.families import KEY_HOLE, Syntax

NAME_A, NAME_B = "fn_alpha", "fn_bravo"  # equal lengths: the second call lines up with the first
KEY, KEY2, VALUE, VALUE2, NUMBER = "pk_alpha", "pk_bravo", "VAL_XQ", "VAL_YQ", 73519
CONTENT, REASON = "CONTENT_XQ", "REASON_XQ"
CALL_ID = "call00001"  # nine alphanumerics: Mistral's templates refuse any other form
ID_HOLE = "\x1f"  # where a marker text holds the call's id
PROBE_TOOL = {
    "type": "function",
    "function": {
        "name": NAME_A,
        "description": "probe",
        "parameters": {"type": "object", "properties": {KEY: {"type": "string"}, KEY2: {"type": "string"}}},
    },
}

# reasoning as a content part of type "thinking" (Mistral's [THINK] templates read it only there)
PARTS = [{"type": "thinking", "thinking": REASON}, {"type": "text", "text": CONTENT}]

Render = Callable[[list[dict[str, Any]], bool, dict[str, Any]], str]


class NotLearned(Exception):
    """The probes did not show a consistent syntax."""


# ## Diffs that respect markers


def _inside_marker(text: str, end: int) -> int | None:
    """Where the marker cut by position ``end`` of ``text`` starts (None when ``end`` cuts none)."""
    lt, gt = text.rfind("<", 0, end), text.rfind(">", 0, end)
    if lt > gt and text.find(">", end) >= 0 and "\n" not in text[lt:end]:
        return lt
    start = text.rfind("[", max(0, end - 40), end)
    if start >= 0 and re.fullmatch(r"\[[A-Z_/]*", text[start:end]) and re.match(r"\[[A-Z_/]+\]", text[start:]):
        return start if start < end else None
    return None


def common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    while n > 0:
        cut = _inside_marker(a, n)
        if cut is None or cut >= n:
            break
        n = cut
    return n


def common_suffix(a: str, b: str, limit: int | None = None) -> int:
    n = 0
    top = min(len(a), len(b)) if limit is None else min(len(a), len(b), limit)
    while n < top and a[len(a) - 1 - n] == b[len(b) - 1 - n]:
        n += 1
    while n > 0:  # the suffix must not start inside a marker of either text
        start = len(a) - n
        cut = _inside_marker(a, start)
        if cut is None:
            break
        close = a.find(">", start) if a[cut] == "<" else a.find("]", start)
        n = len(a) - close - 1
    return n


# ## Probes


def _call(name: str, args: dict[str, Any]) -> dict[str, Any]:
    return {"id": CALL_ID, "type": "function", "function": {"name": name, "arguments": args}}


def _conversation(content: Any = "", calls: list[dict[str, Any]] | None = None, **extra: Any) -> list[dict[str, Any]]:
    assistant: dict[str, Any] = {"role": "assistant", "content": content, **extra}
    if calls:
        assistant["tool_calls"] = calls
    return [{"role": "user", "content": "USER_XQ"}, assistant]


def learn(render: Render) -> Syntax:
    """The syntax of a template that shows tools; NotLearned when the probes show none."""

    def r(messages: list[dict[str, Any]], **variables: Any) -> str:
        try:
            return render(messages, False, variables)
        except Exception as exc:
            raise NotLearned(f"a probe did not render ({type(exc).__name__}: {exc})") from exc

    base = r(_conversation(CONTENT))
    one = r(_conversation(calls=[_call(NAME_A, {KEY: VALUE})]))
    start = common_prefix(base, one)
    end = common_suffix(base, one, min(len(base), len(one)) - start)
    r1 = one[start : len(one) - end]
    if r1.count(NAME_A) != 1:
        raise NotLearned("an assistant call renders " + ("without its name" if NAME_A not in r1 else "its name twice"))

    def region(text: str) -> str:
        if not (text.startswith(one[:start]) and text.endswith(one[len(one) - end :])):
            raise NotLearned("the probes differ outside the assistant turn")
        return text[start : len(text) - end]

    try:
        r2 = region(r(_conversation(calls=[_call(NAME_A, {KEY: VALUE}), _call(NAME_B, {KEY: VALUE})])))
    except NotLearned:
        r2 = ""
    reasoning = learn_reasoning(r)
    json_at = _json_object(r1, r1.find(NAME_A))
    try:
        syntax = _learn_json(r1, r2, json_at) if json_at else _learn_tagged(r1, r2, region, r)
    except NotLearned:
        if not r2:
            raise
        # two calls written unlike one call twice (only the first kept, a recipient header): learn from one
        syntax = _learn_json(r1, "", json_at) if json_at else _learn_tagged(r1, "", region, r)
    block_open = syntax.block_open
    if reasoning[1]:  # an empty reasoning block the template writes before calls belongs to the reasoning
        empty = re.match(r"\s*" + re.escape(reasoning[0]) + r"\s*" + re.escape(reasoning[1]) + r"\s*", block_open)
        if reasoning[0] and empty:
            block_open = block_open[empty.end() :]
    block_close = _turn_cut(syntax.block_close, base)
    stop: tuple[str, ...] = ()
    if not block_open.strip() and block_close.strip():  # nothing opened it: the turn's end after calls
        block_close, stop = "", (block_close.strip(),)
    syntax = replace(syntax, block_open=block_open, block_close=block_close, stop=stop,
                     reasoning_open=reasoning[0], reasoning_close=reasoning[1])  # fmt: skip
    content = _content_markers(base, start, len(base) - end)
    if set(content.values()) & set(reasoning):  # a reasoning block the template opens around text: not a wrapper
        content = {}
    return _with_ids(replace(syntax, **content), r)


def _content_markers(base: str, begin: int, end: int) -> dict[str, str]:
    """Markers the template writes around an answer's text only (not around calls): Command R7B's
    <|START_RESPONSE|>...<|END_RESPONSE|>."""
    at = base.find(CONTENT)
    opening, closing = _marker_before(base, at), _marker_after(base, at + len(CONTENT))
    if opening and closing and base.rfind(opening, begin, at) >= 0 and base.find(closing, at, end) >= 0:
        return {"content_open": opening, "content_close": closing}
    return {}


def _turn_cut(block_close: str, base: str) -> str:
    """``block_close`` without the end of the turn that some templates write only after calls."""
    end = _marker_after(base, base.find(CONTENT) + len(CONTENT))
    return block_close[: block_close.find(end)] if end and end in block_close else block_close


def _with_ids(syntax: Syntax, r: Callable[..., str]) -> Syntax:
    """Where the call id is written, a hole; and the id form the template accepts (Mistral: nine alphanumerics)."""
    holes = {}
    for name in ("block_open", "call_open", "name_suffix", "call_close"):
        text = getattr(syntax, name)
        if CALL_ID in text:
            holes[name] = text.replace(CALL_ID, ID_HOLE)
    syntax = replace(syntax, **holes)
    long_id = {"id": "call_Probe0Long0Id", "type": "function", "function": {"name": NAME_A, "arguments": {KEY: VALUE}}}
    try:
        r([*_conversation(calls=[long_id]), {"role": "tool", "tool_call_id": long_id["id"], "content": "ok"}])
    except NotLearned:
        return replace(syntax, call_id_length=len(CALL_ID), call_id_prefix="")
    return syntax


def _json_object(text: str, name_at: int) -> tuple[int, int, Any] | None:
    """The outermost JSON object of ``text`` around ``name_at`` (start, end, value), if the name is JSON."""
    if name_at <= 0 or text[name_at - 1] != '"':
        return None
    decoder = json.JSONDecoder()
    found = None
    for j in range(name_at - 1, -1, -1):
        if text[j] != "{":
            continue
        try:
            value, stop = decoder.raw_decode(text, j)
        except json.JSONDecodeError:
            continue
        if stop > name_at and isinstance(value, dict):
            found = (j, stop, value)
    return found


def _path(value: Any, wanted: Any, at: tuple[str, ...] = ()) -> tuple[str, ...] | None:
    if value == wanted:
        return at
    if isinstance(value, dict):
        for key, inner in value.items():
            if (found := _path(inner, wanted, (*at, key))) is not None:
                return found
    return None


def _frame(before: str, between: str, after: str) -> dict[str, str]:
    """Block and call markers from the text before the first call's core, between two cores, after the last."""
    if not between:  # one call only: everything before is the call's opening
        return {"block_open": "", "call_open": before, "call_close": after, "separator": "", "block_close": ""}
    n = common_suffix(before, between)
    call_open, rest = before[len(before) - n :], between[: len(between) - n]
    m = common_prefix(rest, after)
    return {
        "block_open": before[: len(before) - n],
        "call_open": call_open,
        "call_close": rest[:m],
        "separator": rest[m:],
        "block_close": after[m:],
    }


def _learn_json(r1: str, r2: str, found: tuple[int, int, Any]) -> Syntax:
    j, stop, obj = found
    name_path = _path(obj, NAME_A)
    if name_path is None and list(obj) == [NAME_A]:
        name_path, args_path = (), (NAME_A,)
    else:
        args_path = _path(obj, {KEY: VALUE})
    if name_path is None or args_path is None:
        raise NotLearned("the call's JSON holds no name or no arguments")
    between = ""
    if r2:
        a, b = _json_object(r2, r2.find(NAME_A)), _json_object(r2, r2.find(NAME_B))
        if a is None or b is None or r2[: a[0]] != r1[:j]:
            raise NotLearned("two calls do not render as two objects")
        between = r2[a[1] : b[0]]
    frame = _frame(r1[:j], between, r1[stop:])
    return Syntax("learned", "json", name_path=name_path, args_path=args_path, **frame)


def _learn_tagged(r1: str, r2: str, region: Callable[[str], str], r: Callable[..., str]) -> Syntax:
    at = r1.find(NAME_A)
    before, after1 = r1[:at], r1[at + len(NAME_A) :]
    between, indexed = "", False
    if r2:
        a, b = r2.find(NAME_A), r2.find(NAME_B)
        if a < 0 or b < 0 or r2[:a] != before:
            raise NotLearned("two calls do not render as two")
        between = r2[a + len(NAME_A) : b]
        tail_b = r2[b + len(NAME_B) :]
        if tail_b != after1:
            if re.sub(r"\d", "0", tail_b) != re.sub(r"\d", "0", after1):
                raise NotLearned("the second call is written unlike the first")
            indexed = True
    frame = _frame(before, between, after1)
    rest1 = frame.pop("call_close")  # name suffix + arguments + the call's close
    if frame["call_open"].endswith('"') and rest1.startswith('"') and not re.search(r"=\"$", frame["call_open"]):
        raise NotLearned("the name is a JSON string outside any object")
    key_at = rest1.find(f'"{KEY}"')
    if key_at >= 0 and (brace := rest1.rfind("{", 0, key_at)) >= 0:
        try:
            value, stop = json.JSONDecoder().raw_decode(rest1, brace)
        except json.JSONDecodeError:
            value = None
        if value == {KEY: VALUE}:
            return Syntax("learned", "name-json", name_suffix=rest1[:brace], call_close=rest1[stop:], indexed=indexed,
                          **frame)  # fmt: skip
    if KEY not in rest1 or VALUE not in rest1:
        raise NotLearned("the call's arguments are not in its text")

    def rest_of(args: dict[str, Any]) -> str:
        text = region(r(_conversation(calls=[_call(NAME_A, args)])))
        if not text.startswith(before):
            raise NotLearned("a call's opening changes with its arguments")
        return text[len(before) + len(NAME_A) : len(text) - len(frame["block_close"])]

    rest0 = rest_of({})
    p = common_prefix(rest0, rest1)
    s = common_suffix(rest0, rest1, len(rest0) - p)
    param = rest1[p : len(rest1) - s]
    k, v = param.find(KEY), param.find(VALUE)
    if k < 0 or v < k:
        raise NotLearned("an argument is not written as key then value")
    # a closing marker that repeats the key (MiniMax M3's <city>Paris</city>) holds it as a hole
    value_close = param[v + len(VALUE) :].replace(KEY, KEY_HOLE)
    syntax = Syntax(
        "learned", "tagged", name_suffix=rest1[:p], call_close=rest1[len(rest1) - s :], indexed=indexed,
        key_open=param[:k], key_close=param[k + len(KEY) : v], value_close=value_close, **frame,
    )  # fmt: skip
    number = rest_of({KEY: NUMBER})[p:]
    k2 = number.find(KEY)
    n = number.find(str(NUMBER))
    if k2 >= 0 and n > k2:
        close = number[n + len(str(NUMBER)) : len(number) - len(syntax.call_close)].replace(KEY, KEY_HOLE)
        syntax = replace(syntax, key_close_json=number[k2 + len(KEY) : n], value_close_json=close)
    else:
        syntax = replace(syntax, key_close_json=syntax.key_close, value_close_json=syntax.value_close)
    pair = rest_of({KEY: VALUE, KEY2: VALUE2})[p:]
    second = pair.find(syntax.key_open + KEY2) if syntax.key_open else pair.find(KEY2)
    if pair.startswith(param) and second >= len(param):
        syntax = replace(syntax, param_separator=pair[len(param) : second])
    return _learn_nested(syntax, lambda args: rest_of(args)[p:])


def _nested_text(syntax: Syntax, rest: str) -> str | None:
    """The value text of the one argument KEY in ``rest`` (its element and the call's close), if it reads."""
    param = rest[: len(rest) - len(syntax.call_close)] if rest.endswith(syntax.call_close) else ""
    for key_close in {syntax.key_close, syntax.key_close_json}:
        for value_close in {syntax.value_close, syntax.value_close_json}:
            head, tail = syntax.key_open + KEY + key_close, value_close.replace(KEY_HOLE, KEY)
            if param.startswith(head) and param.endswith(tail) and len(param) >= len(head) + len(tail):
                return param[len(head) : len(param) - len(tail)]
    return None


def _learn_nested(syntax: Syntax, rest_of: Callable[[dict[str, Any]], str]) -> Syntax:
    """Whether objects and arrays are written as nested elements (MiniMax M3), and the key of an array's items."""
    from deployer.runtime.chat.nested import read_elements

    try:
        value = _nested_text(syntax, rest_of({KEY: {KEY2: VALUE2}}))
        items = _nested_text(syntax, rest_of({KEY: [VALUE2, VALUE2]}))
    except NotLearned:
        return syntax
    if value is None or items is None or f'"{KEY2}"' in value:
        return syntax
    inner = syntax.key_open + KEY2 + syntax.key_close + VALUE2 + syntax.value_close.replace(KEY_HOLE, KEY2)
    # the element as the diffs cut it, or shifted by a marker text every element starts with
    leads = [
        inner[len(inner) - n :] for n in range(len(inner)) if inner[len(inner) - n :] + inner[: len(inner) - n] == value
    ]
    if not leads:
        return syntax
    syntax = replace(syntax, nested_lead=leads[0])
    elements = read_elements(syntax, items)
    if elements and len(elements) == 2 and elements[0] == elements[1] and elements[0][1] == VALUE2:
        syntax = replace(syntax, item_key=elements[0][0])
    return syntax


# ## Reasoning


def _marker_before(text: str, at: int) -> str:
    found = re.search(r"(<[^<>\n]+>\w*|\[[A-Z_/]+\])\s*$", text[:at])  # Gemma 4: <|channel>thought
    return found[1] if found else ""


def _marker_after(text: str, at: int) -> str:
    found = re.match(r"\s*(<[^<>\n]+>|\[[A-Z_/]+\])", text[at:])
    return found[1] if found else ""


def learn_reasoning(r: Callable[..., str]) -> tuple[str, str]:
    """(opening, closing) reasoning markers written around ``reasoning_content`` ("", "" when none)."""
    thinking = {"enable_thinking": True, "thinking": True}
    probes: list[tuple[Any, list[dict[str, Any]] | None, dict[str, Any]]] = [
        (CONTENT, None, {}), (CONTENT, None, thinking), ("", [_call(NAME_A, {KEY: VALUE})], {}), (PARTS, None, {}),
    ]  # fmt: skip
    for content, calls, variables in probes:  # some write reasoning only before calls (Command R7B)
        extra = {} if isinstance(content, list) else {"reasoning_content": REASON}
        try:
            text = r(_conversation(content, calls, **extra), **variables)
        except NotLearned:
            continue
        at = text.find(REASON)
        if at < 0:
            continue
        close, opening = _marker_after(text, at + len(REASON)), _marker_before(text, at)
        if not close:
            continue
        try:  # a marker that also opens a turn's plain text is the turn's, not the reasoning's (muse, Kimi K3)
            plain = r(_conversation(CONTENT), **variables)
        except NotLearned:
            plain = ""
        if opening and _marker_before(plain, plain.find(CONTENT)) == opening:
            continue
        return opening, close
    return "", ""


def reasoning_in_parts(r: Callable[..., str], markers: tuple[str, str]) -> bool:
    """The template writes reasoning from a content part of type "thinking" only, never from
    ``reasoning_content`` (Ministral 3 Reasoning): earlier turns' reasoning is passed to it that way.
    The part must render as the reasoning block and nothing else (not a list printed as text)."""
    try:
        plain = r(_conversation(CONTENT))
        as_field, as_part = r(_conversation(CONTENT, reasoning_content=REASON)), r(_conversation(PARTS))
    except NotLearned:
        return False
    block = markers[0] + REASON + markers[1]
    return REASON not in as_field and block in as_part and as_part.replace(block, "", 1) == plain
