"""Time to first token with one image against text only, the image cache on a second turn, and what
running streams see while an image is encoded.

The language model is the tiny Gemma 3 of ``tests/ggufgen.py`` (``TINY_GEMMA3``, 256 wide), so the
time measured is the image's, not the language model's. ``--projector`` picks the encoder, random
weights either way (the compute of one encode is the real one, whatever the weights):

* ``full`` (default): SigLIP-So400m as Gemma 3 ships it (27 layers, width 1152, 896 px in 14 px
  patches, 4096 patches pooled to 256 image tokens) in F16, 896 × 896 images. The numbers for
  BENCHMARKS.md; minutes per encode on a CPU.
* ``tiny``: the tests' projector (``TINY_GEMMA3_MMPROJ``: 1 layer, width 64, 112 px, 16 image
  tokens), 112 × 112 images: a smoke run of this script in seconds, not a measurement.

The runtime is ``python -m deployer.runtime`` (the server the tests and Modal run) with 3 slots,
asked with the official ``openai`` client, streaming.

TTFT table (``max_tokens`` 1, medians of ``--runs``): text only; one image (a new image each run: no
cache); the same conversation's second turn about the same image (its KV reused: ``cached_tokens``).
Columns: TTFT (request sent to the first chunk), prompt tokens and cached tokens (the last run's usage).

ITL table, one row per run: the runtime schedules an image's encode (and the decode of its
embeddings) as one unit of work between two decode steps, not interleaved with them, so a running
stream waits for the whole encode once. Two text-only streams generate ``--stream-tokens`` tokens
each (``min_tokens`` = ``max_tokens``: no early end); once both have ``--image-after`` tokens, one
image request is sent (streaming, ``max_tokens`` 1, a new image). Every stream token's arrival time
is taken on the client: the streams ask for ``logprobs``, because a chunk with logprobs comes for
every token, while a token whose piece is an incomplete UTF-8 byte sends no text until the next
one (the tiny model's vocabulary has 256 byte tokens of 2,048). The gaps between consecutive tokens
of a stream fall in two windows (gaps after the image's first token in neither):

* before: the gaps that end before the image request is sent;
* during: the gaps that end after it is sent and start before its first token arrives: the stall,
  and the few steps that decode the text around the image (each a unit of its own).

Columns: ITL p50 and max of each window (both streams' gaps together), the gaps in the window
during, and the image request's TTFT. The stall (ITL max during) is about the image request's
TTFT, and about the idle image TTFT of the first table: one encode. Each run of it is one more encode
(``full``: minutes on a CPU).

    .venv/bin/python -m benchmarks.vision --runs 3                      # the tables for BENCHMARKS.md
    .venv/bin/python -m benchmarks.vision --projector tiny --runs 1     # smoke run (seconds; numbers not for BENCHMARKS.md)
"""

from __future__ import annotations

import argparse
import itertools
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deployer.runtime import RuntimeConfig
from tests import ggufgen
from tests.images import data_url, png
from tests.serving import Server, launch
from tests.test_vision import GEMMA_TEMPLATE

SIGLIP_896 = ggufgen.ProjectorSpec(
    "siglip-so400m-896", "gemma3", 27, 1152, 16, 4304, 896, 14, ggufgen.TINY_GEMMA3.n_embd, quant="F16"
)
PROJECTORS = {"full": SIGLIP_896, "tiny": ggufgen.TINY_GEMMA3_MMPROJ}
QUESTION = "Describe this screenshot of a settings page."
# the running streams: two prompts, so that their KV and tokens are their own
STREAM_QUESTIONS = ("Write a long story about a lighthouse keeper.", "Explain, at length, how tides work.")
PARALLEL = 3  # the two streams and the image request, each in a slot of its own
STREAM_TIMEOUT_S = 1800  # a full-size encode on a CPU takes minutes; the streams wait that long once


@dataclass(frozen=True)
class Turn:
    """One ``max_tokens`` 1 request: when it was sent and its first chunk came (``perf_counter``), its usage."""

    sent: float
    first: float
    prompt_tokens: int
    cached_tokens: int

    @property
    def ttft(self) -> float:
        return self.first - self.sent


@dataclass
class Stream:
    """A text-only stream's token arrival times (``perf_counter``), appended by its thread as they come."""

    times: list[float] = field(default_factory=list)
    error: BaseException | None = None


