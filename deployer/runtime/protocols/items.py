"""The chat parser's deltas as a sequence of output items: what the Responses and Messages encoders share.

The parser (``deployer.runtime.chat.parser``) settles an answer into ``reasoning_content``,
``content`` and ``tool_calls`` deltas. Agent protocols show an answer as items (Responses) or content
blocks (Messages) that each open, grow and close, in order. :class:`ItemStream` does that
bookkeeping once; each encoder only names the events.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["reasoning", "text", "call"]


@dataclass
class Item:
    """One output item: reasoning, text, or a tool call."""

    kind: Kind
    index: int  # its place in the output
    text: str = ""  # the reasoning, the text, or a call's arguments
    call_id: str = ""
    name: str = ""
    done: bool = False


Event = tuple[Literal["open", "delta", "close"], Item, str]


class ItemStream:
    """Deltas in, item events out: ``("open", item, "")``, ``("delta", item, text)``, ``("close", item, "")``."""

    def __init__(self) -> None:
        self.items: list[Item] = []
        self._open: Item | None = None
        self._calls: dict[int, Item] = {}  # the parser's call index -> its item

    def feed(self, deltas: list[dict[str, Any]]) -> list[Event]:
        out: list[Event] = []
        for delta in deltas:
            if delta.get("reasoning_content"):
                out += self._grow("reasoning", delta["reasoning_content"])
            elif delta.get("content"):
                out += self._grow("text", delta["content"])
            for call in delta.get("tool_calls") or ():
                function = call.get("function") or {}
                if "id" in call:  # a call's first delta
                    out += self._close()
                    item = Item("call", len(self.items), call_id=call["id"], name=function.get("name", ""))
                    self.items.append(item)
                    self._calls[call["index"]] = self._open = item
                    out.append(("open", item, ""))
                item = self._calls[call["index"]]
                if function.get("arguments"):
                    item.text += function["arguments"]
                    out.append(("delta", item, function["arguments"]))
        return out

    def close(self) -> list[Event]:
        """The events that close what is still open (at the end of the answer)."""
        return self._close()

    def _grow(self, kind: Kind, text: str) -> list[Event]:
        out: list[Event] = []
        if self._open is None or self._open.kind != kind:
            out += self._close()
            self._open = Item(kind, len(self.items))
            self.items.append(self._open)
            out.append(("open", self._open, ""))
        self._open.text += text
        out.append(("delta", self._open, text))
        return out

    def _close(self) -> list[Event]:
        item, self._open = self._open, None
        if item is None:
            return []
        item.done = True
        return [("close", item, "")]


def items_of(message: dict[str, Any]) -> list[Item]:
    """The items of a whole parsed message (a non-streamed answer): reasoning, text, then calls."""
    items: list[Item] = []
    if message.get("reasoning_content"):
        items.append(Item("reasoning", len(items), message["reasoning_content"], done=True))
    if message.get("content"):
        items.append(Item("text", len(items), message["content"], done=True))
    for call in message.get("tool_calls") or ():
        function = call["function"]
        items.append(Item("call", len(items), function["arguments"], call["id"], function["name"], done=True))
    return items


def arguments_object(text: str) -> dict[str, Any] | None:
    """A call's arguments as the object they are, or None when they are not a JSON object (cut short)."""
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None
