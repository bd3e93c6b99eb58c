"""The serving runtime against ``llama_cpp.Llama`` in-process, and against llama-cpp-python's stock server.

Same model (Gemma 3 270M Q4_K_M, ``manifests/gemma-3-270m.toml``: context 4096, n_batch 512, flash
attention, chat format ``gemma``), same ``Llama`` keyword arguments
(:func:`llama_kwargs`: the runtime's settings as ``llama_cpp.Llama`` arguments), same prompts, temperature 0, on the CPU.

(a) Generation, streamed: time to first token (TTFT) and decode tokens per second, one request
    at a time. In-process: ``Llama.create_chat_completion(stream=True)``. Through HTTP: the
    official ``openai`` client against ``python -m deployer.runtime`` and against
    ``python -m llama_cpp.server``. Tokens are counted as streamed chunks (one per token; the
    texts are identical, so the counts are too). Two in-process rows: the stock ``Llama`` reuses
    the chat template's first tokens from the previous prompt; "prompt cache reset" does not,
    which is what the runtime does for prompts shorter than ``n_batch`` (it reuses only whole
    ``n_batch`` chunks, so that results never depend on the cache). The stock server runs with
    its own default ``logits_all=True`` and, for a fair row, with ``logits_all=False``. All paths
    are loaded at once and measured in interleaved rounds, so drift in machine load hits all alike.
(b) Start-up: from spawning the process to ``/health`` answering 200 (the stock server has no
    /health: its first ``/v1/models`` 200, as it loads the model before it listens), against the
    bare cost: spawning ``python -c "import llama_cpp; llama_cpp.Llama(...)"`` until it returns.

Targets: (a) ours ≥ 0.95× in-process for tokens/s and for TTFT (in-process TTFT / ours);
(b) ours ≤ 1.3× the bare cost. Medians of ``--runs`` repetitions.

    .venv/bin/python -m benchmarks.serving                 # a markdown table
    .venv/bin/python -m benchmarks.serving --runs 5 --max-tokens 128 --json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx

from deployer.loading import load_manifest
from deployer.runtime import API_KEY_ENV, RuntimeConfig, runtime_config
from deployer.runtime.config import KV_TYPES

ROOT = Path(__file__).resolve().parent.parent


def llama_kwargs(config: RuntimeConfig) -> dict[str, Any]:
    """``llama_cpp.Llama(**kwargs)`` with a runtime config's settings, for the stock baselines (one sequence)."""
    kv = KV_TYPES[config.kv_cache_type]
    return {
        "model_path": config.model_path,
        "n_ctx": config.n_ctx,
        "n_batch": config.n_batch,
        "n_ubatch": config.n_ubatch,
        "n_gpu_layers": config.n_gpu_layers,
        "flash_attn": config.flash_attn,
        "type_k": kv,
        "type_v": kv,
        "chat_format": config.chat_format,
        "embedding": config.embeddings,
        "logits_all": False,
        "n_threads": config.n_threads,
        "verbose": config.verbose,
    }


