"""What runs on the model thread for each route: llama-cpp-python's calls, and the few things it lacks.

Added around the stock calls: ``n`` choices (one generation each), usage with cached tokens,
grammars checked before use (an unparsable grammar crashes llama.cpp: measured, a segfault),
token-array prompts checked against the vocabulary, embeddings pooled and normalized.
"""

from __future__ import annotations

import base64
import json
import math
import re
import struct
from typing import Any

from deployer.runtime.engine import Job, Tally
from deployer.runtime.protocol import ApiError, Call, EmbeddingCall, bad_request

# fields of the stock request types that are not arguments of Llama's calls
_NOT_KWARGS = {"n", "best_of", "user", "logit_bias_type", "min_tokens", "grammar", "model", "stream"}


def generation_kwargs(llama: Any, call: Call, body: Any, model_name: str) -> dict[str, Any]:
    """The keyword arguments of ``create_chat_completion`` / ``create_completion`` for a request.

    ``body`` is the validated stock request (``llama_cpp.server.types``). Raises :class:`ApiError`
    for what the model cannot take (a bad grammar, token ids outside the vocabulary).
    """
    import llama_cpp

    kwargs = body.model_dump(exclude=_NOT_KWARGS)
    kwargs["model"] = model_name  # never the local file path, which the stock calls would report
    kwargs["stream"] = call.stream
    if call.kind == "chat":
        kwargs.pop("response_format", None)  # turned into a grammar here, so json_schema works too
    if call.prompt_tokens is not None:
        n_vocab = llama.n_vocab()
        bad = next((t for t in call.prompt_tokens if t >= n_vocab), None)
        if bad is not None:
            raise bad_request(f"prompt token id {bad} is outside the vocabulary (0..{n_vocab - 1})", "prompt")
        kwargs["prompt"] = call.prompt_tokens
    grammar_text = _grammar_text(call, body.grammar)
    if grammar_text is not None:
        kwargs["grammar"] = _checked_grammar(llama, grammar_text)
    _check_tool_grammar(llama, kwargs.get("tools"), kwargs.get("tool_choice"))
    if body.logit_bias is not None:
        kwargs["logit_bias"] = _logit_bias(llama, body.logit_bias, body.logit_bias_type)
    if body.min_tokens > 0:
        kwargs["logits_processor"] = llama_cpp.LogitsProcessorList(
            [llama_cpp.MinTokensLogitsProcessor(body.min_tokens, llama.token_eos())]
        )
    return kwargs


def _grammar_text(call: Call, grammar: str | None) -> str | None:
    from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

    if call.json_schema is not None:
        try:
            return json_schema_to_gbnf(json.dumps(call.json_schema))
        except Exception as exc:  # the converter raises plain exceptions on schemas it cannot express
            raise bad_request(
                f"response_format json_schema cannot be turned into a grammar: {exc}", "response_format"
            ) from exc
    if call.json_object:
        return JSON_GBNF
    return grammar


