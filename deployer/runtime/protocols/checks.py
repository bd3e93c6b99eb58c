"""The OpenAI wire protocol, as far as the runtime needs it: errors, and requests made plain.

Pure functions of JSON values (no llama.cpp, no I/O), so they are tested without a model.

Today's SDKs send many shapes of one request: the ``developer`` role, message content as a list of
parts, ``max_completion_tokens``, ``stream_options``, ``response_format: {type: json_schema}``,
token-array prompts. ``normalize_*`` makes each request plain, or raises :class:`ApiError` (a 4xx)
naming the field; ``deployer.runtime.protocols.openai`` maps the plain form onto the one typed
request of every protocol.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Literal

from deployer.runtime.errors import bad_request

MAX_N = 8  # choices per request: each one takes a slot of its own
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's own limit
ROLES = ("system", "developer", "user", "assistant", "tool", "function")


@dataclass(frozen=True)
class PlainBody:
    """One generation request, made plain.

    ``params`` is the rest of the body, for ``deployer.runtime.protocols.openai`` to map.
    """

    kind: Literal["chat", "completion"]
    params: dict[str, Any]
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    json_schema: dict[str, Any] | None = None  # response_format json_schema (or json_object with a schema)
    json_object: bool = False  # response_format json_object: any JSON
    prompt_tokens: list[int] | None = None  # a token-array prompt (completions)


@dataclass(frozen=True)
class EmbeddingBody:
    """One embeddings request, made plain."""

    inputs: list[str]
    base64: bool = False
    dimensions: int | None = None


# ## Bodies


def parse_json(data: bytes) -> Any:
    """Strict JSON: no NaN or Infinity, no nesting deep enough to exhaust the stack."""

    def reject(constant: str) -> Any:
        raise ValueError(f"{constant} is not valid JSON")

    try:
        return json.loads(data.decode("utf-8"), parse_constant=reject)  # RFC 8259: UTF-8 only
    except json.JSONDecodeError as exc:
        raise bad_request(
            f"the request body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from exc
    except UnicodeDecodeError as exc:
        raise bad_request("the request body is not UTF-8 text") from exc
    except RecursionError as exc:
        raise bad_request("the request body is nested too deeply") from exc
    except ValueError as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from exc


# ## Shared checks


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, not {_json_type(body)}")
    # null means "the default" in OpenAI's API; the stock types reject None for most fields
    return {key: value for key, value in body.items() if value is not None}


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number"}
    if value is None:
        return "null"
    return names.get(type(value), "a number" if isinstance(value, float) else type(value).__name__)


def _positive_int(params: dict[str, Any], key: str, *, upper: int | None = None) -> int | None:
    value = params.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"{key} must be an integer, got {_json_type(value)}", key)
    if value < 1:
        raise bad_request(f"{key} must be at least 1, got {value}", key)
    if upper is not None and value > upper:
        raise bad_request(f"{key} must be at most {upper}, got {value}", key)
    return value


def _number(params: dict[str, Any], key: str, low: float, high: float) -> None:
    value = params.get(key)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad_request(f"{key} must be a number, got {_json_type(value)}", key)
    if not low <= value <= high:
        raise bad_request(f"{key} must be between {low:g} and {high:g}, got {value:g}", key)


def _common(params: dict[str, Any]) -> tuple[int, bool, bool]:
    """Checks shared by chat and completions; returns (n, stream, include_usage)."""
    max_completion = _positive_int(params, "max_completion_tokens")
    params.pop("max_completion_tokens", None)
    if max_completion is not None:
        params["max_tokens"] = max_completion  # the newer name wins, as in OpenAI's API
    _positive_int(params, "max_tokens")
    n = _positive_int(params, "n", upper=MAX_N) or 1
    params.pop("n", None)
    _number(params, "temperature", 0.0, 2.0)
    _number(params, "top_p", 0.0, 1.0)
    _number(params, "presence_penalty", -2.0, 2.0)
    _number(params, "frequency_penalty", -2.0, 2.0)
    stream = params.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request(f"stream must be true or false, got {_json_type(stream)}", "stream")
    options = params.pop("stream_options", None)
    include_usage = False
    if options is not None:
        if not stream:
            raise bad_request("stream_options is only allowed when stream is true", "stream_options")
        if not isinstance(options, dict):
            raise bad_request('stream_options must be an object like {"include_usage": true}', "stream_options")
        include_usage = bool(options.get("include_usage", False))
    stop = params.get("stop")
    if isinstance(stop, list):
        kept = [s for s in stop if s != ""]  # an empty stop string would end every generation at once
        params["stop"] = kept or None
    elif stop == "":
        params.pop("stop")
    if params.get("seed") is not None and (isinstance(params["seed"], bool) or not isinstance(params["seed"], int)):
        raise bad_request(f"seed must be an integer, got {_json_type(params['seed'])}", "seed")
    return n, stream, include_usage


# ## Chat


def _text_of(content: Any, where: str) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where} must be a string or a list of content parts, got {_json_type(content)}", where)
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise bad_request(f'{where}[{j}] must be a content part like {{"type": "text", "text": ...}}', where)
        if part["type"] not in ("text", "input_text", "refusal"):
            raise bad_request(
                f"{where}[{j}]: content of type '{part['type']}' is not supported: this model reads text only",
                where,
                "unsupported_content_type",
            )
        field = "refusal" if part["type"] == "refusal" else "text"
        text = part.get(field)
        if not isinstance(text, str):
            raise bad_request(f"{where}[{j}].{field} must be a string", where)
        texts.append(text)
    return "\n".join(texts)  # several text parts read as paragraphs, as other OpenAI-compatible servers do


def _string_field(message: dict[str, Any], key: str, where: str, *, required: bool = False) -> None:
    value = message.get(key)
    if value is None and required:
        raise bad_request(f"{where}.{key} is required for role '{message['role']}'", "messages")
    if value is not None and not isinstance(value, str):
        raise bad_request(f"{where}.{key} must be a string, got {_json_type(value)}", "messages")


def _message(message: Any, i: int) -> dict[str, Any]:
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise bad_request(f"{where} must be an object with 'role' and 'content', got {_json_type(message)}", "messages")
    role = message.get("role")
    if role not in ROLES:
        shown = f"'{role}'" if isinstance(role, str) else _json_type(role)
        raise bad_request(f"{where}.role: unknown role {shown} (one of: {', '.join(ROLES)})", "messages")
    out = {key: value for key, value in message.items() if value is not None}
    out["role"] = "system" if role == "developer" else role  # developer is the newer name for system
    _string_field(message, "name", where)
    text = _text_of(message.get("content"), f"{where}.content")
    if role == "assistant":
        _string_field(message, "refusal", where)
        calls = message.get("tool_calls")
        if calls is not None:
            out["tool_calls"] = [_tool_call(call, f"{where}.tool_calls[{j}]") for j, call in enumerate(_list(calls))]
            if not out["tool_calls"]:
                out.pop("tool_calls")
        if message.get("function_call") is not None:  # the deprecated single call: one tool call
            out["tool_calls"] = [*out.get("tool_calls", []), _legacy_call(message["function_call"], where)]
            out.pop("function_call")
        if text is None:
            out.pop("content", None)  # a turn with only tool calls, or a refusal: the chat template sees null
        else:
            out["content"] = text
        return out
    if role == "tool":
        _string_field(message, "tool_call_id", where, required=True)
    if text is None:
        if role in ("tool", "function"):
            out["content"] = ""
        else:
            raise bad_request(f"{where}.content is required for role '{role}'", "messages")
    else:
        out["content"] = text
    return out


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise bad_request(f"tool_calls must be a list, got {_json_type(value)}", "messages")
    return value


def _tool_call(call: Any, where: str) -> dict[str, Any]:
    """An assistant turn's tool call: ``{"id", "type": "function", "function": {"name", "arguments"}}``."""
    if isinstance(call, dict) and call.get("type", "function") != "function":
        raise bad_request(f"{where}.type '{call.get('type')}' is not supported (only 'function')", "messages")
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise bad_request(
            f'{where} must be an object like {{"id": ..., "type": "function", "function": {{"name", "arguments"}}}}',
            "messages",
        )
    function = call["function"]
    if not isinstance(function.get("name"), str):
        raise bad_request(f"{where}.function.name must be a string", "messages")
    arguments = function.get("arguments", "{}")
    if not isinstance(arguments, str):
        raise bad_request(
            f"{where}.function.arguments must be a string of JSON, got {_json_type(arguments)}", "messages"
        )
    if call.get("id") is not None and not isinstance(call["id"], str):
        raise bad_request(f"{where}.id must be a string", "messages")
    out = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
    return {"id": call["id"], **out} if call.get("id") is not None else out


