"""Requests into generations, and generated pieces back into OpenAI's response shapes.

Runs on the event loop, beside the model thread: a request is checked, its prompt rendered and
tokenized, its sampling settings and grammar checked (an unparsable grammar would crash llama.cpp:
measured, a segfault) before the engine sees it. What comes back, :class:`Piece` by piece, becomes
``chat.completion`` / ``text_completion`` objects or their stream chunks, with usage and
``cached_tokens``, logprobs, and (chat) the message fields the model's chat parser finds.
"""

from __future__ import annotations

import base64
import json
import math
import struct
import time
import uuid
from typing import Any

from deployer.runtime.engine import Job, Tally
from deployer.runtime.protocol import ApiError, EmbeddingCall, bad_request
from deployer.runtime.protocols.request import GenerationRequest
from deployer.runtime.sampling import Generation, Piece, Sampling, TokenLogprob

# ## Requests


def generation(
    model: Any,
    request: GenerationRequest,
    *,
    n_ctx: int,
    prompt: list[int],
    grammar: str | None,
    extra_stop: tuple[str, ...] = (),
) -> Generation:
    """The engine's :class:`Generation` of a decoded request, its prompt tokenized."""
    what = "messages" if request.kind == "chat" else "prompt"
    if not prompt:
        raise bad_request("the prompt is empty", what)
    bad = next((t for t in prompt if t >= model.n_vocab), None)
    if bad is not None:
        raise bad_request(f"prompt token id {bad} is outside the vocabulary (0..{model.n_vocab - 1})", "prompt")
    if len(prompt) >= n_ctx:  # not even one token would fit after it
        raise ApiError(
            400,
            f"This model's maximum context length is {n_ctx} tokens, and the {what} came to {len(prompt)}: "
            f"shorten the {what}.",
            param=what,
            code="context_length_exceeded",
        )
    if grammar is not None:
        from deployer.runtime.llama import check_grammar

        if not check_grammar(model, grammar):
            raise bad_request("grammar could not be parsed by llama.cpp (GBNF with a 'root' rule expected)", "grammar")
    r = request
    sampling = Sampling(
        temperature=r.temperature,
        top_k=r.top_k,
        top_p=r.top_p,
        min_p=r.min_p,
        repeat_penalty=r.repeat_penalty,
        presence_penalty=r.presence_penalty,
        frequency_penalty=r.frequency_penalty,
        mirostat_mode=r.mirostat_mode,
        mirostat_tau=r.mirostat_tau,
        mirostat_eta=r.mirostat_eta,
        seed=r.seed,
        logit_bias=_logit_bias(model, r.logit_bias, r.logit_bias_type) if r.logit_bias else (),
        grammar=grammar,
    )
    return Generation(
        prompt=prompt,
        sampling=sampling,
        n=r.n,
        max_tokens=r.max_tokens,
        min_tokens=r.min_tokens,
        stop=(*r.stop, *extra_stop),
        logprobs=r.logprobs,
    )


def completion_prompt(model: Any, request: GenerationRequest) -> list[int]:
    """The tokens of a ``/v1/completions`` prompt (text with BOS as the model wants it, or token ids)."""
    if isinstance(request.prompt, list):
        return list(request.prompt)
    return model.tokenize(request.prompt, add_special=True) if request.prompt else [model.bos]


def json_grammar(request: GenerationRequest) -> str | None:
    """The grammar of the answer's JSON format (a schema, or any JSON object), if the request has one."""
    if request.json_schema is None and not request.json_object:
        return None
    from deployer.runtime.llama import json_grammar as grammar_of

    try:
        return grammar_of(request.json_schema)
    except ValueError as exc:
        raise bad_request(f"the JSON schema cannot be turned into a grammar: {exc}", "response_format") from exc


def _logit_bias(model: Any, bias: dict[str, float], kind: str | None) -> tuple[tuple[int, float], ...]:
    out: dict[int, float] = {}
    for key, value in bias.items():
        if kind == "tokens":  # llama-cpp-python's extension: keys are text
            for token in model.tokenize(key, add_special=False):
                out[token] = value
            continue
        if not key.isdigit() or int(key) >= model.n_vocab:
            raise bad_request(
                f"logit_bias key '{key}' is not a token id of this model (0..{model.n_vocab - 1})", "logit_bias"
            )
        out[int(key)] = value
    return tuple(out.items())


# ## Responses


class Responder:
    """Turns the pieces of one request into OpenAI's objects: stream chunks, or one result at the end.

    ``parsers`` (chat) make message fields of the text, one per choice (see ``deployer.runtime.chat``);
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

    def chunks(self, pieces: list[Piece]) -> list[dict[str, Any]]:
        """The stream chunks of one step's pieces."""
        out: list[dict[str, Any]] = []
        for piece in pieces:
            self._record(piece)
            if self.chat:
                out.extend(self._chat_chunks(piece))
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
                out.append({**self.head(), "choices": [choice]})
        return out

    def _chat_chunks(self, piece: Piece) -> list[dict[str, Any]]:
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

    def events(self, pieces: list[Piece]) -> bytes:
        return b"".join(map(sse, self.chunks(pieces)))

    def error_event(self, error: ApiError) -> bytes:
        return sse(error.body())  # after the headers: an error event, as OpenAI's SDKs expect

    def end(self, tally: Tally) -> bytes:
        tail = sse({**self.head(), "choices": [], "usage": usage(tally)}) if self.call.include_usage else b""
        return tail + b"data: [DONE]\n\n"

    # -- the whole result

    def add(self, pieces: list[Piece]) -> None:
        for piece in pieces:
            self._record(piece)

    def _record(self, piece: Piece) -> None:
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


def sse(data: Any) -> bytes:
    """One server-sent event of JSON data (OpenAI's streams: no event names)."""
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def usage(tally: Tally) -> dict[str, Any]:
    """OpenAI's usage object, with the prompt tokens served from the cache."""
    return {
        "prompt_tokens": tally.prompt_tokens,
        "completion_tokens": tally.completion_tokens,
        "total_tokens": tally.prompt_tokens + tally.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": tally.cached_tokens},
    }


# ## Embeddings


def run_embedding(model: Any, job: Job, call: EmbeddingCall, model_name: str) -> None:
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
