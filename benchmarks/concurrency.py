"""Many clients at once: the runtime against llama-cpp-python's stock server and against llama-server.

N = 1, 2, 4, 8 clients at once, each sending ``--requests`` streaming ``/v1/completions`` one after
the other (64 tokens, temperature 0). Measured per level: aggregate generated tokens per second over
the level's wall time (first request sent to last token received), and time to first token (TTFT,
request sent to first text chunk) p50/p95 over all its requests.

Same model (Gemma 3 270M Q4_K_M, ``manifests/gemma-3-270m.toml``: context 4096 per slot, n_batch 512,
flash attention, f16 KV cache), same machine, 4 slots and 2 threads everywhere:

(a) ``python -m deployer.runtime`` with ``parallel = 4``, ``n_threads = 2`` and ``concurrency = 8``
    (the most clients of any level: nobody is refused, the rest queue);
(b) ``python -m llama_cpp.server``, llama-cpp-python's stock server, which cannot batch: one request
    generates at a time behind a lock, so it has one context (4096) and the others wait. It runs with
    ``interrupt_requests=False`` (by default a new request cuts the running stream short) and
    ``logits_all=False`` (its default ``True`` costs n_ctx x n_vocab floats and time);
(c) ``llama-server -np 4 -t 2 -c 16384``, built by ``benchmarks/llama_cpp_build.py`` from the llama.cpp
    vendored by the installed llama-cpp-python's source release; llama-server splits ``-c`` across its
    slots (no ``--kv-unified``), so each slot has 4096 like ours. ``--swa-full`` as llama-cpp-python's
    contexts have it, ``-fit off`` so that it adjusts none of the settings given.

Each request must generate exactly 64 tokens: the prompts are text that Gemma 3 270M continues past
64 tokens at temperature 0 (no ``ignore_eos`` / ``min_tokens``, which not all three servers have),
and every request is checked: 64 text chunks (one per token) and ``finish_reason == "length"``.
Requests that fail the check are counted and shown; their tokens still count.

Also ``llama-batched-bench`` on the same model and threads: aggregate decode speed (S_TG) of 1/2/4/8
parallel sequences, llama.cpp's ceiling without HTTP.

Weight repacking: on CPUs with AMX, llama.cpp's AMX buffer type crashes in ``ggml_backend_amx_mul_mat``
with this Q4_K_M model (ggml-org/llama.cpp#20824, reproduced here). ``--repack auto`` (the default)
therefore turns extra buffer types off on such CPUs, for all three servers alike: ``--no-repack`` for
the llama.cpp tools, ``use_extra_bufts = False`` in the model parameters of the Python servers (set by
a launcher around the unchanged module; the runtime's config also says ``cpu_repack``).

    .venv/bin/python -m benchmarks.llama_cpp_build          # once: builds and caches llama-server
    .venv/bin/python -m benchmarks.concurrency              # a markdown table for BENCHMARKS.md
    .venv/bin/python -m benchmarks.concurrency --servers ours,llama-server --levels 1,4 --requests 2 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import httpx

from benchmarks.llama_cpp_build import build as build_llama_cpp
from benchmarks.llama_cpp_build import installed_version
from benchmarks.serving import MANIFEST, _free_port, model_file, start_and_wait, stock_command, stop
from deployer.loading import load_manifest
from deployer.runtime import RuntimeConfig, runtime_config
from deployer.runtime.cpu import cpu_flags, cpu_name, repack_weights

LEVELS = (1, 2, 4, 8)
SLOTS = 4  # llama-server's default slot count
THREADS = 2
MAX_TOKENS = 64
BENCH_PROMPT_TOKENS = 16  # llama-batched-bench's prompt length, about that of PROMPTS
REQUEST_TIMEOUT_S = 600
PROMPTS = (  # each continues past 64 tokens at temperature 0 with this model (checked on every request)
    "The history of the city begins in the twelfth century, when",
    "Here is a detailed recipe for bread. First,",
    "Chapter 1\n\nThe train pulled into the station just after midnight, and",
    "The following essay explains how computers work. A computer is",
    "Dear diary, today was a strange day. In the morning",
    "A guide to planting a vegetable garden. Step one:",
    "The old sailor told the children a story about",
    "Photosynthesis is the process by which plants",
)
OURS = "gguf-deploy runtime"
STOCK = "stock llama_cpp.server"
LLAMA_SERVER = "llama-server"
SERVER_KEYS = {"ours": OURS, "stock": STOCK, "llama-server": LLAMA_SERVER}

# Runs a Python server module unchanged, with llama.cpp's extra buffer types (AMX, CPU repacking)
# off: what llama-server's --no-repack does. Llama() reads llama_model_default_params() when it loads
# a model; the patch is applied when the server itself first imports llama_cpp, so that whatever it
# does before (the runtime sets libgomp's environment) happens as without the launcher.
NO_REPACK_LAUNCHER = """
import importlib.util, runpy, sys

