"""Many clients at once: the runtime against llama-server and two llama-cpp-python servers, in two regimes.

N clients at once, each sending ``--requests`` streaming ``/v1/completions`` one after the other
(temperature 0; a client sends its next request when the last one ended: back to back). Measured per
level: aggregate generated tokens per second over the level's wall time (first request sent to last
token received), and time to first token (TTFT, request sent to first text chunk) p50/p95 over all
its requests. ``--runs K`` repeats every level K times; the tables show the medians.

Two regimes (``--regime``):

**demo** (the default): Gemma 3 270M Q4_K_M (``manifests/gemma-3-270m.toml``: context 4096 per slot,
n_batch 512, flash attention, f16 KV cache), 64 tokens per request, 1/2/4/8 clients with 4 slots.
Every request must generate exactly 64 tokens: the prompts are text that Gemma 3 270M continues past
64 tokens at temperature 0, and every request is checked: 64 text chunks (one per token) and
``finish_reason == "length"``. All servers are started at once and measured level after level,
server after server (run after run within a level), so that drift in machine load hits all alike.

**fast**: ``tests/ggufgen.py``'s ``TINY_LLAMA`` (4 layers, 256 wide, random F32 weights, 11 MB),
written to a temporary folder, 1024 context per slot, 128 tokens per request; 1/4/8 clients with 4
slots and 1/4/8/16 with 8 slots (``--slots 4,8``; never more clients than twice the slots). Its decode
costs almost nothing, so what a server spends per token around llama.cpp (sampling, detokenizing,
scheduling, the event loop, HTTP) decides its throughput. The model has random weights, so every
request carries a ``logit_bias`` of -100 on every token that is not a plain word piece (``<unk>``,
``<s>``, ``</s>`` = EOS and the 256 byte tokens: 259 ids, read from the file's token types): EOS is
never sampled, every token is one ``▁w<i>`` piece, and every request generates exactly 128 tokens,
counted as the words of the streamed text (independent of how a server groups tokens into chunks)
and checked with ``finish_reason == "length"``. ``logit_bias`` is OpenAI's own field and all four
servers apply it (llama-server and llama-cpp-python's example server: llama.cpp's logit-bias
sampler; ours: the same, in its sampler chain; the stock server: a Python logits processor, a loop
over the 259 ids on every token, host cost that the others pay in C). One server process runs at a
time: every run starts each server in turn, measures all its levels, stops it.

The servers, all on the same file, same machine, the same slots and 2 threads:

(a) ``ours``: ``python -m deployer.runtime`` with ``parallel`` = slots, ``n_threads = 2`` and
    ``concurrency`` = the block's most clients (nobody is refused, the rest queue);
(b) ``stock``: ``python -m llama_cpp.server``, llama-cpp-python's stock server, which cannot batch: one
    request generates at a time behind a lock, so it has one context (one slot's) and the others
    wait. It runs with ``interrupt_requests=False`` (by default a new request cuts the running stream
    short) and ``logits_all=False`` (its default ``True`` costs n_ctx x n_vocab floats and time);
(c) ``llama-server``: ``llama-server -np <slots> -t 2 -c <slots x context>``, built by
    ``benchmarks/llama_cpp_build.py`` from the llama.cpp vendored by the installed llama-cpp-python's
    source release; llama-server splits ``-c`` across its slots (``--no-kv-unified``), so each slot
    has the context ours has. ``--swa-full`` as llama-cpp-python's contexts have it, ``-fit off`` so
    that it adjusts none of the settings given, ``--no-cache-prompt --cache-ram 0``: no prefix of an
    earlier prompt reused (ours reuses whole ``n_batch`` chunks only, so that a cached prefix never
    changes a result: the prompts here, all shorter than a chunk, are evaluated whole by both);
(d) ``example``: llama-cpp-python's batched example server, ``examples/server/server.py`` of the
    installed release's source (unpacked by ``benchmarks/llama_cpp_build.py``'s cache, downloaded
    with pip when missing; nothing is built), run with the installed package and a config file:
    ``n_seq_max`` = slots, ``n_ctx`` = slots x context with ``kv_unified = false`` (per-slot contexts,
    as llama-server's), ``threads``/``threads_batch`` 2, the same batch, flash attention and KV types,
    ``swa_full = true``, and ``store_logits = false`` (its default ``true`` copies every token's
    logits, as the stock server's ``logits_all`` does).

Also, when llama-server is among the servers, ``llama-batched-bench`` on the same model and
threads: aggregate decode speed (S_TG) at every level's number of parallel sequences, llama.cpp's
ceiling without HTTP.

**Per-token cost of our runtime** (both regimes), measured around every level of ``ours``:

- *event loop CPU*: the CPU time of the runtime's main thread (it runs the asyncio event loop: HTTP,
  SSE, the protocol layers), per streamed token;
- *model thread CPU*: the CPU time of the thread named ``gguf-deploy-model`` (scheduling, sampling,
  detokenizing, and its share of llama.cpp's decode: it is OpenMP's main thread; the other OpenMP
  workers are other threads), per streamed token. Python 3.11 gives threads no OS names, and a
  thread inherits the OS name of the thread that creates it (llama.cpp's OpenMP workers are created
  by the model thread), so ``/proc`` cannot tell them apart by name: the launcher that starts our
  runtime records every Python thread's native id and name in a file, where the model thread is found;
- CPU times come from ``/proc/<pid>/task/<tid>/schedstat`` (nanoseconds on the CPU) where the kernel
  has it, else from ``/proc/<pid>/task/<tid>/stat`` (utime + stime, in clock ticks of 10 ms: too
  coarse for a short level); the JSON has both;
- *stages*: the model thread's wall time by stage, from the runtime's own
  ``gguf_deploy_engine_seconds_total{stage}`` counter on ``/metrics`` (decode: llama.cpp's batch;
  sample: sampler chains; schedule: admission, steps, applying results; text: detokenizing, stop
  strings; handover: to the event loop), scraped before and after the level (the scrape itself falls
  outside the CPU window), per streamed token. *host* is every stage but decode: the model thread's
  own cost per token.

**Beside llama-server's HTTP side** (``--threads 1`` only): the CPU time, per streamed token, of
llama-server's threads other than its main one, from the same /proc counters. With one llama.cpp
thread its main thread runs the slots, the decode and the sampling, and the others are its HTTP side
(the connection threads: parsing, each chunk's JSON, the socket writes; the listener): the peer of
our event-loop thread (which also reads the engine's steps). With more llama.cpp threads, OpenMP's
workers run in its process under no name of their own, and no figure is given.

Weight repacking: on CPUs with AMX, llama.cpp's AMX buffer type crashes in ``ggml_backend_amx_mul_mat``
with the Q4_K_M model (ggml-org/llama.cpp#20824, reproduced here). ``--repack auto`` (the default)
therefore turns extra buffer types off on such CPUs, for all servers alike: ``--no-repack`` for the
llama.cpp tools, ``use_extra_bufts = False`` in the model parameters of the Python servers (set by a
launcher around the unchanged module or script; the runtime's config also says ``cpu_repack``).

Columns: *tok/s*: aggregate tokens per second (median over runs); *TTFT p50 / p95 ms*: over all
requests of the level (median over runs); *tok/s ÷*, *TTFT p50 ÷*: against llama-server at the same
level; *checks*: requests with exactly max_tokens tokens and finish_reason length / all requests
(over all runs), refused (429) and failed ones, the 1-minute load average when the level started.
``--json`` prints the same as a ``blocks`` list, one per slot count: ``{slots, levels, servers: {label:
[one combined row per level]}}``; ours's rows carry ``breakdown`` (its per-token costs, also by the
/proc stat clock: ``*_stat``). The clients run on the same machine (one asyncio process, a JSON
parse per chunk): they cost the same per token against every server, and in the fast regime that
cost is a visible share of the cores the servers share with them.

    .venv/bin/python -m benchmarks.llama_cpp_build          # once: builds and caches llama-server
    .venv/bin/python -m benchmarks.concurrency              # demo: a markdown table for BENCHMARKS.md
    .venv/bin/python -m benchmarks.concurrency --regime fast --runs 3
    .venv/bin/python -m benchmarks.concurrency --regime fast --slots 8 --servers ours,example --json
    .venv/bin/python -m benchmarks.concurrency --servers ours,llama-server --levels 1,4 --requests 2 --json
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

from benchmarks.llama_cpp_build import build as build_llama_cpp
from benchmarks.llama_cpp_build import build_dir, installed_version, source_release
from benchmarks.serving import MANIFEST, _free_port, model_file, start_and_wait, stock_command, stop
from deployer.loading import load_manifest
from deployer.runtime import RuntimeConfig, runtime_config
from deployer.runtime.config import KV_TYPES
from deployer.runtime.cpu import cpu_flags, cpu_name, repack_weights
from deployer.runtime.engine.core import THREAD_NAME
from deployer.runtime.server import ENGINE_ENV

LEVELS = (1, 2, 4, 8)  # demo
SLOTS = 4  # demo: llama-server's default slot count
FAST_LEVELS = (1, 4, 8, 16)  # fast: those up to twice the slots
FAST_SLOTS = (4, 8)
FAST_CTX = 1024  # fast: context per slot (a prompt of 17 tokens and 128 generated)
THREADS = 2
MAX_TOKENS = 64  # demo
FAST_TOKENS = 128
BENCH_PROMPT_TOKENS = 16  # llama-batched-bench's prompt length, about that of PROMPTS
REQUEST_TIMEOUT_S = 600
SETTLE_S = 0.2  # after a level, before reading the counters: the model thread reports a step after its last token
BIAS = -100.0  # OpenAI's lowest logit bias: the token is never sampled
MODEL_THREAD = THREAD_NAME  # the OS name of our model thread (in the engine process, or the server's)
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
# the tiny model's vocabulary has no pieces for English: every byte is a token, so these are 17 tokens (BOS, ▁Request▁ in bytes, the digits)
FAST_PROMPTS = tuple(f"Request {i:02d}:" for i in range(16))
OURS = "gguf-deploy runtime"
OURS_THREAD = "gguf-deploy runtime, engine on a thread"  # GGUF_DEPLOY_ENGINE=thread: one process, one GIL
STOCK = "stock llama_cpp.server"
LLAMA_SERVER = "llama-server"
EXAMPLE = "llama-cpp-python example server"
SERVER_KEYS = {
    "ours": OURS, "ours-thread": OURS_THREAD, "stock": STOCK, "llama-server": LLAMA_SERVER, "example": EXAMPLE
}  # fmt: skip
HEALTH = {OURS: "/health", OURS_THREAD: "/health", STOCK: "/v1/models", LLAMA_SERVER: "/health", EXAMPLE: "/healthz"}
STAGES = ("decode", "sample", "schedule", "text", "handover")  # deployer.runtime.metrics.STAGES
COUNTS = ("requests", "tokens", "full_length", "refused", "failed")  # summed over runs, not medians

# Runs a Python server (a module, or a script when the name ends in .py) unchanged but with llama.cpp's
# extra buffer types (AMX, CPU repacking) off: what llama-server's --no-repack does. Llama() and the
# example server read llama_model_default_params() when they load a model; the patch is applied when the server itself first imports llama_cpp, so that whatever it
# does before (the runtime sets libgomp's environment) happens as without the launcher.
LAUNCHER = """
import importlib.util, os, runpy, sys

