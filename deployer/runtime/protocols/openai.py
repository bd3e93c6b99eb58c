"""OpenAI's Chat Completions and Completions: request bodies onto :class:`GenerationRequest`.

``deployer.runtime.protocol`` makes a body plain (every shape today's SDKs send) and checks the
messages and tools; this module maps what is left, field by field, and refuses what is neither
OpenAI's nor an honoured extension. The encoders are :class:`deployer.runtime.calls.Responder`.
"""

from __future__ import annotations

from typing import Any

from deployer.runtime.protocol import bad_request, normalize_chat, normalize_completion
from deployer.runtime.protocols.request import (
    EXTENSIONS,
    GenerationRequest,
    build,
    refuse_unknown,
    take_extensions,
)

MAX_TOP_LOGPROBS = 20  # OpenAI's limit (chat); completions allow 5
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high")

# fields that describe the caller or OpenAI's own bookkeeping: accepted, no effect on the generation
BOOKKEEPING = frozenset(
    {
        "model",
        "user",
        "metadata",
        "store",
        "service_tier",
        "prompt_cache_key",  # this server's prompt cache needs no key: every prompt is cached
        "prompt_cache_retention",
        "prompt_cache_options",
        "safety_identifier",
    }
)
SHARED = BOOKKEEPING | {
    "max_tokens",
    "temperature",
    "top_p",
    "stream",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "seed",
}
CHAT_FIELDS = SHARED | {
    "messages",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "top_logprobs",
    "reasoning_effort",
    "modalities",
    "continue_final_message",  # vLLM's assistant prefill switch
    "add_generation_prompt",
}
COMPLETION_FIELDS = SHARED | {"prompt", "echo"}


def decode_chat(body: Any) -> GenerationRequest:
    """A ``/v1/chat/completions`` body as the internal request, or a 400 naming the field."""
    call = normalize_chat(body)
    params = dict(call.params)
    fields = _sampling(params, call.n, call.stream, call.include_usage)
    if call.json_schema is not None or call.json_object:
        if fields.get("json_schema") is not None:
            raise bad_request("give either response_format or json_schema, not both", "json_schema")
        fields["json_schema"], fields["json_object"] = call.json_schema, call.json_object
    forced = params.get("tool_choice") == "required" or isinstance(params.get("tool_choice"), dict)
    if forced and fields.get("json_schema") is not None:
        raise bad_request("give either json_schema or a tool_choice that forces a call, not both", "json_schema")
    modalities = params.pop("modalities", None)
    if modalities is not None and modalities != ["text"]:
        raise bad_request("modalities: this model answers with text only (['text'])", "modalities")
    effort = params.pop("reasoning_effort", None)
    kwargs = reasoning_template_kwargs(effort, "reasoning_effort") if effort is not None else {}
    kwargs.update(fields.pop("template_kwargs", {}))  # chat_template_kwargs, the explicit form, win
    top = params.pop("top_logprobs", None)
    wants = params.pop("logprobs", None)
    if top is not None and not wants:
        raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS):
        raise bad_request(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {top!r}", "top_logprobs")
    if wants is not None and not isinstance(wants, bool):
        raise bad_request("logprobs must be true or false", "logprobs")
    if wants:
        fields["logprobs"] = top or 0
    messages = params.pop("messages")
    fields["continue_final"] = _continues(messages, params)
    fields["messages"] = messages
    for key in ("tools", "tool_choice", "parallel_tool_calls"):
        if key in params:
            fields[key] = params.pop(key)
    refuse_unknown(params, CHAT_FIELDS)
    return build({"kind": "chat", **fields, "template_kwargs": kwargs})


def decode_completion(body: Any) -> GenerationRequest:
    """A ``/v1/completions`` body as the internal request, or a 400 naming the field."""
    call = normalize_completion(body)
    params = dict(call.params)
    fields = _sampling(params, call.n, call.stream, call.include_usage)
    fields.setdefault("max_tokens", COMPLETION_MAX_TOKENS)
    if fields.get("template_kwargs"):
        raise bad_request(
            "chat_template_kwargs is for chat: a completion's prompt is not templated", "chat_template_kwargs"
        )
    prompt = params.pop("prompt")
    fields["prompt"] = call.prompt_tokens if call.prompt_tokens is not None else prompt
    echo = params.pop("echo", False)
    if not isinstance(echo, bool):
        raise bad_request("echo must be true or false", "echo")
    fields["echo"] = echo
    logprobs = params.pop("logprobs", None)
    if logprobs is not None:
        if isinstance(logprobs, bool) or not isinstance(logprobs, int) or not 0 <= logprobs <= 5:
            raise bad_request(f"logprobs must be between 0 and 5, got {logprobs!r}", "logprobs")
        fields["logprobs"] = logprobs
    if fields.get("logprobs") is not None and echo:
        raise bad_request(
            "echo with logprobs (the prompt's logprobs) is not supported: the server does not keep the logits "
            "of prompt positions",
            "echo",
            "echo_logprobs_not_supported",
        )
    refuse_unknown(params, COMPLETION_FIELDS)
    return build({"kind": "completion", **fields})


def _sampling(params: dict[str, Any], n: int, stream: bool, include_usage: bool) -> dict[str, Any]:
    """The fields chat and completions share (removed from ``params``), and the honoured extensions."""
    fields = take_extensions(params, EXTENSIONS)
    for key in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "seed", "logit_bias", "max_tokens"):
        if params.get(key) is not None:
            fields[key] = params.pop(key)
    stop = params.pop("stop", None)
    fields["stop"] = [stop] if isinstance(stop, str) else (stop or [])
    params.pop("stream", None)
    for key in BOOKKEEPING:
        params.pop(key, None)
    return {**fields, "n": n, "stream": stream, "include_usage": include_usage}


def _continues(messages: list[dict[str, Any]], params: dict[str, Any]) -> bool:
    """Assistant prefill: a conversation ending with an assistant's text is continued from that text
    (llama-server's behaviour; vLLM's ``continue_final_message`` says so explicitly)."""
    explicit = params.pop("continue_final_message", None)
    generation_prompt = params.pop("add_generation_prompt", None)
    for key, value in (("continue_final_message", explicit), ("add_generation_prompt", generation_prompt)):
        if value is not None and not isinstance(value, bool):
            raise bad_request(f"{key} must be true or false", key)
    last = messages[-1]
    text = last.get("content")
    can = last["role"] == "assistant" and isinstance(text, str) and bool(text.strip()) and not last.get("tool_calls")
    if explicit and generation_prompt:
        raise bad_request("continue_final_message needs add_generation_prompt: false", "add_generation_prompt")
    if explicit and not can:
        raise bad_request(
            "continue_final_message: the last message must be an assistant's text to continue", "continue_final_message"
        )
    if generation_prompt is False and not can:
        raise bad_request(
            "add_generation_prompt: false is only supported to continue a final assistant message",
            "add_generation_prompt",
        )
    if explicit is not None:
        return explicit
    return can and generation_prompt is not True


def reasoning_template_kwargs(effort: Any, where: str) -> dict[str, Any]:
    """A reasoning effort as the chat template variables reasoning templates read.

    ``reasoning_effort`` (gpt-oss's templates) and ``enable_thinking`` (Qwen3's, and others'):
    "none" turns thinking off, any other effort on.
    """
    if effort not in REASONING_EFFORTS:
        raise bad_request(f"{where} must be one of {', '.join(REASONING_EFFORTS)}, got {effort!r}", where)
    return {"reasoning_effort": effort, "enable_thinking": effort != "none"}
