"""Anthropic's Messages API (``POST /v1/messages``, ``/v1/messages/count_tokens``): decoder, encoder, errors.

Content blocks (``text``, ``tool_use``, ``tool_result``, ``thinking``) become chat turns; ``tools``
with ``input_schema`` become chat tools; ``thinking`` becomes the template's thinking switch. The
answer goes back as content blocks (``thinking``, ``text``, ``tool_use``) with Anthropic's
``stop_reason``, or as its event sequence (message_start ... message_stop). Errors have Anthropic's
shape; a full queue is 529 ``overloaded_error``, as Anthropic answers when it has no capacity.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from starlette.responses import JSONResponse

from deployer.runtime.engine.sampling import Delta
from deployer.runtime.errors import ApiError, bad_request
from deployer.runtime.protocols.items import Event, Item, ItemStream, arguments_object, items_of
from deployer.runtime.protocols.openai import decode_chat
from deployer.runtime.protocols.request import SAMPLING_EXTENSIONS, GenerationRequest, refuse_unknown

FIELDS = frozenset(
    {
        "model",
        "messages",
        "system",
        "max_tokens",
        "stop_sequences",
        "stream",
        "temperature",
        "top_p",
        "top_k",
        "tools",
        "tool_choice",
        "thinking",
        "output_config",
        # about the caller, or Anthropic's own placement and caching (this server caches every prompt): accepted
        "metadata",
        "service_tier",
        "cache_control",
        "inference_geo",
        "speed",
        "user_profile_id",
        "workspace_id",
    }
)
EFFORTS = {"low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "high"}
COUNT_FIELDS = frozenset({"model", "messages", "system", "tools", "tool_choice", "thinking"})
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}
OVERLOADED = 529  # Anthropic's status when it cannot take more requests


# ## Errors


def error_status(error: ApiError) -> int:
    """The status Anthropic would answer: a full queue (the engine's 429) is 529 overloaded."""
    return OVERLOADED if error.code == "server_busy" else error.status


def error_body(error: ApiError) -> dict[str, Any]:
    status = error_status(error)
    kind = ERROR_TYPES.get(status, "overloaded_error" if status == 503 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": error.message}}


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error_body(error), status_code=error_status(error), headers=error.headers)


# ## Requests


def decode(body: Any, *, counting: bool = False) -> GenerationRequest:
    """A ``/v1/messages`` body (or ``count_tokens``'s) as the internal request, or a 400 naming the field."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    params = {key: value for key, value in body.items() if value is not None}
    chat: dict[str, Any] = {}
    if not counting:
        chat = {key: params.pop(key) for key in sorted(SAMPLING_EXTENSIONS & params.keys())}
    refuse_unknown(params, COUNT_FIELDS if counting else FIELDS)
    if not counting:
        max_tokens = params.get("max_tokens")
        if max_tokens is None:
            raise bad_request("max_tokens: Field required", "max_tokens")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise bad_request(f"max_tokens must be an integer of at least 1, got {max_tokens!r}", "max_tokens")
        chat["max_tokens"] = max_tokens
        temperature = params.get("temperature")
        if temperature is not None and (
            isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 1
        ):
            raise bad_request("temperature must be a number between 0 and 1", "temperature")
        for key in ("temperature", "top_p", "top_k", "stream"):
            if key in params:
                chat[key] = params[key]
        stops = params.get("stop_sequences")
        if stops is not None:
            if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
                raise bad_request("stop_sequences must be a list of strings", "stop_sequences")
            chat["stop"] = stops
        metadata = params.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise bad_request("metadata must be an object", "metadata")
    messages = params.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages: a non-empty list of {role, content} is required", "messages")
    chat["messages"] = _system(params.get("system")) + [
        turn for i, message in enumerate(messages) for turn in _turns(message, i)
    ]
    tools = _tools(params.get("tools"))
    if tools:
        chat["tools"] = tools
    if "tool_choice" in params:
        _tool_choice(params["tool_choice"], chat)
    if "output_config" in params:
        _output_config(params["output_config"], chat)
    thinking = params.get("thinking")
    if thinking is not None:
        given = chat.get("chat_template_kwargs", {})  # the explicit form wins; not an object: refused below
        chat["chat_template_kwargs"] = {**_thinking(thinking), **given} if isinstance(given, dict) else given
    return decode_chat(chat)


def _system(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if isinstance(value, str):
        return [{"role": "system", "content": value}] if value else []
    if not isinstance(value, list):
        raise bad_request("system must be a string or a list of text blocks", "system")
    texts = []
    for j, block in enumerate(value):
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise bad_request(f'system[{j}] must be a text block: {{"type": "text", "text": ...}}', "system")
        texts.append(block["text"])
    return [{"role": "system", "content": "\n".join(texts)}]


def _turns(message: Any, i: int) -> list[dict[str, Any]]:
    """One Anthropic message as chat turns: tool results become tool messages, tool uses tool calls."""
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise bad_request(f"{where} must be an object with role and content", "messages")
    refuse_unknown(message, frozenset({"role", "content"}), f"{where}.")
    role = message.get("role")
    if role not in ("user", "assistant"):
        raise bad_request(f"{where}.role must be 'user' or 'assistant', got {role!r}", "messages")
    content = message.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or a list of content blocks", "messages")
    texts: list[str] = []
    results: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    reasoning: list[str] = []
    for j, block in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "tool_result" and role == "user":
            if not isinstance(block.get("tool_use_id"), str):
                raise bad_request(f"{at}.tool_use_id must be a string", "messages")
            text = _result_text(block.get("content", ""), at)
            if block.get("is_error"):
                text = f"Error: {text}"  # templates have no error flag: the text says it
            results.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": text})
        elif kind == "tool_use" and role == "assistant":
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                raise bad_request(f"{at}: a tool_use block needs a string id and name", "messages")
            if not isinstance(block.get("input"), dict):
                raise bad_request(f"{at}.input must be an object", "messages")
            function = {"name": block["name"], "arguments": json.dumps(block["input"])}
            calls.append({"id": block["id"], "type": "function", "function": function})
        elif kind == "thinking" and role == "assistant":
            if not isinstance(block.get("thinking"), str):
                raise bad_request(f"{at}.thinking must be a string", "messages")
            reasoning.append(block["thinking"])
        elif kind == "redacted_thinking" and role == "assistant":
            pass  # another model's encrypted reasoning: accepted, unreadable here
        else:
            raise bad_request(
                f"{at}: a block of type {kind!r} is not supported in a {role} message "
                "(text, tool_use, tool_result, thinking)",
                "messages",
                "unsupported_content_type",
            )
    if role == "user":
        return results + ([{"role": "user", "content": "\n".join(texts)}] if texts or not results else [])
    turn: dict[str, Any] = {"role": "assistant", "content": "\n".join(texts) if texts or not calls else None}
    if calls:
        turn["tool_calls"] = calls
    if reasoning:
        turn["reasoning_content"] = "\n".join(reasoning)
    return [turn]


def _result_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or a list of text blocks", "messages")
    texts = []
    for block in content:
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise bad_request(f"{where}.content: only text blocks are supported in a tool result", "messages")
        texts.append(block["text"])
    return "\n".join(texts)


def _tools(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise bad_request("tools must be a list", "tools")
    out = []
    for j, tool in enumerate(value):
        if not isinstance(tool, dict):
            raise bad_request(f"tools[{j}] must be an object", "tools")
        kind = tool.get("type", "custom")
        if kind != "custom":  # web_search_20250305, bash_20250124, text_editor_...: run by Anthropic
            raise bad_request(
                f"tools[{j}].type {kind!r} is a server tool Anthropic runs, which this server cannot (custom tools only)",
                "tools",
            )
        refuse_unknown(
            tool, frozenset({"type", "name", "description", "input_schema", "cache_control"}), f"tools[{j}]."
        )
        if not isinstance(tool.get("input_schema"), dict):
            raise bad_request(f"tools[{j}].input_schema must be a JSON schema object", "tools")
        function = {"name": tool.get("name"), "parameters": tool["input_schema"]}
        if tool.get("description") is not None:
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: Any, chat: dict[str, Any]) -> None:
    if not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "tool", "none"):
        raise bad_request('tool_choice must be {"type": "auto" | "any" | "tool" | "none"}', "tool_choice")
    refuse_unknown(choice, frozenset({"type", "name", "disable_parallel_tool_use"}), "tool_choice.")
    kind = choice["type"]
    if kind == "tool":
        chat["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    else:
        chat["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[kind]
    if choice.get("disable_parallel_tool_use") is not None and chat.get("tools"):
        chat["parallel_tool_calls"] = not choice["disable_parallel_tool_use"]


def _output_config(value: Any, chat: dict[str, Any]) -> None:
    """``output_config``: ``effort`` as the reasoning effort, ``format`` (a JSON schema) as the answer's format."""
    if not isinstance(value, dict):
        raise bad_request('output_config must be an object like {"effort": "low"}', "output_config")
    refuse_unknown(value, frozenset({"effort", "format"}), "output_config.")
    effort = value.get("effort")
    if effort is not None:
        if effort not in EFFORTS:
            raise bad_request(f"output_config.effort must be one of {', '.join(EFFORTS)}", "output_config")
        chat["reasoning_effort"] = EFFORTS[effort]
    spec = value.get("format")
    if spec is not None:
        if not isinstance(spec, dict) or spec.get("type") != "json_schema" or not isinstance(spec.get("schema"), dict):
            raise bad_request('output_config.format must be {"type": "json_schema", "schema": {...}}', "output_config")
        chat["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": spec["schema"]}}