class PatchOnImport:
    def find_spec(self, name, path=None, target=None):
        if name != "llama_cpp.llama_cpp":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module
        def exec_module(module):
            run(module)
            defaults = module.llama_model_default_params
            def no_extra_bufts():
                params = defaults()
                params.use_extra_bufts = False
                return params
            module.llama_model_default_params = no_extra_bufts
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, PatchOnImport())
module = sys.argv[1]
sys.argv = [module, *sys.argv[2:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""

# ## the load


@dataclass(frozen=True)
class Request:
    status: int
    ttft_s: float | None  # None: no text came back
    tokens: int  # text chunks: one per token
    finish_reason: str | None


async def one_request(client: httpx.AsyncClient, model: str, prompt: str) -> Request:
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    start = time.perf_counter()
    ttft, tokens, finish = None, 0, None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return Request(response.status_code, None, 0, None)
            async for line in response.aiter_lines():
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue  # blank lines, SSE comments (pings)
                choices = json.loads(line[5:]).get("choices") or []
                if not choices:
                    continue  # a usage-only chunk
                if choices[0].get("text"):
                    ttft = ttft if ttft is not None else time.perf_counter() - start
                    tokens += 1
                finish = choices[0].get("finish_reason") or finish
    except httpx.TransportError as exc:  # counted as failed, with what was streamed before
        print(f"    {type(exc).__name__}: {exc}", file=sys.stderr)
        return Request(0, ttft, tokens, None)
    return Request(200, ttft, tokens, finish)


async def run_level(base_url: str, model: str, clients: int, requests_each: int) -> dict[str, float]:
    """``clients`` concurrent clients, each sending ``requests_each`` requests one after the other."""
    # a new connection per request: no race with a server closing an idle or used-up keep-alive one
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base_url, timeout=REQUEST_TIMEOUT_S, limits=limits) as client:

        async def client_loop(index: int) -> list[Request]:
            prompts = [PROMPTS[(index + k * clients) % len(PROMPTS)] for k in range(requests_each)]
            return [await one_request(client, model, prompt) for prompt in prompts]

        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        per_client = await asyncio.gather(*(client_loop(i) for i in range(clients)))
        wall = time.perf_counter() - started
    results = [r for rs in per_client for r in rs]
    done = [r for r in results if r.status in (0, 200)]  # 0: cut by a transport error
    ttfts = sorted(r.ttft_s for r in done if r.ttft_s is not None)
    return {
        "clients": clients,
        "requests": len(results),
        "tokens_per_s": sum(r.tokens for r in done) / wall,
        "ttft_p50_ms": percentile(ttfts, 50) * 1000,
        "ttft_p95_ms": percentile(ttfts, 95) * 1000,
        "full_64_tokens": sum(r.tokens == MAX_TOKENS and r.finish_reason == "length" for r in done),
        "refused": sum(r.status == 429 for r in results),
        "failed": sum(r.status not in (200, 429) for r in results),  # status 0 included
        "wall_s": wall,
        "load_1min": load_before,
    }


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of sorted ``values`` (NaN when empty)."""
    if not values:
        return float("nan")
    rank = max(1, -(-len(values) * q // 100))  # ceil
    return values[int(rank) - 1]


# ## the servers


def python_module(module: str, args: list[str], no_repack: bool) -> list[str]:
    if no_repack:
        return [sys.executable, "-c", NO_REPACK_LAUNCHER, module, *args]
    return [sys.executable, "-m", module, *args]


def ours_command(config: RuntimeConfig, folder: Path, port: int, no_repack: bool) -> list[str]:
    path = folder / "runtime.json"
    # "parallel" and "cpu_repack" are read by the batching runtime; an older RuntimeConfig ignores them
    settings = {**config.to_dict(), "parallel": SLOTS, "cpu_repack": not no_repack}
    path.write_text(json.dumps(settings, sort_keys=True))
    args = ["--config", str(path), "--host", "127.0.0.1", "--port", str(port)]
    return python_module("deployer.runtime", args, no_repack)


def stock_server_command(config: RuntimeConfig, port: int, no_repack: bool) -> list[str]:
    command = stock_command(config, port, logits_all=False)
    extra = ["--n_threads", str(THREADS), "--n_threads_batch", str(THREADS), "--interrupt_requests", "False"]
    return python_module("llama_cpp.server", [*command[3:], *extra], no_repack)  # command[:3]: python -m module


def llama_cpp_common(config: RuntimeConfig, no_repack: bool) -> list[str]:
    kv = config.kv_cache_type
    return [
        "-m", config.model_path, "-t", str(THREADS), "-tb", str(THREADS),
        "-b", str(config.n_batch), "-ub", str(config.n_ubatch), "-fa", "on" if config.flash_attn else "off",
        "-ctk", kv, "-ctv", kv, "-fit", "off", *(["--no-repack"] if no_repack else []),
    ]  # fmt: skip


def llama_server_command(binary: str, config: RuntimeConfig, port: int, no_repack: bool) -> list[str]:
    return [
        binary, *llama_cpp_common(config, no_repack),
        "-np", str(SLOTS), "-c", str(SLOTS * config.n_ctx), "--no-kv-unified", "--swa-full",
        "-a", config.model_name, "--no-webui", "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip


def batched_bench(binary: str, config: RuntimeConfig, levels: tuple[int, ...], no_repack: bool) -> dict[str, float]:
    """llama-batched-bench's aggregate decode tokens/s (S_TG) at each level, from its JSON lines."""
    command = [
        binary, *llama_cpp_common(config, no_repack), "-c", str(max(levels) * config.n_ctx),
        "-npp", str(BENCH_PROMPT_TOKENS), "-ntg", str(MAX_TOKENS), "-npl", ",".join(map(str, levels)),
        "--output-format", "jsonl",
    ]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, timeout=REQUEST_TIMEOUT_S, check=True)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return {str(row["pl"]): row["speed_tg"] for row in rows}  # str keys: as they come back from JSON


