"""Window-sized sliding-window caches on the demo model: memory, a second chat turn, decode speed.

Gemma 3 270M Q4_K_M (``manifests/gemma-3-270m.toml``: context 4096, n_batch 512): 15 of its 18
layers slide over 512 tokens. Three servers of that manifest, one slot each, on the CPU:

    window + checkpoints   swa_full = false, ctx_checkpoints = 8 (the defaults)
    window, no checkpoints swa_full = false, ctx_checkpoints = 0: every prompt evaluated whole
    full                   swa_full = true (the behaviour before issue 20; its prompt cache needs no checkpoint)

(a) KV allocation: llama.cpp's own ``KV buffer size`` lines for the manifest's context with 1 and
    4 slots, with and without ``swa_full`` (``benchmarks.estimate_vs_llama.measure``).
(b) A two-turn chat whose first turn (about 1,400 tokens) is longer than the window: the second
    turn's time to first token (streamed, the official ``openai`` client) and ``cached_tokens``,
    and the decode speed of both turns. Each round uses a new conversation (a new first line), in
    interleaved order over the servers. Medians of ``--runs``.

    .venv/bin/python -m benchmarks.swa_cache --runs 3
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from benchmarks.estimate_vs_llama import measure
from benchmarks.serving import _free_port, model_file, ours_command, start_and_wait, stop
from deployer.estimate import MIB, EstimateSettings
from deployer.loading import load_manifest
from deployer.runtime import RuntimeConfig, runtime_config

ROOT = Path(__file__).resolve().parent.parent
SERVERS = {
    "window + checkpoints": {},
    "window, no checkpoints": {"ctx_checkpoints": 0},
    "full (swa_full = true)": {"swa_full": True},
}
NOTES = " ".join(
    f"Day {day}: the boat left at {4 + day % 3} in the morning, caught {day * 7 % 23} fish, and came back "
    f"when the wind turned {'north' if day % 2 else 'south'}."
    for day in range(1, 50)
)


def config(path: Path, **changes: object) -> RuntimeConfig:
    loaded = load_manifest(ROOT / "manifests" / "gemma-3-270m.toml")
    local = runtime_config(loaded, str(path), parallel=1, require_api_key=False)
    return replace(local, **changes)  # type: ignore[arg-type]


def kv_allocation(path: Path, n_ctx: int) -> list[tuple[int, bool, float]]:
    """(slots, swa_full, KV MiB llama.cpp allocated)."""
    return [
        (slots, full, measure(path, EstimateSettings(n_ctx, parallel=slots, swa_full=full, backend="cpu")).kv / MIB)
        for slots in (1, 4)
        for full in (False, True)
    ]


def _turn(client, messages: list[dict[str, str]], max_tokens: int) -> dict[str, float]:
    start = time.perf_counter()
    stream = client.chat.completions.create(
        model="gemma-3-270m",
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    first = last = None
    tokens, text, usage = 0, "", None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            now = time.perf_counter()
            first, last = first or now, now
            tokens += 1
            text += chunk.choices[0].delta.content
    assert first is not None and last is not None and usage is not None
    return {
        "ttft_ms": (first - start) * 1000,
        "tokens_per_s": (tokens - 1) / (last - first) if tokens > 1 else 0.0,
        "cached": usage.prompt_tokens_details.cached_tokens,
        "prompt": usage.prompt_tokens,
        "text": text,
    }


def conversation(client, tag: str, max_tokens: int) -> tuple[dict, dict]:
    messages = [{"role": "user", "content": f"Log {tag}. {NOTES} Which day was the best?"}]
    first = _turn(client, messages, max_tokens)
    messages += [{"role": "assistant", "content": first["text"]}, {"role": "user", "content": "Why?"}]
    return first, _turn(client, messages, max_tokens)


def main(argv: list[str] | None = None) -> int:
    import openai

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    path = model_file()
    n_ctx = config(path).n_ctx
    print(f"KV allocation of the demo model, context {n_ctx} (llama.cpp's KV buffer lines):\n")
    print("| slots | swa_full | KV MiB |\n|--:|---|--:|")
    for slots, full, mib in kv_allocation(path, n_ctx):
        print(f"| {slots} | {str(full).lower()} | {mib:.2f} |")
    started, processes, clients = time.monotonic(), [], {}
    with tempfile.TemporaryDirectory(prefix="swa-bench-") as folder:
        try:
            for i, (label, changes) in enumerate(SERVERS.items()):
                port = _free_port()
                (Path(folder) / str(i)).mkdir()
                command = ours_command(config(path, **changes), Path(folder) / str(i), port)
                process, _ = start_and_wait(command, f"http://127.0.0.1:{port}/health")
                processes.append(process)
                clients[label] = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=600)
            samples: dict[str, list[tuple[dict, dict]]] = {label: [] for label in clients}
            for run in range(args.runs):
                for label, client in clients.items():
                    samples[label].append(conversation(client, f"run-{run}", args.max_tokens))
        finally:
            for process in processes:
                stop(process)
    print("\nTwo-turn chat, one slot, temperature 0; medians of", args.runs, "conversations:\n")
    print(
        "| server | turn-1 prompt | turn-2 prompt | turn-2 cached | turn-2 TTFT ms | turn-1 TTFT ms "
        "| decode tok/s (turn 1) | decode tok/s (turn 2) |"
    )
    print("|---|--:|--:|--:|--:|--:|--:|--:|")
    texts = {}
    for label, runs in samples.items():

        def med(turn: int, key: str, runs: list = runs) -> float:
            return statistics.median(r[turn][key] for r in runs)

        texts[label] = [(a["text"], b["text"]) for a, b in runs]
        print(
            f"| {label} | {med(0, 'prompt'):.0f} | {med(1, 'prompt'):.0f} | {med(1, 'cached'):.0f} "
            f"| {med(1, 'ttft_ms'):.0f} | {med(0, 'ttft_ms'):.0f} | {med(0, 'tokens_per_s'):.1f} "
            f"| {med(1, 'tokens_per_s'):.1f} |"
        )
    same = len({tuple(t) for t in texts.values()}) == 1
    print(f"\nSame texts on every server: {'yes' if same else 'NO'}.")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; {time.monotonic() - started:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