def _legacy_call(call: Any, where: str) -> dict[str, Any]:
    return _tool_call({"type": "function", "function": call}, f"{where}.function_call")


# ## Tools

TOOL_NAME_MAX = 64  # OpenAI's rule: a-z, A-Z, 0-9, underscores and dashes, at most 64


def _tool(tool: Any, j: int) -> dict[str, Any]:
    where = f"tools[{j}]"
    if not isinstance(tool, dict) or not isinstance(tool.get("type"), str):
        raise bad_request(
            f'{where} must be an object like {{"type": "function", "function": {{"name": ...}}}}', "tools"
        )
    if tool["type"] != "function":
        raise bad_request(f"{where}.type '{tool['type']}' is not supported (only 'function')", "tools")
    function = tool.get("function")
    if not isinstance(function, dict):
        raise bad_request(f'{where}.function must be an object like {{"name": ..., "parameters": {{...}}}}', "tools")
    name = function.get("name")
    if not isinstance(name, str) or not _tool_name_ok(name):
        raise bad_request(
            f"{where}.function.name must be 1 to {TOOL_NAME_MAX} letters, digits, underscores or dashes, got {name!r}",
            "tools",
        )
    out: dict[str, Any] = {"name": name}
    for key, kind, label in (("description", str, "a string"), ("parameters", dict, "a JSON schema object")):
        value = function.get(key)
        if value is not None and not isinstance(value, kind):
            raise bad_request(f"{where}.function.{key} must be {label}, got {_json_type(value)}", "tools")
        if value is not None:
            out[key] = value
    strict = function.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise bad_request(f"{where}.function.strict must be true or false", "tools")
    return {"type": "function", "function": out}