target = sys.argv[1]

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
sys.argv = [target, *sys.argv[2:]]
if target.endswith(".py"):
    sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
    runpy.run_path(target, run_name="__main__")
else:
    runpy.run_module(target, run_name="__main__", alter_sys=True)
"""


@dataclass(frozen=True)
class Regime:
    """What one regime measures: the load, and how its servers are scheduled."""

    name: str
    prompts: tuple[str, ...]
    max_tokens: int
    levels: tuple[int, ...]
    slots: tuple[int, ...]
    prompt_tokens: int  # about the prompts' length: llama-batched-bench's -npp
    count_words: bool  # tokens = words of the text (fast: one ▁w<i> piece each), else text chunks
    together: bool  # all servers up at once, interleaved; else one server process at a time


DEMO = Regime("demo", PROMPTS, MAX_TOKENS, LEVELS, (SLOTS,), BENCH_PROMPT_TOKENS, count_words=False, together=True)
FAST = Regime("fast", FAST_PROMPTS, FAST_TOKENS, FAST_LEVELS, FAST_SLOTS, 17, count_words=True, together=False)
REGIMES = {"demo": DEMO, "fast": FAST}


@dataclass(frozen=True)
class Workload:
    """One regime's requests against one model."""

    model: str
    prompts: tuple[str, ...]
    max_tokens: int
    count_words: bool
    extra: dict[str, Any] = field(default_factory=dict)  # more body fields (the fast regime's logit_bias)