def _check_tool_grammar(llama: Any, tools: list[dict[str, Any]] | None, choice: Any) -> None:
    """A named ``tool_choice`` makes the stock handler build a grammar from the tool's parameters:
    check it here, where a bad one is a 400 rather than a crash."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    if not tools or not isinstance(choice, dict):
        return
    name = (choice.get("function") or {}).get("name")
    tool = next((t for t in tools if t["function"]["name"] == name), None)
    if tool is None:
        return  # the stock handler says which name is missing (a 400, see run_generation)
    try:
        text = json_schema_to_gbnf(json.dumps(tool["function"]["parameters"]))
    except Exception:  # the stock handler then falls back to any JSON, which is a valid grammar
        return
    try:
        _checked_grammar(llama, text)
    except ApiError as exc:
        raise bad_request(f"the parameters schema of tool '{name}' cannot be turned into a grammar", "tools") from exc


def _checked_grammar(llama: Any, text: str) -> Any:
    """A ``LlamaGrammar`` that llama.cpp has parsed once (the stock path would segfault on a bad one)."""
    import llama_cpp
    from llama_cpp.llama_grammar import LlamaGrammar

    sampler = llama_cpp.llama_sampler_init_grammar(llama._model.vocab, text.encode("utf-8"), b"root")
    if not sampler:
        raise bad_request("grammar could not be parsed by llama.cpp (GBNF with a 'root' rule expected)", "grammar")
    llama_cpp.llama_sampler_free(sampler)
    return LlamaGrammar.from_string(text, verbose=False)


def _logit_bias(llama: Any, bias: dict[str, float], kind: str | None) -> dict[int, float]:
    n_vocab = llama.n_vocab()
    out: dict[int, float] = {}
    for key, value in bias.items():
        if kind == "tokens":  # llama-cpp-python's extension: keys are text
            for token in llama.tokenize(key.encode("utf-8"), add_bos=False, special=True):
                out[token] = value
            continue
        if not key.isdigit() or int(key) >= n_vocab:
            raise bad_request(
                f"logit_bias key '{key}' is not a token id of this model (0..{n_vocab - 1})", "logit_bias"
            )
        out[int(key)] = value
    return out


# ## Chat and completions


def run_generation(llama: Any, job: Job, call: Call, kwargs: dict[str, Any]) -> None:
    """Run ``call.n`` generations, emitting one merged result or the chunks of every choice."""
    try:
        _generate(llama, job, call, kwargs)
    except ValueError as exc:
        found = re.search(r"Requested tokens \((\d+)\) exceed context window of (\d+)", str(exc))
        if found:
            what = "messages" if call.kind == "chat" else "prompt"
            raise ApiError(
                400,
                f"This model's maximum context length is {found[2]} tokens, and the {what} came to {found[1]}: "
                f"shorten the {what}.",
                param=what,
                code="context_length_exceeded",
            ) from exc
        found = re.search(r"Tool choice '(.*)' not found in tools", str(exc))
        if found:
            raise bad_request(f"tool_choice names '{found[1]}', which is not in tools", "tool_choice") from exc
        raise


def _generate(llama: Any, job: Job, call: Call, kwargs: dict[str, Any]) -> None:
    method = llama.create_chat_completion if call.kind == "chat" else llama.create_completion
    seed = kwargs.get("seed")
    merged: dict[str, Any] | None = None
    head: dict[str, Any] | None = None  # id/created/model of the first choice, shared by all
    for index in range(call.n):
        if job.cancel_event.is_set():  # between choices: the next one is never started
            job.tally.cut = True
            break
        if seed is not None:  # n choices with one seed would all be the same text
            kwargs["seed"] = seed + index
        outcome = method(**kwargs)
        if call.stream:
            held: list[dict[str, Any]] = []
            for chunk in outcome:
                head = head or {k: chunk[k] for k in ("id", "created", "model")}
                chunk.update(head)
                for choice in chunk.get("choices", []):
                    choice["index"] = index
                chunk.pop("usage", None)  # usage comes once, at the end, when asked for
                held.append(chunk)
                # the role-only first chunk travels with the first token's: a separate hand-over to the
                # event loop would wait for this thread's next slice of the GIL (measured: ~4 ms of TTFT)
                if not _role_only(chunk):
                    job.emit("chunks", held)
                    held = []
            if held:
                job.emit("chunks", held)
        else:
            outcome["choices"][0]["index"] = index
            if merged is None:
                merged = outcome
            else:
                merged["choices"].append(outcome["choices"][0])
        job.tally.add(llama.tally, first=index == 0)
    if merged is not None:
        merged["usage"] = usage(job.tally)
        job.emit("result", merged)


def _role_only(chunk: dict[str, Any]) -> bool:
    choices = chunk.get("choices") or [{}]
    return set(choices[0].get("delta") or {}) == {"role"} and choices[0].get("finish_reason") is None


def usage(tally: Tally) -> dict[str, Any]:
    """OpenAI's usage object, with the prompt tokens served from the cache."""
    return {
        "prompt_tokens": tally.prompt_tokens,
        "completion_tokens": tally.completion_tokens,
        "total_tokens": tally.prompt_tokens + tally.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": tally.cached_tokens},
    }


# ## Embeddings


def run_embedding(llama: Any, job: Job, call: EmbeddingCall, model_name: str) -> None:
    """Embed every input: one unit-length vector each (mean of the token vectors for causal LMs)."""
    llama.forget_cache()  # embed() clears the KV cache
    if call.dimensions is not None and call.dimensions != llama.n_embd():
        raise bad_request(
            f"dimensions: this model returns {llama.n_embd()}-dimensional embeddings and cannot shorten them",
            "dimensions",
        )
    try:
        vectors, count = llama.embed(call.inputs, truncate=False, return_count=True)
    except ValueError as exc:
        if "exceed batch size" in str(exc):
            raise bad_request(
                f"an input is longer than {llama.n_batch} tokens, the most this server embeds at once", "input"
            ) from exc
        raise
    data = []
    for index, vector in enumerate(vectors):
        pooled = _unit(_mean(vector) if vector and isinstance(vector[0], list) else vector)
        encoded: Any = base64.b64encode(struct.pack(f"<{len(pooled)}f", *pooled)).decode() if call.base64 else pooled
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    job.tally.prompt_tokens = count
    job.emit(
        "result",
        {
            "object": "list",
            "data": data,
            "model": model_name,
            "usage": {"prompt_tokens": count, "total_tokens": count},
        },
    )


def _mean(rows: list[list[float]]) -> list[float]:
    # a model without pooling (a causal LM) gives one vector per token
    return [sum(column) / len(rows) for column in zip(*rows, strict=True)]


def _unit(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in vector))
    return [x / norm for x in vector] if norm > 0 else list(vector)
