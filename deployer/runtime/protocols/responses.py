"""OpenAI's Responses API (``POST /v1/responses``): decoder, encoder, and the per-container store.

The decoder turns ``input`` items (messages, ``function_call``, ``function_call_output``,
``reasoning``) into chat turns, ``tools`` of type function into chat tools, and the rest of the
body onto :class:`GenerationRequest` through the chat decoder. The encoder turns the parsed answer
into output items (``reasoning``, ``message``, ``function_call``) and, streaming, into the event
sequence the SDK's stream helpers assemble (``response.created`` ... ``response.completed``).

Hosted tools (run by OpenAI, not by a model) cannot run here. ``web_search`` and
``web_search_preview`` are what Codex CLI adds by default: they are left out of the prompt and
reported (the ``x-gguf-deploy-dropped-tools`` header and a log line), so Codex works as it ships.
Every other hosted type is refused with a 400 that names it.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from deployer.runtime.engine.sampling import Delta
from deployer.runtime.errors import ApiError, bad_request
from deployer.runtime.protocols.items import Event, Item, ItemStream, items_of
from deployer.runtime.protocols.openai import BOOKKEEPING, decode_chat
from deployer.runtime.protocols.request import SAMPLING_EXTENSIONS, GenerationRequest, refuse_unknown
from deployer.runtime.protocols.store import ResponseStore

DROPPED_TOOLS = frozenset({"web_search", "web_search_preview"})  # Codex sends them by default: left out
REFUSED_TOOLS = ("file_search", "computer_use_preview", "code_interpreter", "image_generation", "mcp", "local_shell")
FIELDS = BOOKKEEPING | {
    "input",
    "instructions",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "text",
    "reasoning",
    "max_output_tokens",
    "temperature",
    "top_p",
    "stop",
    "stream",
    "stream_options",
    "include",
    "previous_response_id",
    "truncation",
}
# reasoning here is the model's own text, in the clear: there is no encrypted form to include, and
# Codex asks for it with store: false. Other includes (logprobs, image URLs) are a 400.
INCLUDES = frozenset({"reasoning.encrypted_content"})


@dataclass(frozen=True)
class ResponsesBody:
    """A decoded ``/v1/responses`` body."""

    request: GenerationRequest
    conversation: list[dict[str, Any]]  # the chat turns without the instructions (kept for previous_response_id)
    echo: dict[str, Any]  # what the response object repeats of the request
    store: bool
    dropped: tuple[str, ...] = ()  # hosted tools left out


# ## Requests


def decode(body: Any, store: ResponseStore) -> ResponsesBody:
    """A ``/v1/responses`` body as the internal request, or a 400 naming the field."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    params = {key: value for key, value in body.items() if value is not None}
    chat: dict[str, Any] = {key: params.pop(key) for key in sorted(SAMPLING_EXTENSIONS & params.keys())}
    refuse_unknown(params, FIELDS)
    if "input" not in params:
        raise bad_request("input is required: a string or a list of input items", "input")
    history: list[dict[str, Any]] = []
    previous = params.get("previous_response_id")
    if previous is not None:
        if not isinstance(previous, str):
            raise bad_request("previous_response_id must be a string", "previous_response_id")
        _, history = store.get(previous, "previous_response_id")
    conversation = [*history, *_input(params["input"])]
    instructions = params.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise bad_request("instructions must be a string", "instructions")
    chat["messages"] = ([{"role": "system", "content": instructions}] if instructions else []) + conversation
    tools, dropped = _tools(params.get("tools"))
    if tools:
        chat["tools"] = tools
    if "tool_choice" in params:
        chat["tool_choice"] = _tool_choice(params["tool_choice"])
    for ours, theirs in (("max_output_tokens", "max_tokens"), ("temperature", None), ("top_p", None), ("stop", None)):
        if ours in params:
            chat[theirs or ours] = params[ours]
    for key in ("parallel_tool_calls", "stream", "user"):
        if key in params:
            chat[key] = params[key]
    text = params.get("text")
    if text is not None:
        chat["response_format"] = _format(text)
    reasoning = params.get("reasoning")
    if reasoning is not None:
        if not isinstance(reasoning, dict):
            raise bad_request('reasoning must be an object like {"effort": "low"}', "reasoning")
        refuse_unknown(reasoning, frozenset({"effort", "summary", "generate_summary"}), "reasoning.")
        if reasoning.get("effort") is not None:
            chat["reasoning_effort"] = reasoning["effort"]
    include = params.get("include") or []
    if not isinstance(include, list) or any(i not in INCLUDES for i in include):
        raise bad_request(f"include: each entry must be one of {', '.join(sorted(INCLUDES))}", "include")
    if params.get("truncation", "disabled") not in ("auto", "disabled"):
        raise bad_request("truncation must be 'auto' or 'disabled'", "truncation")
    store_it = params.get("store", True)
    if not isinstance(store_it, bool):
        raise bad_request("store must be true or false", "store")
    try:
        request = decode_chat(chat)
    except ApiError as error:
        raise _renamed(error) from error
    echo = {
        "instructions": instructions,
        "metadata": params.get("metadata") or {},
        "max_output_tokens": params.get("max_output_tokens"),
        "parallel_tool_calls": request.parallel_tool_calls,
        "previous_response_id": previous,
        "reasoning": {"effort": (reasoning or {}).get("effort"), "summary": None},
        "temperature": request.temperature,
        "top_p": request.top_p,
        "text": {"format": (text or {}).get("format") or {"type": "text"}},
        "tool_choice": params.get("tool_choice", "auto"),
        "tools": [t for t in params.get("tools") or [] if t.get("type") not in DROPPED_TOOLS],
        "truncation": params.get("truncation", "disabled"),
        "user": params.get("user"),
        "store": store_it,
    }
    return ResponsesBody(request, conversation, echo, store_it, tuple(dropped))