def levels_for(levels: tuple[int, ...], slots: int) -> tuple[int, ...]:
    """The client counts measured with ``slots`` slots: never more than twice the slots."""
    return tuple(n for n in levels if n <= 2 * slots)


# ## the load


@dataclass(frozen=True)
class Request:
    status: int
    ttft_s: float | None  # None: no text came back
    tokens: int  # text chunks (one per token), or words of the text (fast)
    finish_reason: str | None


async def one_request(client: httpx.AsyncClient, work: Workload, prompt: str) -> Request:
    body = {
        "model": work.model, "prompt": prompt, "max_tokens": work.max_tokens, "temperature": 0, "stream": True,
        **work.extra,
    }  # fmt: skip
    start = time.perf_counter()
    ttft, chunks, finish, text = None, 0, None, []
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
                if piece := choices[0].get("text"):
                    ttft = ttft if ttft is not None else time.perf_counter() - start
                    chunks += 1
                    text.append(piece)
                finish = choices[0].get("finish_reason") or finish
    except httpx.TransportError as exc:  # counted as failed, with what was streamed before
        print(f"    {type(exc).__name__}: {exc}", file=sys.stderr)
        return Request(0, ttft, count_tokens(chunks, text, work.count_words), None)
    return Request(200, ttft, count_tokens(chunks, text, work.count_words), finish)


def count_tokens(chunks: int, text: list[str], count_words: bool) -> int:
    """Tokens streamed: text chunks (one per token), or words when every token is one ``▁word`` piece."""
    return len("".join(text).split()) if count_words else chunks


async def run_level(base_url: str, work: Workload, clients: int, requests_each: int) -> dict[str, Any]:
    """``clients`` concurrent clients, each sending ``requests_each`` requests one after the other."""
    # a new connection per request: no race with a server closing an idle or used-up keep-alive one
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base_url, timeout=REQUEST_TIMEOUT_S, limits=limits) as client:

        async def client_loop(index: int) -> list[Request]:
            prompts = [work.prompts[(index + k * clients) % len(work.prompts)] for k in range(requests_each)]
            return [await one_request(client, work, prompt) for prompt in prompts]

        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        per_client = await asyncio.gather(*(client_loop(i) for i in range(clients)))
        wall = time.perf_counter() - started
    results = [r for rs in per_client for r in rs]
    return summarize(results, clients, wall, work.max_tokens, load_before)


def summarize(results: list[Request], clients: int, wall: float, max_tokens: int, load: float) -> dict[str, Any]:
    """One level's numbers from its requests."""
    done = [r for r in results if r.status in (0, 200)]  # 0: cut by a transport error
    ttfts = sorted(r.ttft_s for r in done if r.ttft_s is not None)
    tokens = sum(r.tokens for r in done)
    return {
        "clients": clients,
        "requests": len(results),
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "ttft_p50_ms": percentile(ttfts, 50) * 1000,
        "ttft_p95_ms": percentile(ttfts, 95) * 1000,
        "full_length": sum(r.tokens == max_tokens and r.finish_reason == "length" for r in done),
        "refused": sum(r.status == 429 for r in results),
        "failed": sum(r.status not in (200, 429) for r in results),  # status 0 included
        "wall_s": wall,
        "load_1min": load,
    }


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of sorted ``values`` (NaN when empty)."""
    if not values:
        return float("nan")
    rank = max(1, -(-len(values) * q // 100))  # ceil
    return values[int(rank) - 1]


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One level from its runs: counts summed, a value all runs share kept as it is (the level's clients),
    every other number the median (nested dicts alike)."""
    out: dict[str, Any] = {}
    for key, first in runs[0].items():
        values = [run[key] for run in runs]
        if isinstance(first, dict):
            out[key] = combine(values)
        elif key in COUNTS:
            out[key] = sum(values)
        elif all(value == first for value in values):  # the median of two equal ints is a float: 1.0 clients
            out[key] = first
        else:
            out[key] = statistics.median(values)
    return out


