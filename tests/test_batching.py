"""Continuous batching, through the official ``openai`` client against the real server (Gemma 3 270M).

The session's ``gemma_server`` has 4 slots and takes 8 requests at once (tests/serving.py).
"""

from __future__ import annotations

import json
import math
import threading
import time

import httpx
import jsonschema
import pytest

from tests.serving import GEMMA_TEST_SETTINGS, Server, gemma_config

pytestmark = pytest.mark.model

MODEL = "gemma-3-270m"
# Bounded: every string its grammar accepts is under 120 characters (tests/test_runtime_api.py's
# PERSON says why), so 200 tokens always close the JSON, on any CPU.
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


def _in_threads(count: int, work) -> list:
    """``work(i)`` in ``count`` threads at once; their results (or exceptions) in order."""
    results: list = [None] * count
    barrier = threading.Barrier(count)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = work(i)
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    return results


def _stream_completion(
    server: Server, prompt: str, tokens: int, *, exact: bool = True, **options
) -> tuple[str, str | None, int]:
    """(text, finish_reason, completion_tokens) of one streamed completion of at most ``tokens``
    tokens; with ``exact``, of exactly ``tokens`` (``min_tokens``: no early end of sequence)."""
    extra = options.pop("extra_body", {})
    stream = server.client().completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={**({"min_tokens": tokens} if exact else {}), **extra},
        **options,
    )
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.text
            finish = choice.finish_reason or finish
    assert usage is not None
    return text, finish, usage.completion_tokens


def _own_line(i: int) -> str:
    """A text only client ``i`` may receive: a grammar forces it whatever the CPU's kernels pick."""
    return f" Client {i} reads line {i} back, word for word."


def _forced_stream(server: Server, i: int) -> tuple[str, str | None, int]:
    grammar = f'root ::= "{_own_line(i)}"'
    return _stream_completion(server, f"Line {i}:", 64, exact=False, extra_body={"grammar": grammar})


def _metrics(server: Server) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families  # the serve extra brings it

    with server.http() as http:
        response = http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


@pytest.mark.parametrize("clients", [4, 8])
def test_concurrent_streams_all_finish_with_their_token_counts(gemma_server, clients):
    results = _in_threads(clients, lambda i: _stream_completion(gemma_server, f"List {i}: one, two,", 24))
    assert not [r for r in results if isinstance(r, Exception)], results
    for text, finish, tokens in results:
        assert finish == "length" and tokens == 24 and text


def test_concurrent_streams_each_get_their_own_text(gemma_server):
    """Batched decoding mixes nothing up: each of 6 clients (4 slots, 2 waiting) receives exactly
    the text its own grammar forces, complete, with the tokens it was sent counted."""
    results = _in_threads(6, lambda i: _forced_stream(gemma_server, i))
    assert not [r for r in results if isinstance(r, Exception)], results
    for i, (text, finish, tokens) in enumerate(results):
        assert (text, finish) == (_own_line(i), "stop")
        assert 0 < tokens <= len(_own_line(i))  # at least one character a token


def test_strict_mode_gives_the_same_text_alone_and_beside_others(gemma_file, start_server):
    """``parallel = 1``: one request decodes at a time, so what else is waiting cannot change a
    temperature-0 text (on any CPU). With more slots this is measured, not promised: BENCHMARKS.md
    "Determinism"."""
    strict = start_server(gemma_config(gemma_file, **{**GEMMA_TEST_SETTINGS, "parallel": 1, "concurrency": 4}))
    prompt = "The three primary colors are"
    alone = _stream_completion(strict, prompt, 24)
    others = ["Once upon a time", "def fibonacci(n):", "The weather today is"]
    beside = _in_threads(4, lambda i: _stream_completion(strict, [prompt, *others][i], 24))
    assert not [r for r in beside if isinstance(r, Exception)], beside
    assert beside[0] == alone
    assert alone[1:] == ("length", 24)