def _thinking(value: Any) -> dict[str, Any]:
    """``thinking`` as the template's switches: ``enable_thinking`` and ``thinking`` (what templates read)."""
    if not isinstance(value, dict) or value.get("type") not in ("enabled", "disabled", "adaptive"):
        raise bad_request(
            'thinking must be {"type": "enabled", "budget_tokens": N} or {"type": "disabled"}', "thinking"
        )
    refuse_unknown(value, frozenset({"type", "budget_tokens"}), "thinking.")
    enabled = value["type"] != "disabled"
    budget = value.get("budget_tokens")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        raise bad_request("thinking.budget_tokens must be a positive integer", "thinking")
    return {"enable_thinking": enabled, "thinking": enabled}


# ## Responses


@dataclass
class MessagesEncoder:
    """The answer as an Anthropic message, or (streaming) as its event sequence."""

    parser: Any  # deployer.runtime.chat.parser.ChatParser
    model_name: str
    stops: tuple[str, ...]  # the request's stop_sequences
    tally: Any  # the job's token counts (filled in before the first piece arrives)
    id: str = field(default_factory=lambda: f"msg_{uuid.uuid4().hex}")
    _text: str = ""
    _finish: str | None = None
    _stop: str | None = None
    _started: bool = False
    _items: ItemStream = field(default_factory=ItemStream)

    def add(self, pieces: list[Delta]) -> None:
        for piece in pieces:
            self._text += piece.text
            self._ended(piece)

    def _ended(self, piece: Delta) -> None:
        if piece.finish_reason is not None:
            self._finish, self._stop = piece.finish_reason, piece.stop

    def result(self, tally: Any) -> dict[str, Any]:
        self.parser.feed(self._text)
        _held, message, override = self.parser.finish()
        self._finish = override or self._finish
        blocks = [b for b in (self._block(item) for item in items_of(message)) if b is not None]
        return {**self._message(blocks), **self._reason(), "usage": self._usage(tally)}

    def events(self, pieces: list[Delta]) -> bytes:
        out = b""
        if not self._started:
            self._started = True
            usage = {**self._usage(self.tally), "output_tokens": 0}
            out += self._event("message_start", message={**self._message([]), "stop_reason": None,
                                                         "stop_sequence": None, "usage": usage})  # fmt: skip
            out += self._event("ping")
        for piece in pieces:
            if piece.text:
                out += self._item_events(self._items.feed(self.parser.feed(piece.text)))
            if piece.finish_reason is not None:
                held, _message, override = self.parser.finish()
                self._ended(piece)
                self._finish = override or self._finish
                out += self._item_events(self._items.feed(held) + self._items.close())
        return out

    def error_event(self, error: ApiError) -> bytes:
        return self._event("error", error=error_body(error)["error"])

    def end(self, tally: Any) -> bytes:
        delta = self._event("message_delta", delta=self._reason(), usage=self._usage(tally))
        return delta + self._event("message_stop")

    def _item_events(self, events: list[Event]) -> bytes:
        out = b""
        for what, item, text in events:
            if what == "open":
                start = {"text": {"type": "text", "text": ""}, "reasoning": {"type": "thinking", "thinking": "", "signature": ""},
                         "call": {"type": "tool_use", "id": item.call_id, "name": item.name, "input": {}}}  # fmt: skip
                out += self._event("content_block_start", index=item.index, content_block=start[item.kind])
            elif what == "delta":
                delta = {"text": {"type": "text_delta", "text": text}, "reasoning": {"type": "thinking_delta", "thinking": text},
                         "call": {"type": "input_json_delta", "partial_json": text}}[item.kind]  # fmt: skip
                out += self._event("content_block_delta", index=item.index, delta=delta)
            else:
                if item.kind == "reasoning":  # no signature: the thinking is this server's own, in the clear
                    out += self._event(
                        "content_block_delta", index=item.index, delta={"type": "signature_delta", "signature": ""}
                    )
                out += self._event("content_block_stop", index=item.index)
        return out

    @staticmethod
    def _event(kind: str, **fields: Any) -> bytes:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields}, separators=(',', ':'))}\n\n".encode()

    def _message(self, blocks: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model_name, "content": blocks}

    def _reason(self) -> dict[str, Any]:
        if self._finish == "tool_calls":
            return {"stop_reason": "tool_use", "stop_sequence": None}
        if self._finish == "length":
            return {"stop_reason": "max_tokens", "stop_sequence": None}
        if self._stop is not None and self._stop in self.stops:
            return {"stop_reason": "stop_sequence", "stop_sequence": self._stop}
        return {"stop_reason": "end_turn", "stop_sequence": None}

    @staticmethod
    def _usage(tally: Any) -> dict[str, Any]:
        return {
            "input_tokens": tally.prompt_tokens - tally.cached_tokens,  # Anthropic counts cache reads apart
            "cache_read_input_tokens": tally.cached_tokens,
            "cache_creation_input_tokens": 0,
            "output_tokens": tally.completion_tokens,
        }

    @staticmethod
    def _block(item: Item) -> dict[str, Any] | None:
        if item.kind == "text":
            return {"type": "text", "text": item.text}
        if item.kind == "reasoning":
            return {"type": "thinking", "thinking": item.text, "signature": ""}
        arguments = arguments_object(item.text)
        if arguments is None:  # a call cut off by max_tokens
            return None
        return {"type": "tool_use", "id": item.call_id, "name": item.name, "input": arguments}