def fast_bias(path: Path) -> dict[str, float]:
    """``logit_bias`` banning every token of ``path`` that is not a plain word piece (EOS among them).

    What is left must be ``▁<word>`` pieces only, so that every generated token is one word of the
    streamed text: the fast regime counts tokens so. ``SystemExit`` naming the file and a token otherwise.
    """
    import gguf

    reader = gguf.GGUFReader(path)
    try:
        tokens = reader.fields["tokenizer.ggml.tokens"].contents()
        types = reader.fields["tokenizer.ggml.token_type"].contents()
        eos = reader.fields["tokenizer.ggml.eos_token_id"].contents()
    except KeyError as exc:
        sys.exit(f"{path}: no {exc.args[0]} in the GGUF metadata; the fast regime needs a ggufgen vocabulary")
    normal = int(gguf.TokenType.NORMAL)
    banned = [i for i, kind in enumerate(types) if kind != normal]
    for i, piece in enumerate(tokens):
        if types[i] == normal and not re.fullmatch(r"▁\S+", piece):
            sys.exit(f"{path}: token {i} ({piece!r}) is not one ▁word piece; the fast regime counts tokens as words")
    if eos not in banned:
        sys.exit(f"{path}: the EOS token {eos} is a normal token; the fast regime could not keep it from ending")
    return {str(i): BIAS for i in banned}


# ## what our runtime spends per token


@dataclass(frozen=True)
class CpuTime:
    """One thread's CPU time, read from /proc in two ways."""

    ticks: int  # utime + stime of /proc/<pid>/task/<tid>/stat, clock ticks
    ns: int | None  # the first field of .../schedstat (time on the CPU), None where the kernel has none


def stat_ticks(text: str) -> int:
    """utime + stime (fields 14 and 15) of a /proc/<pid>/task/<tid>/stat line.

    The second field, the thread's name in parentheses, may hold spaces and parentheses itself: the
    fields are counted after its last ``)``.
    """
    rest = text.rsplit(")", 1)[1].split()  # rest[0] is field 3 (state)
    return int(rest[11]) + int(rest[12])


def schedstat_ns(text: str) -> int:
    """Nanoseconds on the CPU: the first field of /proc/<pid>/task/<tid>/schedstat."""
    return int(text.split()[0])


def thread_cpu(pid: int, tid: int) -> CpuTime:
    task = Path(f"/proc/{pid}/task/{tid}")
    try:
        ns: int | None = schedstat_ns((task / "schedstat").read_text())
    except OSError:
        ns = None
    return CpuTime(stat_ticks((task / "stat").read_text()), ns)


def others_cpu(pid: int) -> CpuTime:
    """The CPU time of every thread of ``pid`` but its main one, summed. For llama-server run with one
    llama.cpp thread, that is its HTTP side: the connection threads (parsing, the chunks' JSON, the
    socket writes) and the listener; the main thread runs the slots, the decode and the sampling."""
    ticks, ns = 0, 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        if int(task.name) == pid:
            continue
        try:
            cpu = thread_cpu(pid, int(task.name))
        except OSError:  # it ended since the listing
            continue
        ticks += cpu.ticks
        ns = None if ns is None or cpu.ns is None else ns + cpu.ns
    return CpuTime(ticks, ns)


def engine_seconds(metrics_text: str) -> dict[str, float]:
    """``gguf_deploy_engine_seconds_total{stage=...}`` of a /metrics page, by stage (0 for a stage not there)."""
    found = dict.fromkeys(STAGES, 0.0)
    pattern = r'^gguf_deploy_engine_seconds_total\{stage="(\w+)"\}\s+(\S+)$'
    for stage, value in re.findall(pattern, metrics_text, flags=re.MULTILINE):
        found[stage] = float(value)
    return found


@dataclass(frozen=True)
class Snapshot:
    loop: CpuTime
    model: CpuTime
    stages: dict[str, float]


def cpu_us(a: CpuTime, b: CpuTime, tokens: int, ticks_per_s: int) -> float:
    """Microseconds of CPU per streamed token between two readings, by the finer clock where both have
    it (NaN for no tokens)."""
    if not tokens:
        return float("nan")
    seconds = (b.ns - a.ns) / 1e9 if a.ns is not None and b.ns is not None else (b.ticks - a.ticks) / ticks_per_s
    return seconds * 1e6 / tokens


def per_token(before: Snapshot, after: Snapshot, tokens: int, ticks_per_s: int) -> dict[str, Any]:
    """Microseconds per streamed token between two snapshots (NaN for no tokens)."""

    def us(seconds: float) -> float:
        return seconds * 1e6 / tokens if tokens else float("nan")

    def cpu(a: CpuTime, b: CpuTime) -> float:
        return cpu_us(a, b, tokens, ticks_per_s)

    stages = {stage: us(after.stages[stage] - before.stages[stage]) for stage in STAGES}
    return {
        "tokens": tokens,
        "loop_cpu_us": cpu(before.loop, after.loop),
        "model_cpu_us": cpu(before.model, after.model),
        "loop_cpu_us_stat": us((after.loop.ticks - before.loop.ticks) / ticks_per_s),
        "model_cpu_us_stat": us((after.model.ticks - before.model.ticks) / ticks_per_s),
        "stages_us": stages,
        "host_us": sum(value for stage, value in stages.items() if stage != "decode"),
    }