# ## the run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3, help="requests per client at each level (default: 3)")
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)), help="client counts (default: 1,2,4,8)")
    parser.add_argument("--servers", default=",".join(SERVER_KEYS), help="comma-separated: ours, stock, llama-server")
    parser.add_argument("--repack", choices=("auto", "on", "off"), default="auto", help="auto: off on AMX CPUs")
    parser.add_argument("--model-path", type=Path, help="default: the demo model from its PyPI package")
    parser.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    args = parser.parse_args(argv)
    chosen = [SERVER_KEYS[key.strip()] for key in args.servers.split(",")]
    levels = tuple(int(n) for n in args.levels.split(","))

    path = args.model_path or model_file()
    manifest_config = runtime_config(load_manifest(MANIFEST), str(path), require_api_key=False)
    config = replace(manifest_config, n_threads=THREADS, concurrency=max(levels))
    no_repack = not repack_weights({"auto": None, "on": True, "off": False}[args.repack], cpu_flags())
    build = build_llama_cpp(installed_version())  # instant when cached
    folder = Path(tempfile.mkdtemp(prefix="bench-concurrency-"))

    commands: dict[str, Callable[[int], list[str]]] = {
        OURS: lambda port: ours_command(config, folder, port, no_repack),
        STOCK: lambda port: stock_server_command(config, port, no_repack),
        LLAMA_SERVER: lambda port: llama_server_command(build.llama_server, config, port, no_repack),
    }
    health = {OURS: "/health", STOCK: "/v1/models", LLAMA_SERVER: "/health"}
    urls: dict[str, str] = {}
    processes = []
    results: dict[str, list[dict[str, float]]] = {label: [] for label in chosen}
    started = time.perf_counter()
    try:
        for label in chosen:
            port = _free_port()
            process, _ = start_and_wait(commands[label](port), f"http://127.0.0.1:{port}{health[label]}")
            processes.append(process)
            urls[label] = f"http://127.0.0.1:{port}"
            asyncio.run(run_level(urls[label], config.model_name, 1, 1))  # warm-up
        for clients in levels:  # level after level, server after server: drift in load hits all alike
            for label in chosen:
                print(f"  {label}: {clients} client(s)", file=sys.stderr)
                level = asyncio.run(run_level(urls[label], config.model_name, clients, args.requests))
                print(f"    {json.dumps(level)}", file=sys.stderr)
                results[label].append(level)
    finally:
        for process in processes:
            stop(process)
    print("  llama-batched-bench", file=sys.stderr)
    bench = batched_bench(build.llama_batched_bench, config, levels, no_repack)

    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "cpu": cpu_name(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "llama_cpp_python": build.version,
        "model": path.name,
        "slots": SLOTS,
        "threads": THREADS,
        "n_ctx_per_slot": config.n_ctx,
        "max_tokens": MAX_TOKENS,
        "levels": levels,
        "requests_per_client": args.requests,
        "repack": not no_repack,
        "seconds": round(time.perf_counter() - started),
        "servers": results,
        "batched_bench_tokens_per_s": bench,
    }
    print(json.dumps(report, indent=2) if args.json else markdown(report))
    return 0