_CHAT_NAMES = {"messages": "input", "max_tokens": "max_output_tokens", "response_format": "text.format"}


def _renamed(error: ApiError) -> ApiError:
    """An error of the chat decoder, with the field named as Responses names it."""
    param = _CHAT_NAMES.get(error.param or "", error.param)
    message = error.message
    for chat, ours in _CHAT_NAMES.items():
        message = message.replace(chat, ours)
    return ApiError(error.status, message, type=error.type, code=error.code, param=param, headers=error.headers)


def _text(content: Any, where: str) -> str:
    """The text of a message's content: a string, or input_text / output_text / refusal parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where} must be a string or a list of content parts", "input")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text", "summary_text", "reasoning_text"):
            value = part.get("text")
        elif kind == "refusal":
            value = part.get("refusal")
        else:
            raise bad_request(
                f"{where}[{j}]: content of type {kind!r} is not supported here (input_text; input_image in a message)",
                "input",
                "unsupported_content_type",
            )
        if not isinstance(value, str):
            raise bad_request(f"{where}[{j}]: its text must be a string", "input")
        texts.append(value)
    return "\n".join(texts)


def _input(value: Any) -> list[dict[str, Any]]:
    """``input`` as chat turns: assistant text, reasoning and calls of one turn become one assistant message."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise bad_request("input must be a string or a list of input items", "input")
    out: list[dict[str, Any]] = []
    reasoning: str | None = None
    open_turn = False  # the last message is an assistant turn that later calls may join
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad_request(f"{where} must be an input item object", "input")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise bad_request(f"{where}.role must be user, system, developer or assistant, got {role!r}", "input")
            message: dict[str, Any] = {"role": role, "content": _text(item.get("content"), f"{where}.content")}
            if role == "assistant" and reasoning is not None:
                message["reasoning_content"], reasoning = reasoning, None
            out.append(message)
            open_turn = role == "assistant"
        elif kind == "function_call":
            for key in ("call_id", "name", "arguments"):
                if not isinstance(item.get(key), str):
                    raise bad_request(f"{where}.{key} must be a string", "input")
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
            }
            if not open_turn:
                out.append({"role": "assistant", "content": None})
                if reasoning is not None:
                    out[-1]["reasoning_content"], reasoning = reasoning, None
                open_turn = True
            out[-1].setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise bad_request(f"{where}.call_id must be a string", "input")
            output = _text(item.get("output"), f"{where}.output")
            out.append({"role": "tool", "tool_call_id": item["call_id"], "content": output})
            open_turn = False
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            reasoning = _text(parts, f"{where}.content")  # back to the template, as chat's reasoning_content
        else:
            raise bad_request(
                f"{where}.type {kind!r} is not supported here (message, function_call, function_call_output, "
                "reasoning)",
                "input",
            )
    if not out:
        raise bad_request("input must hold at least one message", "input")
    return out


