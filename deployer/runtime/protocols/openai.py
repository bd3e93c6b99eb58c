"""OpenAI's Chat Completions, Completions and Embeddings: the decoders and the encoders.

Decoders: :mod:`deployer.runtime.protocols.checks` makes a body plain (every shape today's SDKs
send) and checks the messages and tools; :func:`decode_chat` and :func:`decode_completion` map what
is left onto :class:`GenerationRequest`, field by field, and refuse what is neither OpenAI's nor an
honoured extension.

Encoders: :class:`Responder` turns the engine's deltas into ``chat.completion`` /
``text_completion`` objects or their stream chunks, with usage and ``cached_tokens``, logprobs,
and (chat) the message fields the model's chat parser finds; :func:`run_embedding` answers
``/v1/embeddings`` on the model thread.
"""

from __future__ import annotations

import base64
import functools
import json
import math
import struct
import time
import uuid
from typing import Any

from deployer.runtime.engine.core import Job, Tally
from deployer.runtime.engine.sampling import Delta, TokenLogprob
from deployer.runtime.errors import ApiError, bad_request
from deployer.runtime.protocols.checks import EmbeddingBody, normalize_chat, normalize_completion
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


# ## Responses


class Responder:
    """Turns the pieces of one request into OpenAI's objects: stream chunks, or one result at the end.

    ``parsers`` (chat) make message fields of the text, one per choice (see ``deployer.runtime.chat.template``);
    without them the text is the content.
    """

    def __init__(
        self, call: GenerationRequest, model_name: str, *, parsers: list[Any] | None = None, echo: str = ""
    ) -> None:
        self.call = call
        self.chat = call.kind == "chat"
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model_name
        self.parsers = parsers
        self.echo = echo
        self._texts = [echo] * call.n
        self._logprobs: list[list[TokenLogprob]] = [[] for _ in range(call.n)]
        self._finish: list[str | None] = [None] * call.n
        self._started = [False] * call.n

    @property
    def object(self) -> str:
        if self.chat:
            return "chat.completion.chunk" if self.call.stream else "chat.completion"
        return "text_completion"

    def head(self) -> dict[str, Any]:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model}

    # -- streaming

    def chunks(self, pieces: list[Delta]) -> list[dict[str, Any]]:
        """The stream chunks of one step's pieces."""
        return [{**self.head(), "choices": choices} for choices in self._choices(pieces)]

    def _choices(self, pieces: list[Delta]) -> list[list[dict[str, Any]]]:
        """The ``choices`` of each stream chunk of one step's pieces (the head is the same for all)."""
        out: list[list[dict[str, Any]]] = []
        for piece in pieces:
            self._record(piece)
            if self.chat:
                out.extend(chunk["choices"] for chunk in self._chat_chunks(piece))
            else:
                text = piece.text
                if self.echo and not self._started[piece.index]:
                    text, self._started[piece.index] = self.echo + text, True
                choice = {
                    "text": text,
                    "index": piece.index,
                    "logprobs": self._completion_logprobs(
                        piece.logprobs, len(self._texts[piece.index]) - len(piece.text)
                    )
                    if self._wants_logprobs
                    else None,
                    "finish_reason": piece.finish_reason,
                }
                out.append([choice])
        return out

    def _chat_chunks(self, piece: Delta) -> list[dict[str, Any]]:
        index = piece.index
        deltas: list[dict[str, Any]] = []
        if not self._started[index]:
            self._started[index] = True
            deltas.append({"role": "assistant", "content": ""})
        finish = piece.finish_reason
        if self.parsers is None:
            if piece.text:
                deltas.append({"content": piece.text})
        else:
            parser = self.parsers[index]
            if piece.text:
                deltas.extend(parser.feed(piece.text))
            if finish is not None:
                held, _message, override = parser.finish()
                deltas.extend(held)
                finish = override or finish
        logprobs = self._chat_logprobs(piece.logprobs) if self._wants_logprobs else None
        chunks = [self._chat_chunk(index, delta, None, None) for delta in deltas]
        if logprobs is not None:
            if chunks:
                chunks[-1]["choices"][0]["logprobs"] = logprobs
            else:
                chunks.append(self._chat_chunk(index, {}, None, logprobs))
        if finish is not None:
            chunks.append(self._chat_chunk(index, {}, finish, None))
        return chunks

    def _chat_chunk(self, index: int, delta: dict[str, Any], finish: str | None, logprobs: Any) -> dict[str, Any]:
        return {
            **self.head(),
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
        }

    # -- server-sent events (the encoder interface every protocol's encoder has)

    def events(self, pieces: list[Delta]) -> bytes:
        # the event loop's cost per streamed token is what bounds throughput when decoding is fast: every
        # chunk repeats the head, encoded once; a piece that is text only (the common one) is the text
        # between two constant parts, the rest are encoded whole
        head = self._sse_head
        out = b""
        for piece in pieces:
            frame = self._text_frame(piece)
            if frame is not None:  # nothing recorded: only a whole answer or logprobs' offsets read the texts
                if piece.text or not self.chat:  # a chat chunk without text has no delta: none is sent
                    out += head + frame[0] + _encode_string(piece.text).encode() + frame[1]
            else:
                out += b"".join(head + _dumps(choices).encode() + b"}\n\n" for choices in self._choices([piece]))
        return out

    def _text_frame(self, piece: Delta) -> tuple[bytes, bytes] | None:
        """What surrounds a piece's text in its chunk, when that is all it carries (else None)."""
        if piece.finish_reason is not None or self._wants_logprobs:
            return None
        if self.chat:
            if self.parsers is not None or not self._started[piece.index]:
                return None
            return (b'[{"index":%d,"delta":{"content":' % piece.index, b'},"logprobs":null,"finish_reason":null}]}\n\n')
        if self.echo and not self._started[piece.index]:
            return None
        return (b'[{"text":', b',"index":%d,"logprobs":null,"finish_reason":null}]}\n\n' % piece.index)

    @functools.cached_property
    def _sse_head(self) -> bytes:
        return b"data: " + _dumps(self.head())[:-1].encode() + b',"choices":'

    def error_event(self, error: ApiError) -> bytes:
        return sse(error.body())  # after the headers: an error event, as OpenAI's SDKs expect

    def end(self, tally: Tally) -> bytes:
        tail = sse({**self.head(), "choices": [], "usage": usage(tally)}) if self.call.include_usage else b""
        return tail + b"data: [DONE]\n\n"

    # -- the whole result

    def add(self, pieces: list[Delta]) -> None:
        for piece in pieces:
            self._record(piece)

    def _record(self, piece: Delta) -> None:
        self._texts[piece.index] += piece.text
        self._logprobs[piece.index].extend(piece.logprobs)
        if piece.finish_reason is not None:
            self._finish[piece.index] = piece.finish_reason

    def result(self, tally: Tally) -> dict[str, Any]:
        choices = []
        for index in range(self.call.n):
            finish = self._finish[index] or "length"
            if self.chat:
                message: dict[str, Any] = {"role": "assistant", "content": self._texts[index], "refusal": None}
                if self.parsers is not None:
                    parser = self.parsers[index]
                    parser.feed(self._texts[index])
                    _held, message, override = parser.finish()
                    finish = override or finish
                choices.append(
                    {
                        "index": index,
                        "message": message,
                        "logprobs": self._chat_logprobs(self._logprobs[index]) if self._wants_logprobs else None,
                        "finish_reason": finish,
                    }
                )
            else:
                choices.append(
                    {
                        "text": self._texts[index],
                        "index": index,
                        "logprobs": self._completion_logprobs(self._logprobs[index], len(self.echo))
                        if self._wants_logprobs
                        else None,
                        "finish_reason": finish,
                    }
                )
        return {**self.head(), "choices": choices, "usage": usage(tally)}

    # -- logprobs

    @property
    def _wants_logprobs(self) -> bool:
        return self.call.logprobs is not None

    @staticmethod
    def _chat_logprobs(tokens: Any) -> dict[str, Any]:
        return {
            "content": [
                {
                    "token": t.token,
                    "logprob": t.logprob,
                    "bytes": list(t.bytes),
                    "top_logprobs": [{"token": s, "logprob": lp, "bytes": list(b)} for s, b, lp in t.top],
                }
                for t in tokens
            ],
            "refusal": None,
        }

    @staticmethod
    def _completion_logprobs(tokens: Any, offset: int) -> dict[str, Any]:
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t.token)
        return {
            "tokens": [t.token for t in tokens],
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{s: lp for s, _b, lp in t.top} for t in tokens],
            "text_offset": offsets,
        }