MANIFEST = ROOT / "manifests" / "gemma-3-270m.toml"
SHORT = (
    "Write a short poem about the sea.",
    "Explain what a hash table is.",
    "List five fruits and their colors.",
    "Describe a sunrise over the mountains.",
    "Give three tips for learning to cook.",
)
PASSAGE = (
    "The lighthouse stood at the end of a narrow spit of rock, and for forty years the same family had kept "
    "its lamp burning. Every evening the keeper climbed the hundred and twelve steps, trimmed the wick, "
    "polished the great lens and wound the clockwork that turned it. In winter the spray froze on the windows "
    "and the keeper's daughter scraped it away with a wooden paddle, singing to keep warm. Ships passed far "
    "out at sea, their own lights small as stars, and none of the sailors ever knew the names of the people "
    "who kept them from the rocks. One autumn a storm came that lasted nine days. The supply boat could not "
    "land, the oil ran low, and the family burned furniture in the stove to save the last of it for the lamp. "
    "On the ninth night a fishing boat, blown far off its course, saw the beam and turned away from the reef "
    "just in time. Its captain came to the lighthouse in the spring with a sack of flour, a barrel of oil and "
    "a carved wooden gull, which the keeper's daughter kept on her windowsill for the rest of her life. "
)
LONG = tuple(  # a distinct start, then the same passage: no prompt shares more than the chat template
    f"{question}\n\n{PASSAGE * 2}"
    for question in (
        "Who scraped the ice from the windows?",
        "How many steps did the keeper climb?",
        "What did the captain bring in the spring?",
        "Why did the family burn furniture?",
        "Summarize the story in one sentence.",
    )
)
PROMPT_SETS = {"short prompts (~15 tokens)": SHORT, "long prompts (~470 tokens)": LONG}
READY_TIMEOUT_S = 120
IN_PROCESS = "in-process Llama"
IN_PROCESS_COLD = "in-process, prompt cache reset"
OURS = "gguf-deploy runtime (HTTP)"
STOCK = "stock llama_cpp.server (HTTP)"
STOCK_LEAN = "stock, logits_all=False (HTTP)"
FLOOR = "HTTP floor: no model (HTTP)"

# The floor: the same client and web stack (uvicorn + Starlette) answering one token at once, with
# no model behind it. Its TTFT is what HTTP itself costs on this machine, paid by every server.
FLOOR_APP = """
import json, sys, uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

CHUNK = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "floor",
         "choices": [{"index": 0, "delta": {"role": "assistant", "content": "a"}, "finish_reason": None}]}
LAST = {**CHUNK, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}

async def chat(request):
    await request.json()
    async def events():
        yield "data: " + json.dumps(CHUNK) + "\\n\\n"
        yield "data: " + json.dumps(LAST) + "\\n\\ndata: [DONE]\\n\\n"
    return StreamingResponse(events(), media_type="text/event-stream")

async def health(request):
    return JSONResponse({"status": "ok"})

app = Starlette(routes=[Route("/health", health), Route("/v1/chat/completions", chat, methods=["POST"])])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), http="h11", log_level="warning")
"""


@dataclass(frozen=True)
class Generation:
    ttft_s: float
    tokens: int
    decode_s: float  # from the first token to the last

    @property
    def tokens_per_s(self) -> float:
        return (self.tokens - 1) / self.decode_s if self.decode_s > 0 else 0.0


def _timed(start: float, chunks: Iterator[str | None]) -> Generation:
    first = last = None
    tokens = 0
    for content in chunks:
        if not content:
            continue
        now = time.perf_counter()
        first = first or now
        last = now
        tokens += 1
    assert first is not None and last is not None, "no token came back"
    return Generation(first - start, tokens, last - first)


# ## (a) generation


def in_process(config: RuntimeConfig, max_tokens: int, *, cold: bool = False) -> Callable[[str], Generation]:
    """``Llama.create_chat_completion`` in this process; ``cold``: its prompt cache reset first."""
    import llama_cpp

    llama = llama_cpp.Llama(**llama_kwargs(config))

    def run(prompt: str) -> Generation:
        if cold:
            llama.reset()  # what the runtime does for a prompt shorter than n_batch
        start = time.perf_counter()
        stream = llama.create_chat_completion(
            messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0, stream=True
        )
        return _timed(start, (chunk["choices"][0]["delta"].get("content") for chunk in stream))

    return run


def over_http(base_url: str, model: str, max_tokens: int) -> Callable[[str], Generation]:
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)

    def run(prompt: str) -> Generation:
        start = time.perf_counter()  # before the call: our server sends its headers with the first token
        stream = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
        )
        return _timed(start, (chunk.choices[0].delta.content if chunk.choices else None for chunk in stream))

    return run


