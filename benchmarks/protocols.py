"""The wire protocols against each other: streaming throughput of /v1/responses and /v1/messages vs chat.

One runtime (``python -m deployer.runtime``, the demo model Gemma 3 270M Q4_K_M, 4 slots, 2 threads),
``--clients`` clients at once, each sending ``--requests`` streaming requests one after the other to
one route: the same conversation, 64 tokens exactly (``max_tokens`` 64 and the ``min_tokens`` 64
extension, which every protocol honours), temperature 0. Measured per route: aggregate generated
tokens per second (the tokens the final usage of each stream reports, over the wall time from the
first request sent to the last event received). Routes take turns, round after round, so drift in
the machine's load hits all alike; the median of the rounds is reported.

    .venv/bin/python -m benchmarks.protocols                  # a markdown table for BENCHMARKS.md
    .venv/bin/python -m benchmarks.protocols --rounds 5 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx

from benchmarks.concurrency import SLOTS, THREADS, ours_command
from benchmarks.serving import MANIFEST, _free_port, model_file, start_and_wait, stop
from deployer.loading import load_manifest
from deployer.runtime import runtime_config
from deployer.runtime.cpu import cpu_flags, cpu_name, repack_weights

TOKENS = 64
ASK = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper and the sea."}]
COMMON = {"max_tokens": TOKENS, "min_tokens": TOKENS, "temperature": 0, "stream": True}
BODIES: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {"model": "m", "messages": ASK, "stream_options": {"include_usage": True}, **COMMON},
    "/v1/responses": {
        "model": "m",
        "input": ASK,
        "max_output_tokens": TOKENS,
        **{k: v for k, v in COMMON.items() if k != "max_tokens"},
    },
    "/v1/messages": {"model": "m", "messages": ASK, **COMMON},
}


def _tokens(route: str, events: list[dict[str, Any]]) -> int:
    """The generated tokens the stream's final usage reports."""
    if route == "/v1/chat/completions":
        return next(e["usage"]["completion_tokens"] for e in events if e.get("usage"))
    if route == "/v1/responses":
        ends = ("response.completed", "response.incomplete")  # 64 tokens: incomplete, max_output_tokens
        return next(e["response"]["usage"]["output_tokens"] for e in events if e["type"] in ends)
    return next(e["usage"]["output_tokens"] for e in events if e["type"] == "message_delta")


async def one(client: httpx.AsyncClient, route: str) -> int:
    events = []
    async with client.stream("POST", route, json=BODIES[route]) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    return _tokens(route, events)


async def level(base_url: str, route: str, clients: int, requests: int) -> float:
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:

        async def worker() -> int:
            return sum([await one(client, route) for _ in range(requests)])

        started = time.perf_counter()
        counts = await asyncio.gather(*(worker() for _ in range(clients)))
        return sum(counts) / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=2, help="requests per client per round (default: 2)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    path = model_file()
    config = replace(
        runtime_config(load_manifest(MANIFEST), str(path), require_api_key=False),
        n_threads=THREADS,
        concurrency=args.clients,
    )
    port = _free_port()
    folder = Path(tempfile.mkdtemp(prefix="bench-protocols-"))
    process, _ = start_and_wait(
        ours_command(config, folder, port, not repack_weights(None, cpu_flags())), f"http://127.0.0.1:{port}/health"
    )
    url = f"http://127.0.0.1:{port}"
    rates: dict[str, list[float]] = {route: [] for route in BODIES}
    try:
        for route in BODIES:  # warm-up
            asyncio.run(level(url, route, 1, 1))
        for round_ in range(args.rounds):
            for route in BODIES:
                rate = asyncio.run(level(url, route, args.clients, args.requests))
                print(f"  round {round_ + 1} {route}: {rate:.1f} tokens/s", file=sys.stderr)
                rates[route].append(rate)
    finally:
        stop(process)
    medians = {route: statistics.median(values) for route, values in rates.items()}
    base = medians["/v1/chat/completions"]
    report = {
        "cpu": cpu_name(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "clients": args.clients,
        "slots": SLOTS,
        "threads": THREADS,
        "rounds": rates,
        "median_tokens_per_s": medians,
        "vs_chat": {route: value / base - 1 for route, value in medians.items()},
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['cpu']}, {report['date']}: {args.clients} clients, {SLOTS} slots, {THREADS} threads\n")
    print("| route | tokens/s (median) | vs chat | rounds |")
    print("|---|---|---|---|")
    for route, value in medians.items():
        shown = ", ".join(f"{r:.1f}" for r in rates[route])
        print(f"| `{route}` | {value:.1f} | {report['vs_chat'][route]:+.1%} | {shown} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