_dumps = json.JSONEncoder(separators=(",", ":")).encode  # compact; made once
_encode_string = json.encoder.encode_basestring_ascii  # a str as _dumps writes it (C; ASCII with escapes)


def sse(data: Any) -> bytes:
    """One server-sent event of JSON data (OpenAI's streams: no event names)."""
    return b"data: " + _dumps(data).encode() + b"\n\n"


def usage(tally: Tally) -> dict[str, Any]:
    """OpenAI's usage object, with the prompt tokens served from the cache."""
    return {
        "prompt_tokens": tally.prompt_tokens,
        "completion_tokens": tally.completion_tokens,
        "total_tokens": tally.prompt_tokens + tally.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": tally.cached_tokens},
    }


# ## Embeddings


def run_embedding(model: Any, job: Job, call: EmbeddingBody, model_name: str) -> None:
    """Embed every input: one unit-length vector each (the model's pooling, else the mean of its token vectors)."""
    if call.dimensions is not None and call.dimensions != model.n_embd:
        raise bad_request(
            f"dimensions: this model returns {model.n_embd}-dimensional embeddings and cannot shorten them",
            "dimensions",
        )
    data = []
    count = 0
    for index, text in enumerate(call.inputs):
        tokens = model.tokenize(text, add_special=True)
        if len(tokens) > model.n_batch:
            raise bad_request(
                f"input[{index}] is {len(tokens)} tokens, longer than {model.n_batch}, the most this server embeds at once",
                "input",
            )
        count += len(tokens)
        pooled = _unit(model.embed(tokens))
        encoded: Any = base64.b64encode(struct.pack(f"<{len(pooled)}f", *pooled)).decode() if call.base64 else pooled
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    job.tally.prompt_tokens = count
    job.emit(
        "result",
        {"object": "list", "data": data, "model": model_name, "usage": {"prompt_tokens": count, "total_tokens": count}},
    )


def _unit(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in vector))
    return [x / norm for x in vector] if norm > 0 else list(vector)
