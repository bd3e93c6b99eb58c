"""The bridge from a protocol's request to the engine: a :class:`GenerationRequest` into a :class:`Generation`.

Runs on the event loop, beside the model thread, for every protocol: the prompt's tokens are checked
against the vocabulary and the context, the logit biases resolved, the grammar checked (an
unparsable grammar would crash llama.cpp: measured, a segfault) before the engine sees it.
"""

from __future__ import annotations

from deployer.runtime.engine.model import ModelInterface
from deployer.runtime.engine.sampling import Generation, Sampling
from deployer.runtime.errors import ApiError, bad_request
from deployer.runtime.protocols.request import GenerationRequest

# ## Requests


def generation(
    model: ModelInterface,
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
    n_vocab = model.n_vocab
    if max(prompt) >= n_vocab:
        bad = next(t for t in prompt if t >= n_vocab)
        raise bad_request(f"prompt token id {bad} is outside the vocabulary (0..{n_vocab - 1})", "prompt")
    if len(prompt) >= n_ctx:  # not even one token would fit after it
        raise ApiError(
            400,
            f"This model's maximum context length is {n_ctx} tokens, and the {what} came to {len(prompt)}: "
            f"shorten the {what}.",
            param=what,
            code="context_length_exceeded",
        )
    if grammar is not None and not model.check_grammar(grammar):
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


def completion_prompt(model: ModelInterface, request: GenerationRequest) -> list[int]:
    """The tokens of a ``/v1/completions`` prompt (text with BOS as the model wants it, or token ids)."""
    if isinstance(request.prompt, list):
        return list(request.prompt)
    return model.tokenize(request.prompt, add_special=True) if request.prompt else [model.bos]


def json_grammar(model: ModelInterface, request: GenerationRequest) -> str | None:
    """The grammar of the answer's JSON format (a schema, or any JSON object), if the request has one."""
    if request.json_schema is None and not request.json_object:
        return None
    try:
        return model.json_grammar(request.json_schema)
    except ValueError as exc:
        raise bad_request(f"the JSON schema cannot be turned into a grammar: {exc}", "response_format") from exc


def _logit_bias(model: ModelInterface, bias: dict[str, float], kind: str | None) -> tuple[tuple[int, float], ...]:
    out: dict[int, float] = {}
    n_vocab = model.n_vocab
    if kind == "tokens":  # llama-cpp-python's extension: keys are text
        for key, value in bias.items():
            for token in model.tokenize(key, add_special=False):
                out[token] = value
        return tuple(out.items())
    # token ids: checked and converted with builtins over all keys (a request may bias hundreds of tokens)
    if all(map(str.isdigit, bias)) and (ids := list(map(int, bias))) and max(ids) < n_vocab:
        return tuple(dict(zip(ids, bias.values(), strict=True)).items())
    if not bias:
        return ()
    key = next(key for key in bias if not key.isdigit() or int(key) >= n_vocab)
    raise bad_request(f"logit_bias key '{key}' is not a token id of this model (0..{n_vocab - 1})", "logit_bias")
