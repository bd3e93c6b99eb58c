"""What stays the same at temperature 0 on this CPU, and what weight repacking costs or gains here.

README's "Determinism" separates what the runtime guarantees on any CPU (a cached prefix never
changes a result; ``parallel = 1`` decodes one request at a time) from what llama.cpp does not
promise: bit-identical logits across batch sizes. This benchmark measures the latter per CPU, for
BENCHMARKS.md, instead of a test asserting it (a test would pass on one CPU and fail on another).

For each weight-repacking setting (``cpu_repack`` on and off; on is skipped on CPUs with AMX, where
llama.cpp's AMX kernels segfault: ggml-org/llama.cpp#20824), the demo model served by the runtime
with 4 slots and the demo's settings:

(a) alone vs beside others: each prompt alone, then the same prompt at once with three others.
    Reported: how many of the prompts gave the same text both ways.
(b) cached vs fresh: each question after a long story under a new prefix (fresh), then again after
    a request sharing that prefix (cached). Guaranteed equal by the runtime; checked on this CPU.
    The same procedure on a stock ``llama_cpp.Llama`` is the control: its own prefix reuse evaluates
    the rest of a prompt in other batches, which may or may not change the text on a given CPU.
(c) decode speed: aggregate streamed tokens per second of 1 and 4 clients (64 tokens each), the
    runtime's figure for repacking on against off.

    .venv/bin/python -m benchmarks.determinism            # a markdown report for BENCHMARKS.md
    .venv/bin/python -m benchmarks.determinism --json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import httpx

from benchmarks.serving import MANIFEST, _free_port, model_file, ours_command, start_and_wait, stop
from deployer.loading import load_manifest
from deployer.runtime import RuntimeConfig, runtime_config
from deployer.runtime.cpu import cpu_flags, cpu_name, has_amx, physical_cores

PROMPTS = [
    "The three primary colors are",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The weather today is",
    "A list of fruits: apple,",
    "The history of the printing press",
    "To make a cup of tea, first",
    "In 1969, astronauts",
]
STORY = "Mara kept a lighthouse on a rocky island. Every night she lit the lamp and watched the ships pass. " * 6
QUESTIONS = ["What did Mara keep?", "Where was the lighthouse?", "What did she watch?"]
TOKENS = 64


def _complete(base: str, prompt: str, max_tokens: int) -> tuple[str, int, float]:
    """(text, tokens, seconds) of one streamed temperature-0 completion of exactly ``max_tokens``."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "min_tokens": max_tokens, "temperature": 0, "stream": True}
    text, tokens, started = "", 0, time.perf_counter()
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=300) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {"):
                text += json.loads(line[6:])["choices"][0]["text"]
                tokens += 1
    return text, tokens, time.perf_counter() - started


def _chat(base: str, content: str) -> str:
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 40, "temperature": 0}
    response = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=300)
    response.raise_for_status()
    return response.json()["choices"][0]["message"]["content"]


def alone_vs_beside(base: str) -> dict[str, int]:
    alone = [_complete(base, prompt, 32)[0] for prompt in PROMPTS]
    same = 0
    for i, prompt in enumerate(PROMPTS):
        others = [PROMPTS[(i + k) % len(PROMPTS)] for k in (1, 2, 3)]
        with ThreadPoolExecutor(4) as pool:
            beside = list(pool.map(lambda p: _complete(base, p, 32)[0], [prompt, *others]))
        same += beside[0] == alone[i]
    return {"prompts": len(PROMPTS), "same": same}


def cached_vs_fresh(ask) -> dict[str, int]:
    """``ask(content) -> text``: each question after a prefix no earlier request had (uncached),
    then, after a request that shares the prefix, again (the prefix cached)."""
    same = 0
    for n, question in enumerate(QUESTIONS):
        prefix = f"Tale {n}-{time.monotonic_ns()}. {STORY}"
        uncached = ask(prefix + question)
        ask(prefix + "What happens next?")
        same += ask(prefix + question) == uncached
    return {"questions": len(QUESTIONS), "same": same}


