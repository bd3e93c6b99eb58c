"""Arguments whose objects and arrays are written as nested tags, not as JSON (MiniMax M3)::

    <number><real>1.5</real><imaginary>-2.5</imaginary></number>    <tags><item>a</item><item>b</item></tags>

The layout is the call's own (``key_open`` KEY ``key_close`` VALUE ``value_close``, one element per key or
per array item); :mod:`deployer.runtime.chat.learn` learns whether a template writes it and the key of an
array's items. A diff cannot tell where one element ends and the next begins when every marker starts with
the same text (M3's ``]<]minimax[>[``): the learned elements may be shifted by ``nested_lead``, which is
moved from the front of a nested value to its end before it is read.
"""

from __future__ import annotations

import json
import re
from typing import Any

from deployer.runtime.chat.families import KEY_HOLE, Syntax

_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


def write_elements(syntax: Syntax, pairs: list[tuple[str, str]]) -> str:
    """Elements (key, text) in the call's tagged layout, shifted as the template writes nested values."""
    text = syntax.param_separator.join(
        syntax.key_open + key + syntax.key_close + value + syntax.value_close.replace(KEY_HOLE, key)
        for key, value in pairs
    )
    lead = syntax.nested_lead or ""
    return lead + text[: len(text) - len(lead)] if lead and text.endswith(lead) else text


def _close_parts(syntax: Syntax) -> tuple[str, str, str]:
    """``value_close`` as (before, the marker holding the key, after): ``]<]minimax[>[``, ``</\\x1e>``, ``]<]minimax[>[``."""
    before, after = syntax.value_close.split(KEY_HOLE, 1) if KEY_HOLE in syntax.value_close else ("", "")
    cut = max(before.rfind("<"), before.rfind("["), 0)
    end = after.find(">") + 1 if ">" in after else (after.find("]") + 1 if "]" in after else 0)
    return before[:cut], before[cut:] + KEY_HOLE + after[:end], after[end:]


def read_elements(syntax: Syntax, text: str) -> list[tuple[str, str]] | None:
    """The (key, text) elements of a nested value; None when it is not written as elements."""
    lead = (syntax.nested_lead or "").strip()
    body = text.strip()
    if lead and body.startswith(lead):
        body = body[len(lead) :] + lead
    opening, closing = syntax.key_open.strip(), syntax.key_close.strip()
    before, core, after = (p.strip() for p in _close_parts(syntax))
    if not opening or KEY_HOLE not in core:
        return None
    out: list[tuple[str, str]] = []
    i = 0
    while True:
        while i < len(body) and body[i].isspace():
            i += 1
        if i == len(body):
            return out
        if out and syntax.param_separator.strip() and body.startswith(syntax.param_separator.strip(), i):
            i += len(syntax.param_separator.strip())
            continue
        if not body.startswith(opening, i):
            return None
        k = body.find(closing, i + len(opening))
        key = body[i + len(opening) : k] if k >= 0 else ""
        if not _NAME.fullmatch(key):
            return None
        start = k + len(closing)
        close, start_tag = core.replace(KEY_HOLE, key), opening + key + closing
        depth, j = 1, start
        while depth:  # the same key may nest (arrays of arrays: <item><item>)
            c, o = body.find(close, j), body.find(start_tag, j)
            if c < 0:
                return None
            depth, j = (depth + 1, o + len(start_tag)) if 0 <= o < c else (depth - 1, c + len(close))
        end = j - len(close)
        if before and not body[:end].rstrip().endswith(before):
            return None
        value = body[start:end].rstrip()
        out.append((key, value[: len(value) - len(before)] if before else value))
        i = j
        if after and body.startswith(after, i):
            i += len(after)


def nested_value(syntax: Syntax, text: str, spec: Any) -> Any:
    """The value of an argument's text, typed by its schema ``spec`` (the text itself when it does not read)."""
    kind = spec.get("type") if isinstance(spec, dict) else None
    kinds = kind if isinstance(kind, list) else [kind]
    if "string" in kinds and not ({"object", "array"} & set(kinds)):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    elements = read_elements(syntax, text) if syntax.nested_lead is not None else None
    if elements is None:  # as written: the schema check that follows rejects a value of the wrong type
        return text
    properties = spec.get("properties", {}) if isinstance(spec, dict) else {}
    items_only = all(key == syntax.item_key for key, _ in elements) if elements else "array" in kinds
    if syntax.item_key and items_only and ("array" in kinds or "object" not in kinds):  # no schema: the tags say
        items = spec.get("items") if isinstance(spec, dict) else None
        return [nested_value(syntax, value, items) for _, value in elements]
    return {key: nested_value(syntax, value, properties.get(key)) for key, value in elements}