def _tool_name_ok(name: str) -> bool:
    return 0 < len(name) <= TOOL_NAME_MAX and all(c.isascii() and (c.isalnum() or c in "_-") for c in name)


def _tool_choice(choice: Any, names: list[str]) -> str | dict[str, Any]:
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise bad_request(
                f"tool_choice must be 'none', 'auto', 'required' or a named function, got '{choice}'", "tool_choice"
            )
        if choice == "required" and not names:
            raise bad_request("tool_choice 'required' needs tools", "tool_choice")
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if not isinstance(name, str):
            raise bad_request("tool_choice.function.name must be a string", "tool_choice")
        if name not in names:
            raise bad_request(f"tool_choice names '{name}', which is not in tools", "tool_choice")
        return {"type": "function", "function": {"name": name}}
    kind = choice.get("type") if isinstance(choice, dict) else None
    if isinstance(kind, str):
        raise bad_request(f"tool_choice of type '{kind}' is not supported (only 'function')", "tool_choice")
    raise bad_request(
        'tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}',
        "tool_choice",
    )


def _tools(params: dict[str, Any]) -> None:
    """``tools``, ``tool_choice`` and ``parallel_tool_calls`` checked in place (the deprecated
    ``functions`` / ``function_call`` become tools); a request without tools keeps none of them."""
    functions = params.pop("functions", None)
    function_call = params.pop("function_call", None)
    if functions is not None and params.get("tools") is None:
        if not isinstance(functions, list):
            raise bad_request("functions must be a list", "functions")
        params["tools"] = [{"type": "function", "function": f} for f in functions]
        if function_call is not None and params.get("tool_choice") is None:
            named = isinstance(function_call, dict)
            params["tool_choice"] = {"type": "function", "function": function_call} if named else function_call
    tools = params.pop("tools", None)
    if tools is not None and not isinstance(tools, list):
        raise bad_request(f"tools must be a list of tool objects, got {_json_type(tools)}", "tools")
    tools = [_tool(tool, j) for j, tool in enumerate(tools or [])]
    names = [tool["function"]["name"] for tool in tools]
    duplicate = next((name for name in names if names.count(name) > 1), None)
    if duplicate is not None:
        raise bad_request(f"tools: the name '{duplicate}' is given to more than one tool", "tools")
    choice = params.pop("tool_choice", None)
    choice = None if choice is None else _tool_choice(choice, names)
    parallel = params.pop("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise bad_request(
            f"parallel_tool_calls must be true or false, got {_json_type(parallel)}", "parallel_tool_calls"
        )
    if tools:
        params["tools"] = tools
        params["tool_choice"] = choice if choice is not None else "auto"
        params["parallel_tool_calls"] = parallel