@dataclass(frozen=True)
class Probe:
    """Where our runtime's per-token costs are read: its process, two of its threads, its /metrics."""

    pid: int  # the API server: its main thread runs the event loop
    model_pid: int  # the engine process (or the API server, with GGUF_DEPLOY_ENGINE=thread)
    model_tid: int
    metrics_url: str
    headers: dict[str, str]

    def snapshot(self, metrics_first: bool) -> Snapshot:
        """The counters now. The /metrics scrape costs the event loop CPU: it is read before the CPU
        times at a level's start (``metrics_first``) and after them at its end, outside the window."""
        stages = self.stages() if metrics_first else None
        loop, model = thread_cpu(self.pid, self.pid), thread_cpu(self.model_pid, self.model_tid)  # the loop: tid = pid
        return Snapshot(loop, model, stages if stages is not None else self.stages())

    def stages(self) -> dict[str, float]:
        response = httpx.get(self.metrics_url, headers=self.headers, timeout=30)
        response.raise_for_status()
        return engine_seconds(response.text)


def named_thread(pid: int, name: str) -> tuple[int, int]:
    """(process, thread) of the thread whose OS name is ``name``, in process ``pid`` or one of its
    children (the runtime's engine process); RuntimeError when there is none."""
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = task / "children"
        if children.is_file():
            pids += [int(child) for child in children.read_text().split()]
    for owner in pids:
        for task in Path(f"/proc/{owner}/task").iterdir():
            if (task / "comm").read_text().strip() == name:
                return owner, int(task.name)
    raise RuntimeError(f"process {pid}: no thread named {name} (nor in its children)")


# ## the servers


def python_module(module: str, args: list[str], no_repack: bool) -> list[str]:
    """``python -m module args`` (or ``python script.py args``), through the launcher where needed."""
    if no_repack:
        return [sys.executable, "-c", LAUNCHER, module, *args]
    return [sys.executable, module, *args] if module.endswith(".py") else [sys.executable, "-m", module, *args]


def ours_command(config: RuntimeConfig, folder: Path, port: int, no_repack: bool) -> list[str]:
    path = folder / f"runtime-{port}.json"
    # "cpu_repack" is read by the batching runtime; an older RuntimeConfig ignores it
    settings = {**config.to_dict(), "cpu_repack": not no_repack}
    path.write_text(json.dumps(settings, sort_keys=True))
    args = ["--config", str(path), "--host", "127.0.0.1", "--port", str(port)]
    return python_module("deployer.runtime", args, no_repack)


def stock_server_command(config: RuntimeConfig, port: int, no_repack: bool) -> list[str]:
    command = stock_command(config, port, logits_all=False)
    extra = ["--n_threads", str(THREADS), "--n_threads_batch", str(THREADS), "--interrupt_requests", "False"]
    return python_module("llama_cpp.server", [*command[3:], *extra], no_repack)  # command[:3]: python -m module


def example_settings(config: RuntimeConfig, port: int) -> dict[str, Any]:
    """The example server's config file: the same model, slots, context per slot, threads and KV cache."""
    kv = KV_TYPES[config.kv_cache_type]
    return {
        "server": {"host": "127.0.0.1", "port": port},
        "model": {
            "path": config.model_path,
            "alias": config.model_name,
            "n_ctx": config.parallel * config.n_ctx,
            "n_seq_max": config.parallel,
            "kv_unified": False,  # n_ctx split across the sequences, as llama-server's --no-kv-unified
            "n_batch": config.n_batch,
            "n_ubatch": config.n_ubatch,
            "threads": THREADS,
            "threads_batch": THREADS,
            "n_gpu_layers": config.n_gpu_layers,
            "flash_attn": config.flash_attn,
            "type_k": kv,
            "type_v": kv,
            "swa_full": True,
            "store_logits": False,  # its default True copies every token's logits (the stock server's logits_all)
        },
    }


def example_command(script: Path, config: RuntimeConfig, folder: Path, port: int, no_repack: bool) -> list[str]:
    path = folder / f"example-{port}.json"
    path.write_text(json.dumps(example_settings(config, port), indent=2))
    return python_module(str(script), ["-C", str(path)], no_repack)


def example_script(version: str) -> Path:
    """``examples/server/server.py`` of llama-cpp-python's source release ``version`` (unpacked, never built)."""
    folder = build_dir(version, os.environ.get("CMAKE_ARGS", ""))
    folder.mkdir(parents=True, exist_ok=True)
    script = source_release(version, folder, None) / "examples" / "server" / "server.py"
    if not script.is_file():
        sys.exit(f"{script}: llama-cpp-python {version}'s source release has no batched example server")
    return script