def _tools(value: Any) -> tuple[list[dict[str, Any]], list[str]]:
    if value is None:
        return [], []
    if not isinstance(value, list):
        raise bad_request("tools must be a list of tool objects", "tools")
    tools, dropped = [], []
    for j, tool in enumerate(value):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind in DROPPED_TOOLS:
            dropped.append(kind)
            continue
        if kind != "function":
            hosted = kind in REFUSED_TOOLS or (isinstance(kind, str) and kind.startswith(REFUSED_TOOLS))
            why = "a hosted tool OpenAI runs, which this server cannot" if hosted else "not supported"
            raise bad_request(f"tools[{j}].type {kind!r} is {why} (only 'function' tools)", "tools", "unsupported_tool")
        function = {key: tool[key] for key in ("name", "description", "parameters", "strict") if key in tool}
        refuse_unknown(tool, frozenset({"type", "name", "description", "parameters", "strict"}), f"tools[{j}].")
        tools.append({"type": "function", "function": function})
    return tools, dropped


def _tool_choice(choice: Any) -> Any:
    if isinstance(choice, str):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    kind = choice.get("type") if isinstance(choice, dict) else None
    raise bad_request(
        f"tool_choice {kind or choice!r} is not supported ('auto', 'none', 'required' or a named function)",
        "tool_choice",
    )


def _format(text: Any) -> dict[str, Any]:
    if not isinstance(text, dict):
        raise bad_request('text must be an object like {"format": {"type": "text"}}', "text")
    refuse_unknown(text, frozenset({"format", "verbosity"}), "text.")
    spec = text.get("format") or {"type": "text"}
    if not isinstance(spec, dict):
        raise bad_request("text.format must be an object", "text.format")
    if spec.get("type") == "json_schema":
        schema = {"name": spec.get("name", "response"), "schema": spec.get("schema"), "strict": spec.get("strict")}
        return {"type": "json_schema", "json_schema": schema}
    if spec.get("type") in ("text", "json_object"):
        return {"type": spec["type"]}
    raise bad_request(
        f"text.format.type {spec.get('type')!r} is not supported (text, json_object, json_schema)", "text.format"
    )


# ## Responses