def test_a_client_that_leaves_frees_its_slot_and_the_others_are_untouched(gemma_server):
    before = _metrics(gemma_server)

    def leaver() -> int:
        body = {"prompt": "1, 2, 3, 4, 5,", "max_tokens": 900, "min_tokens": 900, "temperature": 0, "stream": True}
        with gemma_server.http() as http, http.stream("POST", "/v1/completions", json=body) as response:
            events = 0
            for line in response.iter_lines():
                events += line.startswith("data: ")
                if events == 3:
                    return events  # and the connection is closed
        return events

    results = _in_threads(4, lambda i: leaver() if i == 3 else _forced_stream(gemma_server, i))
    for i, (text, finish, _) in enumerate(results[:3]):
        assert (text, finish) == (_own_line(i), "stop")  # nothing cut, nothing mixed up
    deadline = time.monotonic() + 30
    while (busy := _metrics(gemma_server)["gguf_deploy_slots_busy"]) != 0:
        assert time.monotonic() < deadline, f"{busy} slots still busy after every client left"
        time.sleep(0.1)
    after = _metrics(gemma_server)
    generated = after["gguf_deploy_generation_tokens_total"] - before["gguf_deploy_generation_tokens_total"]
    assert generated < 3 * 64 + 200  # the leaver's 900 tokens were never generated


def test_the_second_turn_of_a_conversation_reuses_the_first(gemma_server):
    system = "You are a helpful assistant who answers briefly. " * 8  # past one n_batch chunk (32 tokens)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Name a fruit."}]
    client = gemma_server.client()
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    messages += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And a vegetable?"},
    ]
    second = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens - 32  # all of the first turn but its last partial chunk
    assert cached % 32 == 0 and cached < second.usage.prompt_tokens


def test_chat_logprobs_are_well_formed(gemma_server):
    reply = gemma_server.client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Name three colors."}],
        max_tokens=12,
        temperature=0,
        logprobs=True,
        top_logprobs=5,
        extra_body={"repeat_penalty": 1.0},  # temperature 0 is then the argmax of the model's own logprobs
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert "".join(item.token for item in content) == reply.choices[0].message.content
    for item in content:
        assert len(item.top_logprobs) == 5 and item.bytes == list(item.token.encode())
        assert sum(math.exp(top.logprob) for top in item.top_logprobs) <= 1 + 1e-6
        assert item.logprob <= 0
        # temperature 0 picks the most likely token: it leads the top list
        assert item.top_logprobs[0].token == item.token
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob)


def test_completion_logprobs_are_well_formed(gemma_server):
    reply = gemma_server.client().completions.create(
        model=MODEL,
        prompt="The sky is",
        max_tokens=6,
        temperature=0,
        logprobs=3,
        extra_body={"min_tokens": 6, "repeat_penalty": 1.0},
    )
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 6
    assert "".join(logprobs.tokens) == reply.choices[0].text
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(6)]
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert len(top) == 3 and max(top.values()) == pytest.approx(logprob) and token in top
        assert sum(math.exp(v) for v in top.values()) <= 1 + 1e-6


def test_echo_with_logprobs_is_a_clear_400(gemma_server):
    with gemma_server.http() as http:
        response = http.post("/v1/completions", json={"prompt": "Hi", "echo": True, "logprobs": 1, "max_tokens": 1})
    assert response.status_code == 400
    assert "echo with logprobs" in response.json()["error"]["message"]


def test_json_outputs_stay_valid_under_concurrency(gemma_server):
    def work(i: int) -> dict:
        if i % 2:
            response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
        else:  # JSON mode, with llama-cpp-python's schema extension: the base model never ends free JSON
            response_format = {"type": "json_object", "schema": PERSON}
        reply = gemma_server.client().chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Give me person number {i} as JSON."}],
            response_format=response_format,
            max_tokens=200,
            temperature=0.7,
            seed=i,
        )
        assert reply.choices[0].finish_reason == "stop"  # the grammar closed the JSON
        value = json.loads(reply.choices[0].message.content)
        jsonschema.validate(value, PERSON)
        return value

    results = _in_threads(4, work)
    assert not [r for r in results if isinstance(r, Exception)], results


def test_metrics_parse_as_prometheus_text_and_move(gemma_server):
    before = _metrics(gemma_server)
    _, _, tokens = _stream_completion(gemma_server, "Metrics:", 5)
    after = _metrics(gemma_server)
    assert after["gguf_deploy_generation_tokens_total"] - before["gguf_deploy_generation_tokens_total"] == tokens
    done = "gguf_deploy_requests_total{route=/v1/completions,status=200}"
    assert after[done] == before.get(done, 0) + 1
    assert (
        after["gguf_deploy_time_to_first_token_seconds_count"] > before["gguf_deploy_time_to_first_token_seconds_count"]
    )
    assert after["gguf_deploy_slots"] == 4 and 0 <= after["gguf_deploy_kv_cache_usage_ratio"] <= 1


def test_metrics_need_the_key(gemma_server):
    response = httpx.get(f"{gemma_server.url}/metrics", timeout=10)
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