def stock_control(config: RuntimeConfig, repack: bool) -> dict[str, int]:
    """The same procedure on a stock ``llama_cpp.Llama`` (n_batch 32, as the tests), whose own
    prefix reuse evaluates the rest of a prompt in other batches than a fresh evaluation."""
    from llama_cpp import llama_cpp as low

    original = low.llama_model_default_params

    def params():  # Llama has no argument for llama.cpp's extra buffer types
        made = original()
        made.use_extra_bufts = repack
        return made

    import llama_cpp

    low.llama_model_default_params = params
    try:
        llama = llama_cpp.Llama(
            config.model_path, n_ctx=1024, n_batch=32, n_ubatch=32, chat_format="gemma",
            n_threads=config.n_threads, verbose=False,
        )  # fmt: skip
    finally:
        low.llama_model_default_params = original

    def ask(content: str) -> str:
        messages = [{"role": "user", "content": content}]
        reply = llama.create_chat_completion(messages=messages, max_tokens=40, temperature=0, repeat_penalty=1.0)
        return reply["choices"][0]["message"]["content"]

    try:
        return cached_vs_fresh(ask)
    finally:
        llama.close()


def decode_speeds(bases: dict[bool, str], clients: int, rounds: int) -> dict[bool, float]:
    """Median over ``rounds`` of the aggregate tokens per second of ``clients`` concurrent streams,
    for each server, the servers taking turns within a round (drift in machine load hits all alike)."""
    rates: dict[bool, list[float]] = {key: [] for key in bases}
    for r in range(rounds):
        prompts = [PROMPTS[(i + r) % len(PROMPTS)] for i in range(clients)]
        for key, base in bases.items():
            started = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                results = list(pool.map(lambda prompt, base=base: _complete(base, prompt, TOKENS), prompts))
            rates[key].append(sum(tokens for _, tokens, _ in results) / (time.perf_counter() - started))
    return {key: statistics.median(values) for key, values in rates.items()}


def measure(config: RuntimeConfig, settings: list[bool], rounds: int) -> list[dict]:
    """One server per repacking setting, all loaded at once."""
    with tempfile.TemporaryDirectory() as folder, contextlib.ExitStack() as stack:
        bases = {}
        for repack in settings:
            port = _free_port()
            where = Path(folder) / ("repack" if repack else "no-repack")
            where.mkdir()
            process, _ = start_and_wait(
                ours_command(replace(config, cpu_repack=repack), where, port), f"http://127.0.0.1:{port}/health"
            )
            stack.callback(stop, process)
            bases[repack] = f"http://127.0.0.1:{port}"
            _complete(bases[repack], "Warm-up:", 8)
        rows = {
            repack: {
                "repack": repack,
                "alone_vs_beside": alone_vs_beside(base),
                "cached_vs_fresh": cached_vs_fresh(lambda content, base=base: _chat(base, content)),
            }
            for repack, base in bases.items()
        }
        print("measuring speed", file=sys.stderr)
        for clients in (1, 4):
            for repack, rate in decode_speeds(bases, clients, rounds).items():
                rows[repack][f"tok_s_{clients}"] = rate
    for repack, row in rows.items():
        row["stock_cached_vs_fresh"] = stock_control(config, repack)
    return list(rows.values())


def markdown(report: dict) -> str:
    lines = [
        f"CPU: {report['cpu']} ({report['threads']} threads); demo model, 4 slots, n_batch {report['n_batch']}.",
        "",
        "| repack | alone = beside 3 others | cached = fresh (ours) | cached = fresh (stock `Llama`) "
        "| 1 client tok/s | 4 clients tok/s |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for row in report["rows"]:
        ab, cf, stock = row["alone_vs_beside"], row["cached_vs_fresh"], row["stock_cached_vs_fresh"]
        lines.append(
            f"| {'on' if row['repack'] else 'off'} | {ab['same']} of {ab['prompts']} | {cf['same']} of "
            f"{cf['questions']} | {stock['same']} of {stock['questions']} | {row['tok_s_1']:.1f} | {row['tok_s_4']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="speed rounds per level (median reported)")
    parser.add_argument("--model-path", type=Path, help="default: the demo model from its PyPI package")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    path = args.model_path or model_file()
    config = replace(
        runtime_config(load_manifest(MANIFEST), str(path), require_api_key=False),
        parallel=4,
        concurrency=8,
        n_threads=physical_cores(),
    )
    settings = [False] if has_amx(cpu_flags()) else [True, False]
    rows = measure(config, settings, args.rounds)
    report = {"cpu": cpu_name(), "threads": config.n_threads, "n_batch": config.n_batch, "rows": rows}
    print(json.dumps(report, indent=2) if args.json else markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
