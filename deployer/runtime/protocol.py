"""The OpenAI wire protocol, as far as the runtime needs it: errors, and requests made plain.

Pure functions of JSON values (no llama.cpp, no I/O), so they are tested without a model.

Today's SDKs send shapes llama-cpp-python's request types reject or misread: the ``developer``
role, message content as a list of parts, ``max_completion_tokens``, ``stream_options``,
``response_format: {type: json_schema}``, token-array prompts. ``normalize_*`` turns each request
into the plain form the stock types accept, or raises :class:`ApiError` (a 4xx) naming the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Literal

MAX_N = 8  # choices per request: each one is a full generation on the single model
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's own limit
ROLES = ("system", "developer", "user", "assistant", "tool", "function")


class ApiError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # OpenAI's field name
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    """A 400 about one field of the request."""
    return ApiError(400, message, param=param, code=code)


@dataclass(frozen=True)
class Call:
    """One generation request, made plain.

    ``params`` is the body the stock request types (``llama_cpp.server.types``) accept; the rest is
    what the runtime handles itself.
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
class EmbeddingCall:
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


def _common(params: dict[str, Any], *, logprobs_ok: bool) -> tuple[int, bool, bool]:
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
    wants_logprobs = params.get("logprobs") not in (None, False, 0) or params.get("top_logprobs") is not None
    if wants_logprobs and not logprobs_ok:
        raise bad_request(
            "logprobs are not available on this endpoint: they need the model's logits at every position, "
            "which the server does not keep (n_ctx x n_vocab floats)",
            "logprobs",
            "logprobs_not_supported",
        )
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
        text = part.get("text", part.get("refusal"))
        if not isinstance(text, str):
            raise bad_request(f"{where}[{j}].text must be a string", where)
        texts.append(text)
    return "\n".join(texts)  # several text parts read as paragraphs, as other OpenAI-compatible servers do


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
    text = _text_of(message.get("content"), f"{where}.content")
    if text is None:
        if role == "assistant":
            out.pop("content", None)  # an assistant turn with only tool calls
        elif role in ("tool", "function"):
            out["content"] = None
        else:
            raise bad_request(f"{where}.content is required for role '{role}'", "messages")
    else:
        out["content"] = text
    return out


def normalize_chat(body: Any, *, logprobs_ok: bool = False) -> Call:
    """A ``/v1/chat/completions`` body made plain, or :class:`ApiError`."""
    params = _object(body)
    messages = params.get("messages")
    if messages is None:
        raise bad_request("messages is required: a list of {role, content} objects", "messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list of {role, content} objects", "messages")
    params["messages"] = [_message(m, i) for i, m in enumerate(messages)]
    n, stream, include_usage = _common(params, logprobs_ok=logprobs_ok)
    json_schema, json_object = _response_format(params.pop("response_format", None))
    if (json_schema is not None or json_object) and params.get("grammar") is not None:
        raise bad_request("give either response_format or grammar, not both", "response_format")
    return Call("chat", params, n, stream, include_usage, json_schema, json_object)


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
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise bad_request(
                "response_format.json_schema.schema is required: "
                '{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}',
                "response_format",
            )
        return spec["schema"], False
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


def normalize_completion(body: Any, *, logprobs_ok: bool = False) -> Call:
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
    n, stream, include_usage = _common(params, logprobs_ok=logprobs_ok)
    if isinstance(prompt, str):
        params["prompt"] = prompt
        return Call("completion", params, n, stream, include_usage)
    params["prompt"] = ""  # the stock type takes text only; the tokens travel beside it
    return Call("completion", params, n, stream, include_usage, prompt_tokens=prompt)


# ## Embeddings


def normalize_embedding(body: Any) -> EmbeddingCall:
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
    return EmbeddingCall(list(inputs), encoding == "base64", dimensions)