# llama-server reuses any cached prefix of a prompt (its slot's, or one kept in host RAM), which a
# fresh evaluation may not reproduce bit for bit; our prompt cache reuses whole n_batch chunks only,
# so that a cached prefix never changes a result (deployer/runtime/engine/scheduler.py). The fast
# regime's prompts (17 tokens) share their first 14 or 15, so with reuse on llama-server would
# evaluate 2 or 3 prompt tokens where we evaluate 17: off, both servers do the same work per request.
LLAMA_SERVER_NO_PREFIX_REUSE = ("--no-cache-prompt", "--cache-ram", "0")


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
        "-np", str(config.parallel), "-c", str(config.parallel * config.n_ctx), "--no-kv-unified", "--swa-full",
        "-a", config.model_name, "--no-webui", "--host", "127.0.0.1", "--port", str(port),
        *LLAMA_SERVER_NO_PREFIX_REUSE,
    ]  # fmt: skip


def batched_bench(
    binary: str, config: RuntimeConfig, levels: tuple[int, ...], regime: Regime, no_repack: bool
) -> dict[str, float]:
    """llama-batched-bench's aggregate decode tokens/s (S_TG) at each level, from its JSON lines."""
    command = [
        binary, *llama_cpp_common(config, no_repack), "-c", str(max(levels) * config.n_ctx),
        "-npp", str(regime.prompt_tokens), "-ntg", str(regime.max_tokens), "-npl", ",".join(map(str, levels)),
        "--output-format", "jsonl",
    ]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, timeout=REQUEST_TIMEOUT_S, check=True)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return {str(row["pl"]): row["speed_tg"] for row in rows}  # str keys: as they come back from JSON


# ## the schedule


@dataclass
class Running:
    label: str
    process: subprocess.Popen[bytes]
    url: str
    probe: Probe | None  # ours only
    http_cpu: Callable[[], CpuTime] | None = None  # llama-server with one llama.cpp thread: its HTTP side


Launch = Callable[[RuntimeConfig], Running]


def measure_level(server: Running, work: Workload, clients: int, requests: int) -> dict[str, Any]:
    """One level against one server; for ours with what it spent per token."""
    print(f"  {server.label}: {clients} client(s)", file=sys.stderr)
    before = server.probe.snapshot(metrics_first=True) if server.probe else None
    http_before = server.http_cpu() if server.http_cpu else None
    level = asyncio.run(run_level(server.url, work, clients, requests))
    if server.http_cpu and http_before is not None:
        level["http_cpu_us"] = cpu_us(http_before, server.http_cpu(), level["tokens"], os.sysconf("SC_CLK_TCK"))
    if server.probe and before is not None:
        time.sleep(SETTLE_S)
        after = server.probe.snapshot(metrics_first=False)
        level["breakdown"] = per_token(before, after, level["tokens"], os.sysconf("SC_CLK_TCK"))
    print(f"    {json.dumps(level)}", file=sys.stderr)
    return level


def measure_block(
    launches: dict[str, Launch], config: RuntimeConfig, work: Workload, levels: tuple[int, ...], runs: int,
    requests: int, together: bool,
) -> dict[str, list[dict[str, Any]]]:  # fmt: skip
    """Every server at every level, ``runs`` times; a level's runs combined (:func:`combine`).

    ``together``: all servers up at once, level after level, run after run, server after server.
    Otherwise one server process at a time: every run starts each server in turn, measures its
    levels, stops it.
    """
    samples: dict[str, dict[int, list[dict[str, Any]]]] = {label: {n: [] for n in levels} for label in launches}

    def start(label: str) -> Running:
        server = launches[label](config)
        asyncio.run(run_level(server.url, work, 1, 1))  # warm-up
        return server

    if together:
        servers = []
        try:
            for label in launches:
                servers.append(start(label))
            for clients in levels:  # drift in load hits all alike
                for _ in range(runs):
                    for server in servers:
                        samples[server.label][clients].append(measure_level(server, work, clients, requests))
        finally:
            for server in servers:
                stop(server.process)
    else:
        for _ in range(runs):
            for label in launches:
                server = start(label)
                try:
                    for clients in levels:
                        samples[label][clients].append(measure_level(server, work, clients, requests))
                finally:
                    stop(server.process)
    return {label: [combine(by_level[n]) for n in levels] for label, by_level in samples.items()}


# ## the run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regime", choices=tuple(REGIMES), default="demo", help="demo: Gemma 3 270M; fast: TINY_LLAMA")
    parser.add_argument("--requests", type=int, default=3, help="requests per client at each level (default: 3)")
    parser.add_argument("--levels", type=_numbers, help="client counts (default: demo 1,2,4,8; fast 1,4,8,16)")
    parser.add_argument("--slots", type=_numbers, help="slot counts, one block each (default: demo 4; fast 4,8)")
    parser.add_argument("--runs", type=int, default=1, help="repetitions of every level; medians reported")
    parser.add_argument(
        "--threads", type=int, default=THREADS,
        help=f"llama.cpp's threads in every server (default {THREADS}); below the core count, the rest is the "
        "host threads' (the GPU regime: llama.cpp's threads leave the event loop and the model thread a core)",
    )  # fmt: skip
    parser.add_argument(
        "--servers", type=_servers, default=list(SERVER_KEYS.values()), help="ours,stock,llama-server,example"
    )
    parser.add_argument("--repack", choices=("auto", "on", "off"), default="auto", help="auto: off on AMX CPUs")
    parser.add_argument("--model-path", type=Path, help="demo only; default: the demo model from its PyPI package")
    parser.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    args = parser.parse_args(argv)
    regime = REGIMES[args.regime]
    args.levels = args.levels or regime.levels
    args.slots = args.slots or regime.slots
    if args.runs < 1 or args.requests < 1:
        parser.error("--runs and --requests must be at least 1")
    if args.model_path and regime is FAST:
        parser.error("--model-path: the fast regime always runs tests/ggufgen.py's TINY_LLAMA")
    return args