def interleaved(
    paths: dict[str, Callable[[str], Generation]], prompts: tuple[str, ...], runs: int
) -> dict[str, dict[str, float]]:
    """Every path over every prompt, round after round, so that drift in machine load hits all alike."""
    for run in paths.values():
        run("Say hello.")  # warm-up: first-call allocations, page cache
    samples: dict[str, list[Generation]] = {label: [] for label in paths}
    for _ in range(runs):
        for prompt in prompts:
            for label, run in paths.items():  # path after path on the same prompt: the fairest neighbours
                samples[label].append(run(prompt))
    return {
        label: {
            "ttft_ms": statistics.median(r.ttft_s for r in results) * 1000,
            "tokens_per_s": statistics.median(r.tokens_per_s for r in results),
            "tokens": statistics.median(r.tokens for r in results),
        }
        for label, results in samples.items()
    }


# ## processes


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ours_command(config: RuntimeConfig, folder: Path, port: int) -> list[str]:
    path = folder / "runtime.json"
    path.write_text(config.to_json())
    return [sys.executable, "-m", "deployer.runtime", "--config", str(path), "--host", "127.0.0.1", "--port", str(port)]


def stock_command(config: RuntimeConfig, port: int, logits_all: bool) -> list[str]:
    kwargs = llama_kwargs(config)
    return [
        sys.executable, "-m", "llama_cpp.server",
        "--model", config.model_path, "--model_alias", config.model_name,
        "--n_ctx", str(config.n_ctx), "--n_batch", str(config.n_batch), "--n_ubatch", str(config.n_ubatch),
        "--n_gpu_layers", str(config.n_gpu_layers), "--flash_attn", str(config.flash_attn),
        "--type_k", str(kwargs["type_k"]), "--type_v", str(kwargs["type_v"]),
        "--chat_format", str(config.chat_format), "--logits_all", str(logits_all),
        "--verbose", "False", "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip


def start_and_wait(
    command: list[str], url: str, extra_env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], float]:
    """Spawn ``command`` (with ``extra_env``); seconds until ``url`` answers 200."""
    started = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}  # an exported key would make ours answer 401
    env.update(extra_env or {})
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while time.perf_counter() - started < READY_TIMEOUT_S:
        if process.poll() is not None:
            raise RuntimeError(f"{command[:4]} exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return process, time.perf_counter() - started
        except httpx.TransportError:
            pass
        time.sleep(0.005)
    process.kill()
    raise RuntimeError(f"{command[:4]} was not ready after {READY_TIMEOUT_S} s")


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def bare_load_s(config: RuntimeConfig) -> float:
    """Spawn a process that imports llama_cpp and constructs ``Llama()``; seconds until it is done."""
    code = (
        "import json, sys\nimport llama_cpp\nllama_cpp.Llama(**json.loads(sys.argv[1]))\nprint('ready', flush=True)\n"
    )
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(llama_kwargs(config))],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    elapsed = time.perf_counter() - started
    process.wait()
    assert line.strip() == "ready", "the bare load failed"
    return elapsed


def interleaved_startup(starts: dict[str, Callable[[], float]], runs: int) -> dict[str, float]:
    for start in starts.values():
        start()  # warm-up: the model file in the page cache, .pyc files written
    samples: dict[str, list[float]] = {label: [] for label in starts}
    for _ in range(runs):
        for label, start in starts.items():
            samples[label].append(start())
    for label, times in samples.items():
        print(f"  {label}: {', '.join(f'{t:.3f}' for t in times)} s", file=sys.stderr)
    return {label: statistics.median(times) for label, times in samples.items()}


# ## the run


