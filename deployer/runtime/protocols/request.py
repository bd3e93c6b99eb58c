"""The one generation request every wire protocol maps onto, and the extensions they all honour.

A protocol's decoder turns its body into a :class:`GenerationRequest` (messages in the chat form
``deployer.runtime.chat.template`` renders, or a completion prompt; tools; sampling; stop; limits; the
response format; the chat template's variables). Every field a body carries is one of three things:
part of the protocol (the decoder maps it), an extension the server honours (:data:`EXTENSIONS`,
the fields clients send to llama-server and vLLM), or refused with a 400 that names it
(:func:`refuse_unknown`). Nothing is silently ignored.
"""

from __future__ import annotations

import difflib
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deployer.runtime.errors import ApiError, bad_request

# template variables a request may not set: the server passes them itself
RESERVED_TEMPLATE_VARIABLES = frozenset(
    {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token", "raise_exception", "strftime_now"}
)


class GenerationRequest(BaseModel):
    """One generation, whichever protocol asked for it (the defaults are llama-server's)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Annotated[Literal["chat", "completion"], Field(description="chat messages, or a raw completion prompt")]
    messages: Annotated[
        list[dict[str, Any]], Field(description="chat turns, as protocol.normalize_chat leaves them")
    ] = []
    prompt: Annotated[str | list[int], Field(description="a completion's prompt: text, or token ids")] = ""
    echo: Annotated[bool, Field(description="a completion repeats its prompt before the answer")] = False
    tools: Annotated[list[dict[str, Any]], Field(description="function tools, in chat's shape")] = []
    tool_choice: Annotated[str | dict[str, Any] | None, Field(description="none, auto, required, or named")] = None
    parallel_tool_calls: bool = True
    continue_final: Annotated[
        bool, Field(description="assistant prefill: the last assistant message is continued, not closed")
    ] = False
    template_kwargs: Annotated[
        dict[str, Any], Field(description="extra chat template variables (enable_thinking, reasoning_effort, ...)")
    ] = {}
    n: Annotated[int, Field(ge=1, description="choices")] = 1
    stream: bool = False
    include_usage: bool = False
    max_tokens: Annotated[int | None, Field(ge=1, description="None: until the context is full")] = None
    min_tokens: Annotated[int, Field(ge=0)] = 0
    stop: list[str] = []
    temperature: Annotated[float, Field(ge=0.0)] = 0.8
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.95
    top_k: Annotated[int, Field(ge=0)] = 40
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.05
    # llama-cpp-python's request types default to 1.1; OpenAI's API (and llama-server) penalize nothing unless asked
    repeat_penalty: Annotated[float, Field(ge=0.0)] = 1.0
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    mirostat_mode: Annotated[int, Field(ge=0, le=2)] = 0
    mirostat_tau: Annotated[float, Field(ge=0.0, le=10.0)] = 5.0
    mirostat_eta: Annotated[float, Field(ge=0.001, le=1.0)] = 0.1
    seed: int | None = None
    logit_bias: dict[str, float] = {}
    logit_bias_type: Literal["input_ids", "tokens"] | None = None
    grammar: Annotated[str | None, Field(description="GBNF with a root rule")] = None
    json_schema: Annotated[dict[str, Any] | None, Field(description="the answer is JSON valid for this schema")] = None
    json_object: Annotated[bool, Field(description="the answer is some JSON object")] = False
    logprobs: Annotated[int | None, Field(ge=0, description="None: none; k: each token's logprob and the top k")] = None


# ## Extensions: what clients send to llama-server and vLLM, honoured by every protocol that can

SAMPLING_EXTENSIONS = frozenset(
    {
        "top_k",
        "min_p",
        "min_tokens",
        "repeat_penalty",
        "repetition_penalty",  # vLLM's name for it
        "mirostat_mode",
        "mirostat_tau",
        "mirostat_eta",
        "grammar",
        "json_schema",  # llama-server: a top-level JSON schema for the answer
        "chat_template_kwargs",
        "cache_prompt",
        "seed",
    }
)
EXTENSIONS = SAMPLING_EXTENSIONS | {"n_probs", "logit_bias_type"}


def take_extensions(params: dict[str, Any], allowed: frozenset[str]) -> dict[str, Any]:
    """The honoured extensions of ``params``, removed from it, as GenerationRequest fields."""
    out: dict[str, Any] = {}
    for key in sorted(allowed & params.keys()):
        value = params.pop(key)
        if value is None:
            continue
        if key == "repetition_penalty":
            if "repeat_penalty" in out and out["repeat_penalty"] != value:
                raise bad_request("give repeat_penalty or repetition_penalty (the same setting), not both", key)
            out["repeat_penalty"] = value
        elif key == "chat_template_kwargs":
            out["template_kwargs"] = template_kwargs(value, key)
        elif key == "cache_prompt":
            if value is not True:  # the KV cache of earlier requests is always reused, with the same results
                raise bad_request(
                    "cache_prompt: false is not supported: this server always reuses the cached prompt prefix", key
                )
        elif key == "n_probs":
            out["logprobs"] = value
        else:
            out[key] = value
    return out


def template_kwargs(value: Any, where: str) -> dict[str, Any]:
    """``chat_template_kwargs``: variables for the chat template, never the ones the server sets."""
    if not isinstance(value, dict):
        raise bad_request(f"{where} must be an object of template variables", where)
    reserved = sorted(RESERVED_TEMPLATE_VARIABLES & value.keys())
    if reserved:
        raise bad_request(f"{where}: '{reserved[0]}' is set by the server and cannot be given", where)
    return dict(value)


def refuse_unknown(params: dict[str, Any], known: frozenset[str], where: str = "") -> None:
    """A 400 naming the first field that is neither part of the protocol nor an honoured extension."""
    unknown = sorted(params.keys() - known)
    if not unknown:
        return
    name = unknown[0]
    close = difflib.get_close_matches(name, sorted(known | EXTENSIONS), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise bad_request(f"unknown field '{where}{name}'{hint}: this server does not support it", f"{where}{name}")


def build(fields: dict[str, Any], names: dict[str, str] | None = None) -> GenerationRequest:
    """The request of ``fields``; a 400 naming the field (by the protocol's name, see ``names``) otherwise."""
    try:
        return GenerationRequest.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(part) for part in first["loc"]]
        top = (names or {}).get(loc[0], loc[0]) if loc else ""
        where = ".".join([top, *loc[1:]])
        raise ApiError(400, f"{where}: {first['msg']}" if where else first["msg"], param=top or None) from exc