def _numbers(text: str) -> tuple[int, ...]:
    try:
        numbers = tuple(int(n) for n in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}': comma-separated whole numbers, e.g. 1,4,8") from None
    if not numbers or min(numbers) < 1:
        raise argparse.ArgumentTypeError(f"'{text}': every number must be at least 1")
    return numbers


def _servers(text: str) -> list[str]:
    keys = [key.strip() for key in text.split(",")]
    unknown = [key for key in keys if key not in SERVER_KEYS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown server(s) {', '.join(unknown)}: choose from {', '.join(SERVER_KEYS)}"
        )
    return [SERVER_KEYS[key] for key in keys]


def base_config(regime: Regime, folder: Path, model_path: Path | None) -> RuntimeConfig:
    """The settings every server gets (slots and concurrency are set per block)."""
    if regime is DEMO:
        path = model_path or model_file()
        return replace(runtime_config(load_manifest(MANIFEST), str(path), require_api_key=False), n_threads=THREADS)
    from tests import ggufgen

    path = ggufgen.write_gguf(folder / "tiny-llama.gguf", ggufgen.TINY_LLAMA)
    # "chatml": a format the stock server knows; /v1/completions uses none
    return RuntimeConfig(
        model_name="tiny-llama", model_path=str(path), n_ctx=FAST_CTX, n_threads=THREADS, chat_format="chatml"
    )


def main(argv: list[str] | None = None) -> int:
    global THREADS
    args = parse_args(argv)
    THREADS = args.threads  # every server's command line and config reads it
    with tempfile.TemporaryDirectory(prefix="bench-concurrency-") as scratch:  # configs, thread records, the model
        report = measure(args, Path(scratch))
    print(json.dumps(report, indent=2) if args.json else markdown(report))
    return 0