def normalize_chat(body: Any) -> PlainBody:
    """A ``/v1/chat/completions`` body made plain, or :class:`ApiError`.

    Tools end up in ``params``: ``tools`` (validated), ``tool_choice`` ("none", "auto", "required" or
    a named function; "auto" by default) and ``parallel_tool_calls``, all absent when there are no tools.
    """
    params = _object(body)
    messages = params.get("messages")
    if messages is None:
        raise bad_request("messages is required: a list of {role, content} objects", "messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list of {role, content} objects", "messages")
    params["messages"] = [_message(m, i) for i, m in enumerate(messages)]
    _tools(params)
    n, stream, include_usage = _common(params)
    json_schema, json_object = _response_format(params.pop("response_format", None))
    if (json_schema is not None or json_object) and params.get("grammar") is not None:
        raise bad_request("give either response_format or grammar, not both", "response_format")
    forced = params.get("tool_choice") == "required" or isinstance(params.get("tool_choice"), dict)
    if forced and (json_schema is not None or json_object or params.get("grammar") is not None):
        what = "grammar" if params.get("grammar") is not None else "response_format"
        raise bad_request(f"give either {what} or a tool_choice that forces a call, not both", what)
    return PlainBody("chat", params, n, stream, include_usage, json_schema, json_object)


def _response_format(value: Any) -> tuple[dict[str, Any] | None, bool]:
    if value is None:
        return None, False
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise bad_request('response_format must be an object like {"type": "json_object"}', "response_format")
    kind = value["type"]
    if kind == "text":
        return None, False
    if kind == "json_object":
        schema = value.get("schema")  # llama-cpp-python's extension: json_object with a schema
        if schema is not None and not isinstance(schema, dict):
            raise bad_request("response_format.schema must be a JSON schema object", "response_format")
        return schema, schema is None
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise bad_request(
                "response_format.json_schema must be an object with a name: "
                '{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}',
                "response_format",
            )
        schema = spec.get("schema")
        if schema is None:  # OpenAI's spec makes the schema optional: then any JSON
            return None, True
        if not isinstance(schema, dict):
            raise bad_request("response_format.json_schema.schema must be a JSON schema object", "response_format")
        return schema, False
    raise bad_request(
        f"response_format.type '{kind}' is not supported (one of: text, json_object, json_schema)", "response_format"
    )


# ## Completions


def _prompt(value: Any, *, outer: bool = True) -> str | list[int]:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return _tokens(value)
    if isinstance(value, list) and outer:  # a list of prompts: only one is served
        if not value:
            raise bad_request("prompt must not be an empty list", "prompt")
        if all(isinstance(p, (str, list)) for p in value):
            if len(value) > 1:
                raise bad_request(
                    f"a batch of {len(value)} prompts is not supported: send one prompt per request", "prompt"
                )
            return _prompt(value[0], outer=False)
    raise bad_request(f"prompt must be a string or a list of token ids, got {_json_type(value)}", "prompt")


def _tokens(value: list[int]) -> list[int]:
    if any(t < 0 for t in value):
        raise bad_request("prompt token ids must not be negative", "prompt")
    return list(value)


def normalize_completion(body: Any) -> PlainBody:
    """A ``/v1/completions`` body made plain, or :class:`ApiError`."""
    params = _object(body)
    if "prompt" not in params:
        raise bad_request("prompt is required", "prompt")
    prompt = _prompt(params.pop("prompt"))
    if params.get("suffix") is not None:
        raise bad_request("suffix (fill-in-the-middle) is not supported by this server", "suffix")
    best_of = params.pop("best_of", None)
    if best_of not in (None, 1):
        raise bad_request("best_of is not supported; use n for several completions", "best_of")
    n, stream, include_usage = _common(params)
    if isinstance(prompt, str):
        params["prompt"] = prompt
        return PlainBody("completion", params, n, stream, include_usage)
    params["prompt"] = ""  # the stock type takes text only; the tokens travel beside it
    return PlainBody("completion", params, n, stream, include_usage, prompt_tokens=prompt)


# ## Embeddings


def normalize_embedding(body: Any) -> EmbeddingBody:
    """A ``/v1/embeddings`` body made plain, or :class:`ApiError`."""
    params = _object(body)
    value = params.get("input")
    if value is None:
        raise bad_request("input is required: a string or a list of strings", "input")
    inputs = [value] if isinstance(value, str) else value
    if not isinstance(inputs, list) or not inputs:
        raise bad_request("input must be a non-empty string or a non-empty list of strings", "input")
    if not all(isinstance(item, str) for item in inputs):
        raise bad_request("input must be text: token-array inputs are not supported for embeddings", "input")
    if any(item == "" for item in inputs):
        raise bad_request("input must not contain empty strings", "input")
    if len(inputs) > MAX_EMBEDDING_INPUTS:
        raise bad_request(f"at most {MAX_EMBEDDING_INPUTS} inputs per request, got {len(inputs)}", "input")
    encoding = params.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise bad_request(f"encoding_format must be 'float' or 'base64', got {encoding!r}", "encoding_format")
    dimensions = _positive_int(params, "dimensions")
    return EmbeddingBody(list(inputs), encoding == "base64", dimensions)
