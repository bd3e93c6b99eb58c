"""Time to first token with one image against text only, and the image cache's effect on a second turn.

The encoder is SigLIP-So400m as Gemma 3 ships it (27 layers, width 1152, 896 px in 14 px patches,
4096 patches pooled to 256 image tokens) with random weights in F16 (``tests/ggufgen.py``): the
compute of one encode is the real one, whatever the weights. Its projection goes to the tiny Gemma 3
text model (``TINY_GEMMA3``, 256 wide), so the time measured is the image's, not the language
model's. The runtime is ``python -m deployer.runtime`` (the server the tests and Modal run), asked
with the official ``openai`` client, streaming, ``max_tokens`` 1; medians of ``--runs``.

Rows: text only; one 896 × 896 PNG (a new image each run: no cache); the same conversation's second
turn about the same image (its KV reused: ``cached_tokens``).

    .venv/bin/python -m benchmarks.vision --runs 3
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

from deployer.runtime import RuntimeConfig
from tests import ggufgen
from tests.images import data_url, png
from tests.serving import launch
from tests.test_vision import GEMMA_TEMPLATE

SIGLIP_896 = ggufgen.ProjectorSpec(
    "siglip-so400m-896", "gemma3", 27, 1152, 16, 4304, 896, 14, ggufgen.TINY_GEMMA3.n_embd, quant="F16"
)
QUESTION = "Describe this screenshot of a settings page."


def _ttft(client, messages) -> tuple[float, int, int]:
    start = time.perf_counter()
    stream = client.chat.completions.create(
        model="bench", messages=messages, max_tokens=1, stream=True, stream_options={"include_usage": True}
    )
    first = None
    usage = None
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content is not None:
            first = time.perf_counter() - start
        usage = chunk.usage or usage
    assert usage is not None
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    return (first if first is not None else time.perf_counter() - start), usage.prompt_tokens, cached or 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = ggufgen.write_gguf(folder / "tiny-gemma3.gguf", ggufgen.TINY_GEMMA3, chat_template=GEMMA_TEMPLATE)
        projector = ggufgen.write_projector(folder / "mmproj-siglip.gguf", SIGLIP_896)
        config = RuntimeConfig(
            model_name="bench", model_path=str(model), n_ctx=2048, parallel=2, n_threads=args.threads,
            mmproj_path=str(projector),
        )  # fmt: skip
        server = launch(config, folder / "server")
        try:
            client = server.client(timeout=600)
            text_only = [{"role": "user", "content": QUESTION}]
            rows: dict[str, list[tuple[float, int, int]]] = {"text only": [], "one 896×896 image": [],
                                                             "second turn, same image": []}  # fmt: skip
            _ttft(client, text_only)  # warm-up
            for run in range(args.runs):
                rows["text only"].append(_ttft(client, text_only))
                url = data_url(png(896, 896, seed=run))
                first = [{"role": "user", "content": [{"type": "text", "text": QUESTION},
                                                      {"type": "image_url", "image_url": {"url": url}}]}]  # fmt: skip
                rows["one 896×896 image"].append(_ttft(client, first))
                second = [*first, {"role": "assistant", "content": "A page."},
                          {"role": "user", "content": "Which option is at the top?"}]  # fmt: skip
                rows["second turn, same image"].append(_ttft(client, second))
        finally:
            server.stop()
    print(f"CPU: {platform.processor() or platform.machine()}, {args.threads} threads; runs: {args.runs}\n")
    print("| request | TTFT (median) | prompt tokens | cached tokens |")
    print("|---|--:|--:|--:|")
    for name, samples in rows.items():
        ttft = statistics.median(s[0] for s in samples)
        print(f"| {name} | {ttft * 1000:,.0f} ms | {samples[-1][1]} | {samples[-1][2]} |")


if __name__ == "__main__":
    main()