def model_file() -> Path:
    from deployer.local_model import demo_model_file

    return demo_model_file()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="rounds over every prompt (medians are reported)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--model-path", type=Path, help="default: the demo model from its PyPI package")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    args = parser.parse_args(argv)

    path = args.model_path or model_file()
    config = runtime_config(load_manifest(MANIFEST), str(path), require_api_key=False)  # no API key
    folder = Path(tempfile.mkdtemp(prefix="bench-serving-"))

    servers = {
        OURS: (lambda port: ours_command(config, folder, port), "/health"),
        STOCK: (lambda port: stock_command(config, port, logits_all=True), "/v1/models"),
        STOCK_LEAN: (lambda port: stock_command(config, port, logits_all=False), "/v1/models"),
    }
    floor = {FLOOR: (lambda port: [sys.executable, "-c", FLOOR_APP, str(port)], "/health")}
    print("(a) generation", file=sys.stderr)
    paths = {
        IN_PROCESS: in_process(config, args.max_tokens),
        IN_PROCESS_COLD: in_process(config, args.max_tokens, cold=True),
    }
    processes = []
    try:
        for label, (command_for, health) in {**servers, **floor}.items():
            port = _free_port()
            process, _ = start_and_wait(command_for(port), f"http://127.0.0.1:{port}{health}")
            processes.append(process)
            paths[label] = over_http(f"http://127.0.0.1:{port}/v1", config.model_name, args.max_tokens)
        generation = {name: interleaved(paths, prompts, args.runs) for name, prompts in PROMPT_SETS.items()}
    finally:
        for process in processes:
            stop(process)

    print("(b) start-up", file=sys.stderr)

    def start_once(command_for: Callable[[int], list[str]], health: str) -> float:
        port = _free_port()
        process, elapsed = start_and_wait(command_for(port), f"http://127.0.0.1:{port}{health}")
        stop(process)
        return elapsed

    starts: dict[str, Callable[[], float]] = {IN_PROCESS: lambda: bare_load_s(config)}
    for label, (command_for, health) in servers.items():
        starts[label] = partial(start_once, command_for, health)
    startup = interleaved_startup(starts, args.runs)

    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "model": str(path.name),
        "settings": {k: v for k, v in asdict(config).items() if k in ("n_ctx", "n_batch", "flash_attn", "chat_format")},
        "runs": args.runs,
        "max_tokens": args.max_tokens,
        "generation": generation,
        "startup_s": startup,
    }
    print(json.dumps(report, indent=2) if args.json else markdown(report))
    return 0


def markdown(report: dict) -> str:
    lines = []
    for name, results in report["generation"].items():
        base, cold, ours = results[IN_PROCESS], results[IN_PROCESS_COLD], results[OURS]
        lines += [
            f"**{name}**, {report['max_tokens']} tokens each",
            "",
            "| path | TTFT ms | in-process ÷ this | decode tok/s | this ÷ in-process |",
            "|---|---|---|---|---|",
        ]
        for label, r in results.items():
            if label == FLOOR:  # one token, no model: only its TTFT means anything
                lines.append(f"| {label} | {r['ttft_ms']:.1f} | — | — | — |")
                continue
            lines.append(
                f"| {label} | {r['ttft_ms']:.1f} | {base['ttft_ms'] / r['ttft_ms']:.2f}× | "
                f"{r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}× |"
            )
        floor = results[FLOOR]["ttft_ms"]
        lines += [
            "",
            f"Runtime against the in-process run with the same cache policy (reset): TTFT "
            f"{cold['ttft_ms'] / ours['ttft_ms']:.2f}×, decode {ours['tokens_per_s'] / cold['tokens_per_s']:.2f}×. "
            f"HTTP itself costs {floor:.1f} ms (the floor row); the runtime's TTFT beyond that floor is "
            f"{ours['ttft_ms'] - floor:.1f} ms against {cold['ttft_ms']:.1f} ms in-process with the same cache "
            f"policy ({cold['ttft_ms'] / (ours['ttft_ms'] - floor):.2f}×).",
            "",
        ]
    startup = report["startup_s"]
    bare = startup[IN_PROCESS]
    lines += ["**start-up** (process start to ready)", "", "| path | seconds | this ÷ bare load |", "|---|---|---|"]
    for label, seconds in startup.items():
        shown = "bare: import llama_cpp + Llama()" if label == IN_PROCESS else label
        lines.append(f"| {shown} | {seconds:.3f} | {seconds / bare:.2f}× |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