@dataclass(frozen=True)
class ItlRun:
    """One run of the ITL measurement: the streams' gaps in each window (seconds) and the image's TTFT."""

    before: list[float]
    during: list[float]
    image_ttft: float


def image_tokens(spec: ggufgen.ProjectorSpec) -> int:
    """The image tokens of one image at the projector's size: its patches, average-pooled (clip.cpp's default 4)."""
    return spec.n_patches // (spec.scale_factor or 4) ** 2


def split_gaps(times: Sequence[float], sent: float, first: float) -> tuple[list[float], list[float]]:
    """The gaps between consecutive tokens of one stream, before and during an image request.

    A gap ends before the request is ``sent``: before; it ends after and starts before the request's
    ``first`` token: during (the stall is the one that spans the encode); after that: neither.
    """
    if first < sent:
        raise ValueError(f"the image request's first token ({first}) comes before it was sent ({sent})")
    if any(b < a for a, b in itertools.pairwise(times)):
        raise ValueError("token arrival times must be in order")
    before: list[float] = []
    during: list[float] = []
    for a, b in itertools.pairwise(times):
        if b <= sent:
            before.append(b - a)
        elif a < first:
            during.append(b - a)
    return before, during


def p50_max(gaps: Sequence[float], window: str) -> tuple[float, float]:
    """The median and the longest of a window's gaps (``window`` names it when there are none)."""
    if not gaps:
        raise ValueError(f"no inter-token gaps in the window {window!r}: the streams are too short or too early")
    return statistics.median(gaps), max(gaps)


def itl_row(run: int, result: ItlRun) -> str:
    """One markdown row of the ITL table."""
    p50_before, max_before = p50_max(result.before, "before")
    p50_during, max_during = p50_max(result.during, "during")
    cells = [_ms(p50_before), _ms(max_before), _ms(p50_during), _ms(max_during), str(len(result.during))]
    return f"| {run} | " + " | ".join([*cells, _ms(result.image_ttft)]) + " |"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f} ms"


def _first_token(client: Any, messages: list[dict[str, Any]]) -> Turn:
    sent = time.perf_counter()
    stream = client.chat.completions.create(
        model="bench", messages=messages, max_tokens=1, stream=True, stream_options={"include_usage": True}
    )
    first = None
    usage = None
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content is not None:
            first = time.perf_counter()
        usage = chunk.usage or usage
    if usage is None:
        raise RuntimeError("the stream ended without a usage chunk (stream_options.include_usage)")
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    return Turn(sent, first if first is not None else time.perf_counter(), usage.prompt_tokens, cached or 0)


def _stream_tokens(client: Any, question: str, tokens: int, out: Stream) -> None:
    """Generate exactly ``tokens`` tokens (EOS banned until then) and note when each one arrives."""
    try:
        stream = client.chat.completions.create(
            model="bench", messages=[{"role": "user", "content": question}], max_tokens=tokens, stream=True,
            logprobs=True, extra_body={"min_tokens": tokens},
        )  # fmt: skip
        for chunk in stream:
            now = time.perf_counter()
            for choice in chunk.choices:
                if choice.logprobs is not None and choice.logprobs.content:
                    out.times.extend([now] * len(choice.logprobs.content))
    except BaseException as exc:  # handed to the main thread, which raises it
        out.error = exc


def _image_messages(url: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": QUESTION},
                                         {"type": "image_url", "image_url": {"url": url}}]}]  # fmt: skip