def measure(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """The whole benchmark as ``args`` ask, with its files in ``folder``: the report."""
    regime = REGIMES[args.regime]
    chosen: list[str] = args.servers
    config = base_config(regime, folder, args.model_path)
    work = Workload(
        config.model_name, regime.prompts, regime.max_tokens, regime.count_words,
        {"logit_bias": fast_bias(Path(config.model_path))} if regime is FAST else {},
    )  # fmt: skip
    no_repack = not repack_weights({"auto": None, "on": True, "off": False}[args.repack], cpu_flags())
    version = installed_version()
    build = build_llama_cpp(version) if LLAMA_SERVER in chosen else None  # instant when cached
    script = example_script(version) if EXAMPLE in chosen else None

    def launch(label: str) -> Launch:
        def start(block: RuntimeConfig) -> Running:
            port = _free_port()
            url = f"http://127.0.0.1:{port}"
            env = {ENGINE_ENV: "thread" if label == OURS_THREAD else "process"}
            if label in (OURS, OURS_THREAD):
                command = ours_command(block, folder, port, no_repack)
            elif label == STOCK:
                command = stock_server_command(block, port, no_repack)
            elif label == LLAMA_SERVER:
                assert build is not None
                command = llama_server_command(build.llama_server, block, port, no_repack)
            else:
                assert script is not None
                command = example_command(script, block, folder, port, no_repack)
            process, _ = start_and_wait(command, url + HEALTH[label], env)
            probe = None
            if label in (OURS, OURS_THREAD):
                headers = {"Authorization": f"Bearer {block.api_key}"} if block.api_key else {}
                model_pid, model_tid = named_thread(process.pid, MODEL_THREAD)
                probe = Probe(process.pid, model_pid, model_tid, url + "/metrics", headers)
            # with more llama.cpp threads, its workers (OpenMP's, unnamed) join the main one's process
            http_cpu = functools.partial(others_cpu, process.pid) if label == LLAMA_SERVER and THREADS == 1 else None
            return Running(label, process, url, probe, http_cpu)

        return start

    launches = {label: launch(label) for label in chosen}
    blocks = []
    started = time.perf_counter()
    for slots in args.slots:
        levels = levels_for(args.levels, slots)
        if levels != args.levels:
            print(
                f"{slots} slots: {sorted(set(args.levels) - set(levels))} client(s) left out (> 2 x slots)",
                file=sys.stderr,
            )
        if not levels:
            continue
        block = replace(config, parallel=slots, concurrency=max(levels))
        results = measure_block(launches, block, work, levels, args.runs, args.requests, regime.together)
        blocks.append({"slots": slots, "levels": levels, "servers": results})
    bench: dict[str, float] = {}
    if build is not None:
        print("  llama-batched-bench", file=sys.stderr)
        bench_levels = tuple(sorted({n for b in blocks for n in b["levels"]}))
        bench = batched_bench(build.llama_batched_bench, config, bench_levels, regime, no_repack)

    clock = "schedstat" if Path(f"/proc/{os.getpid()}/task/{os.getpid()}/schedstat").is_file() else "stat"
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "cpu": cpu_name(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "llama_cpp_python": version,
        "regime": regime.name,
        "model": Path(config.model_path).name,
        "threads": THREADS,
        "n_ctx_per_slot": config.n_ctx,
        "max_tokens": regime.max_tokens,
        "requests_per_client": args.requests,
        "runs": args.runs,
        "repack": not no_repack,
        "cpu_clock": clock,
        "seconds": round(time.perf_counter() - started),
        "blocks": blocks,
        "batched_bench_tokens_per_s": bench,
    }


def markdown(report: dict[str, Any]) -> str:
    lines: list[str] = []
    blocks = report["blocks"]
    for block in blocks:
        if len(blocks) > 1 or report["regime"] != "demo":
            lines += [f"**{block['slots']} slots**", ""]
        lines += [*block_tables(block["servers"], block["levels"]), ""]
    bench = report["batched_bench_tokens_per_s"]
    if bench:
        lines += [
            "llama-batched-bench, aggregate decode (S_TG): "
            + " / ".join(f"{value:.1f}" for value in bench.values())
            + f" tok/s at {' / '.join(bench)} sequences.",
            "",
        ]
    counted = "counted as words, one ▁w<i> piece each" if report["regime"] == "fast" else "one text chunk each"
    lines.append(
        f"Checks per level: requests with {report['max_tokens']} tokens ({counted}) and finish_reason length / all "
        f"(refused 429, failed), over {report['runs']} run(s); 1-minute load average when the level started:"
    )
    for block in blocks:
        prefix = f"{block['slots']} slots, " if len(blocks) > 1 else ""
        for label, rows in block["servers"].items():
            checks = "; ".join(
                f"{r['clients']}: {r['full_length']}/{r['requests']}"
                + (f", {r['refused']} refused" if r["refused"] else "")
                + (f", {r['failed']} failed" if r["failed"] else "")
                + f", load {r['load_1min']:.1f}"
                for r in rows
            )
            lines.append(f"- {prefix}{label}: {checks}")
    lines += breakdown_table(blocks, report["cpu_clock"])
    slots = " / ".join(str(block["slots"]) for block in blocks)
    lines += [
        "",
        f"{report['date']}; {report['machine']}, {report['cpu']}; llama-cpp-python {report['llama_cpp_python']}; "
        f"{report['model']}; {slots} slots × {report['n_ctx_per_slot']} context, {report['threads']} "
        f"threads; {report['max_tokens']} tokens per request, {report['requests_per_client']} requests per client"
        + (f", medians of {report['runs']} runs" if report["runs"] > 1 else "")
        + f"; weight repacking {'on' if report['repack'] else 'off (AMX CPU: llama.cpp#20824)'}; {report['seconds']} s.",
    ]
    return "\n".join(lines) + "\n"


def block_tables(servers: dict[str, list[dict[str, Any]]], levels: tuple[int, ...]) -> list[str]:
    """One block's throughput/TTFT table, and its ratios against llama-server when it ran."""
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
            "Against llama-server (targets: tok/s ≥ 0.9× (fast regime), ≥ 0.95× (demo) and TTFT p50 ≤ 1.3× at every level):",
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
    return lines


def breakdown_table(blocks: list[dict[str, Any]], clock: str) -> list[str]:
    """Our runtime's cost per streamed token, every level of every block (none when ours did not run)."""
    rows = [
        (label, block["slots"], level)
        for label in (OURS, OURS_THREAD)
        for block in blocks
        for level in block["servers"].get(label, [])
    ]
    if not rows:
        return []
    source = "schedstat, ns" if clock == "schedstat" else "stat, 10 ms ticks"
    lines = [
        "",
        "Our runtime per streamed token (µs): CPU of the event-loop thread and of the model thread "
        f"(/proc {source}), and the model thread's time by stage (/metrics); host = every stage but decode:",
        "",
        "| engine | slots | clients | tokens | event loop CPU | model thread CPU | decode | sample | schedule | text "
        "| handover | host |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for label, slots, level in rows:
        cost = level["breakdown"]
        stages = "".join(f" {cost['stages_us'][stage]:.1f} |" for stage in STAGES)
        engine = "thread" if label == OURS_THREAD else "process"
        lines.append(
            f"| {engine} | {slots} | {level['clients']} | {cost['tokens']} | {cost['loop_cpu_us']:.1f} | "
            f"{cost['model_cpu_us']:.1f} |{stages} {cost['host_us']:.1f} |"
        )
    return lines + http_side_table(blocks)


def http_side_table(blocks: list[dict[str, Any]]) -> list[str]:
    """Our event loop's CPU per streamed token beside llama-server's HTTP threads' (measured with one
    llama.cpp thread only: none when llama-server did not run so)."""
    if not any("http_cpu_us" in level for block in blocks for level in block["servers"].get(LLAMA_SERVER, [])):
        return []
    ours = [label for label in (OURS, OURS_THREAD) if any(label in block["servers"] for block in blocks)]
    names = {OURS: "ours, event loop (engine process)", OURS_THREAD: "ours, event loop (engine thread)"}
    lines = [
        "",
        "The HTTP side, µs of CPU per streamed token: our event-loop thread (HTTP, the chunks' JSON, the socket "
        "writes, reading the engine's steps) beside llama-server's threads other than its main one (its HTTP "
        "threads: the same work, and they may run on several cores at once):",
        "",
        "| slots | clients |" + "".join(f" {names[label]} |" for label in ours) + " llama-server, HTTP threads |",
        "|--:|--:|" + "--:|" * (len(ours) + 1),
    ]
    for block in blocks:
        for i, clients in enumerate(block["levels"]):
            cells = "".join(f" {block['servers'][label][i]['breakdown']['loop_cpu_us']:.1f} |" for label in ours)
            http = block["servers"][LLAMA_SERVER][i].get("http_cpu_us", float("nan"))
            lines.append(f"| {block['slots']} | {clients} |{cells} {http:.1f} |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