@dataclass
class ResponsesEncoder:
    """The answer as a Response object, or (streaming) as Responses events with sequence numbers."""

    call: ResponsesBody
    parser: Any  # deployer.runtime.chat.parser.ChatParser
    model_name: str
    count_tokens: Callable[[str], int]
    on_done: Callable[[dict[str, Any], list[dict[str, Any]]], None] | None = None
    id: str = field(default_factory=lambda: f"resp_{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))
    _text: str = ""
    _finish: str | None = None
    _seq: int = 0
    _started: bool = False
    _items: ItemStream = field(default_factory=ItemStream)
    _ids: dict[int, str] = field(default_factory=dict)

    # -- the whole answer

    def add(self, pieces: list[Delta]) -> None:
        for piece in pieces:
            self._text += piece.text
            self._finish = piece.finish_reason or self._finish

    def result(self, tally: Any) -> dict[str, Any]:
        self.parser.feed(self._text)
        _held, message, override = self.parser.finish()
        self._finish = override or self._finish
        response = self._response("completed", [self._item(item) for item in items_of(message)], tally)
        self._done(response)
        return response

    # -- streaming

    def events(self, pieces: list[Delta]) -> bytes:
        out = b""
        if not self._started:
            self._started = True
            head = self._response("in_progress", [], None)
            out += self._event("response.created", response=head) + self._event("response.in_progress", response=head)
        for piece in pieces:
            if piece.text:
                out += self._item_events(self._items.feed(self.parser.feed(piece.text)))
            if piece.finish_reason is not None:
                held, _message, override = self.parser.finish()
                self._finish = override or piece.finish_reason
                out += self._item_events(self._items.feed(held) + self._items.close())
        return out

    def error_event(self, error: ApiError) -> bytes:
        response = self._response("failed", [self._item(i) for i in self._items.items], None)
        response["error"] = {"code": error.code or error.type, "message": error.message}
        return self._event("response.failed", response=response)

    def end(self, tally: Any) -> bytes:
        response = self._response("completed", [self._item(i) for i in self._items.items], tally)
        self._done(response)
        kind = "response.completed" if response["status"] == "completed" else "response.incomplete"
        return self._event(kind, response=response)

    def _item_events(self, events: list[Event]) -> bytes:
        out = b""
        for what, item, text in events:
            at = {"output_index": item.index}
            if what == "open":
                out += self._event("response.output_item.added", **at, item=self._item(item, "in_progress"))
                if item.kind != "call":
                    part = self._part(item, "")
                    out += self._event("response.content_part.added", **at, **self._where(item), part=part)
            elif what == "delta":
                kind = {"text": "response.output_text.delta", "reasoning": "response.reasoning_text.delta"}
                extra = {"logprobs": []} if item.kind == "text" else {}
                if item.kind == "call":
                    out += self._event(
                        "response.function_call_arguments.delta", **at, item_id=self._id(item), delta=text
                    )
                else:
                    out += self._event(kind[item.kind], **at, **self._where(item), delta=text, **extra)
            else:
                if item.kind == "call":
                    done = {"item_id": self._id(item), "name": item.name, "arguments": item.text}
                    out += self._event("response.function_call_arguments.done", **at, **done)
                else:
                    kind = {"text": "response.output_text.done", "reasoning": "response.reasoning_text.done"}
                    extra = {"logprobs": []} if item.kind == "text" else {}
                    out += self._event(kind[item.kind], **at, **self._where(item), text=item.text, **extra)
                    part = self._part(item, item.text)
                    out += self._event("response.content_part.done", **at, **self._where(item), part=part)
                out += self._event("response.output_item.done", **at, item=self._item(item))
        return out

    def _event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()

    # -- objects

    def _id(self, item: Item) -> str:
        prefix = {"text": "msg", "reasoning": "rs", "call": "fc"}[item.kind]
        return self._ids.setdefault(item.index, f"{prefix}_{uuid.uuid4().hex}")

    def _where(self, item: Item) -> dict[str, Any]:
        return {"item_id": self._id(item), "content_index": 0}

    @staticmethod
    def _part(item: Item, text: str) -> dict[str, Any]:
        if item.kind == "reasoning":
            return {"type": "reasoning_text", "text": text}
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def _item(self, item: Item, status: str = "completed") -> dict[str, Any]:
        done = status == "completed"
        if item.kind == "call":
            return {"id": self._id(item), "type": "function_call", "status": status, "call_id": item.call_id,
                    "name": item.name, "arguments": item.text if done else ""}  # fmt: skip
        parts = [self._part(item, item.text)] if done else []
        if item.kind == "reasoning":
            return {"id": self._id(item), "type": "reasoning", "summary": [], "content": parts,
                    "encrypted_content": None, "status": status}  # fmt: skip
        return {"id": self._id(item), "type": "message", "role": "assistant", "status": status, "content": parts}

    def _response(self, status: str, output: list[dict[str, Any]], tally: Any) -> dict[str, Any]:
        incomplete = None
        if status == "completed" and self._finish == "length":
            status, incomplete = "incomplete", {"reason": "max_output_tokens"}
        usage = None
        if tally is not None:
            reasoning = sum(self.count_tokens(part["text"]) for o in output if o["type"] == "reasoning"
                            for part in o["content"])  # fmt: skip
            usage = {
                "input_tokens": tally.prompt_tokens,
                # every prompt token not read from the cache is written to it (the slot keeps it for the next turn)
                "input_tokens_details": {
                    "cached_tokens": tally.cached_tokens,
                    "cache_write_tokens": tally.prompt_tokens - tally.cached_tokens,
                },
                "output_tokens": tally.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": min(reasoning, tally.completion_tokens)},
                "total_tokens": tally.prompt_tokens + tally.completion_tokens,
            }
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": None,
            "incomplete_details": incomplete,
            "model": self.model_name,
            "output": output,
            "usage": usage,
            **self.call.echo,
        }

    def _done(self, response: dict[str, Any]) -> None:
        if self.on_done is None:
            return
        said: list[dict[str, Any]] = []  # the answer as chat turns, for the next previous_response_id
        turn: dict[str, Any] = {"role": "assistant", "content": None}
        for item in response["output"]:
            if item["type"] == "reasoning":
                turn["reasoning_content"] = "".join(p["text"] for p in item["content"])
            elif item["type"] == "message":
                turn["content"] = "".join(p["text"] for p in item["content"])
            else:
                call = {"name": item["name"], "arguments": item["arguments"]}
                turn.setdefault("tool_calls", []).append({"id": item["call_id"], "type": "function", "function": call})
        if turn.get("content") is not None or turn.get("tool_calls"):
            said.append(turn)
        self.on_done(response, [*self.call.conversation, *said])