def markdown(report: dict) -> str:
    servers: dict[str, list[dict]] = report["servers"]
    levels = report["levels"]
    lines = [
        "| clients |" + "".join(f" {label}: tok/s | TTFT p50 / p95 ms |" for label in servers),
        "|--:|" + "--:|--:|" * len(servers),
    ]
    for i, clients in enumerate(levels):
        cells = "".join(
            f" {rows[i]['tokens_per_s']:.1f} | {rows[i]['ttft_p50_ms']:.0f} / {rows[i]['ttft_p95_ms']:.0f} |"
            for rows in servers.values()
        )
        lines.append(f"| {clients} |{cells}")
    reference = servers.get(LLAMA_SERVER)
    others = {label: rows for label, rows in servers.items() if label != LLAMA_SERVER}
    if reference is not None and others:
        lines += [
            "",
            "Against llama-server (targets: tok/s ≥ 0.9× at every level; TTFT p50 at 4 clients ≤ 1.5×):",
            "",
            "| clients |" + "".join(f" {label}: tok/s ÷ | TTFT p50 ÷ |" for label in others),
            "|--:|" + "--:|--:|" * len(others),
        ]
        for i, clients in enumerate(levels):
            ref = reference[i]
            cells = "".join(
                f" {rows[i]['tokens_per_s'] / ref['tokens_per_s']:.2f}× |"
                f" {rows[i]['ttft_p50_ms'] / ref['ttft_p50_ms']:.2f}× |"
                for rows in others.values()
            )
            lines.append(f"| {clients} |{cells}")
    bench = report["batched_bench_tokens_per_s"]
    lines += [
        "",
        "llama-batched-bench, aggregate decode (S_TG): "
        + " / ".join(f"{bench.get(str(n), float('nan')):.1f}" for n in levels)
        + f" tok/s at {' / '.join(map(str, levels))} sequences.",
        "",
        "Checks per level: requests with 64 tokens and finish_reason length / all (refused 429, failed); "
        "1-minute load average when the level started:",
    ]
    for label, rows in servers.items():
        checks = "; ".join(
            f"{r['clients']}: {r['full_64_tokens']}/{r['requests']}"
            + (f", {r['refused']} refused" if r["refused"] else "")
            + (f", {r['failed']} failed" if r["failed"] else "")
            + f", load {r['load_1min']:.1f}"
            for r in rows
        )
        lines.append(f"- {label}: {checks}")
    lines += [
        "",
        f"{report['date']}; {report['machine']}, {report['cpu']}; llama-cpp-python {report['llama_cpp_python']}; "
        f"{report['model']}; {report['slots']} slots × {report['n_ctx_per_slot']} context, {report['threads']} "
        f"threads; {report['max_tokens']} tokens per request, {report['requests_per_client']} requests per client; "
        f"weight repacking {'on' if report['repack'] else 'off (AMX CPU: llama.cpp#20824)'}; {report['seconds']} s.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