def measure_itl(server: Server, side: int, seed: int, tokens: int, after: int) -> ItlRun:
    """Two text streams; once both have ``after`` tokens, one image request; their gaps around it."""
    streams = [Stream() for _ in STREAM_QUESTIONS]
    threads = [
        threading.Thread(
            target=_stream_tokens, args=(server.client(timeout=STREAM_TIMEOUT_S), q, tokens, s), daemon=True
        )
        for q, s in zip(STREAM_QUESTIONS, streams, strict=True)
    ]
    for thread in threads:
        thread.start()
    while min(len(s.times) for s in streams) < after:
        failed = [s.error for s in streams if s.error is not None]
        if failed:
            raise RuntimeError(f"a text stream failed before the image request: {failed[0]!r}") from failed[0]
        if not all(t.is_alive() for t in threads):
            raise RuntimeError(f"a text stream ended before {after} tokens (--image-after)")
        time.sleep(0.001)
    image = _first_token(server.client(timeout=STREAM_TIMEOUT_S), _image_messages(data_url(png(side, side, seed=seed))))
    for thread in threads:
        thread.join(STREAM_TIMEOUT_S)
    before: list[float] = []
    during: list[float] = []
    for number, stream in enumerate(streams, 1):
        if stream.error is not None:
            raise RuntimeError(f"text stream {number} failed: {stream.error!r}") from stream.error
        if len(stream.times) != tokens:
            raise RuntimeError(f"text stream {number} brought {len(stream.times)} tokens, not {tokens}")
        if stream.times[-1] <= image.first:
            raise RuntimeError(f"text stream {number} ended before the image's first token: raise --stream-tokens")
        b, d = split_gaps(stream.times, image.sent, image.first)
        before += b
        during += d
    return ItlRun(before, during, image.ttft)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--projector", choices=sorted(PROJECTORS), default="full",
                        help="full: SigLIP-So400m at 896 px (minutes on a CPU); tiny: the tests' (a smoke run)")  # fmt: skip
    parser.add_argument("--stream-tokens", type=int, default=400, help="tokens each running text stream generates")
    parser.add_argument("--image-after", type=int, default=30, help="stream tokens before the image request")
    args = parser.parse_args()
    if args.image_after < 2 or args.stream_tokens <= args.image_after:
        parser.error("--image-after must be at least 2 (one gap before) and below --stream-tokens")
    spec = PROJECTORS[args.projector]
    side = spec.image_size
    image_row = f"one {side}×{side} image"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = ggufgen.write_gguf(folder / "tiny-gemma3.gguf", ggufgen.TINY_GEMMA3, chat_template=GEMMA_TEMPLATE)
        projector = ggufgen.write_projector(folder / f"mmproj-{spec.name}.gguf", spec)
        config = RuntimeConfig(
            model_name="bench", model_path=str(model), n_ctx=2048, parallel=PARALLEL, n_threads=args.threads,
            mmproj_path=str(projector),
        )  # fmt: skip
        server = launch(config, folder / "server")
        try:
            client = server.client(timeout=STREAM_TIMEOUT_S)
            text_only = [{"role": "user", "content": QUESTION}]
            rows: dict[str, list[Turn]] = {"text only": [], image_row: [], "second turn, same image": []}
            _first_token(client, text_only)  # warm-up
            for run in range(args.runs):
                rows["text only"].append(_first_token(client, text_only))
                first = _image_messages(data_url(png(side, side, seed=run)))
                rows[image_row].append(_first_token(client, first))
                second = [*first, {"role": "assistant", "content": "A page."},
                          {"role": "user", "content": "Which option is at the top?"}]  # fmt: skip
                rows["second turn, same image"].append(_first_token(client, second))
            # new images (seeds past the first table's): the encode is never served from the cache
            itl = [
                measure_itl(server, side, 1000 + run, args.stream_tokens, args.image_after) for run in range(args.runs)
            ]
        finally:
            server.stop()
    print(f"CPU: {platform.processor() or platform.machine()}, {args.threads} threads; runs: {args.runs}; "
          f"projector: {args.projector} ({spec.name}, {spec.n_layer} layers, {side} px, "
          f"{image_tokens(spec)} image tokens)\n")  # fmt: skip
    print("| request | TTFT (median) | prompt tokens | cached tokens |")
    print("|---|--:|--:|--:|")
    for name, samples in rows.items():
        ttft = statistics.median(s.ttft for s in samples)
        print(f"| {name} | {ttft * 1000:,.0f} ms | {samples[-1].prompt_tokens} | {samples[-1].cached_tokens} |")
    print(f"\n{len(STREAM_QUESTIONS)} text streams of {args.stream_tokens} tokens, {PARALLEL} slots; "
          f"one {side}×{side} image request after {args.image_after} tokens of each:\n")  # fmt: skip
    print("| run | ITL p50 before | ITL max before | ITL p50 during | ITL max during | gaps during | image TTFT |")
    print("|--:|--:|--:|--:|--:|--:|--:|")
    for run, result in enumerate(itl, 1):
        print(itl_row(run, result))


if __name__ == "__main__":
    main()
