"""``GET /metrics``: Prometheus text, with the names and meanings llama-server and vLLM users know.

    gguf_deploy_requests_total{route,status}          requests answered
    gguf_deploy_prompt_tokens_total                   prompt tokens of finished generations
    gguf_deploy_prompt_tokens_cached_total            of which reused from a slot's cache
    gguf_deploy_generation_tokens_total               tokens generated
    gguf_deploy_slots / _slots_busy                   slots, and slots holding a sequence
    gguf_deploy_requests_waiting / _running           requests queued for a slot / holding one
    gguf_deploy_kv_cache_usage_ratio                  KV cells in use / cells (0..1)
    gguf_deploy_time_to_first_token_seconds           histogram: admission queue + prompt + first token
    gguf_deploy_time_per_output_token_seconds         histogram: the gaps between a request's tokens
    gguf_deploy_request_latency_seconds               histogram: request in to last token out
    gguf_deploy_engine_seconds_total{stage}           the model thread's time: decode (llama.cpp's
                                                      batch), sample (sampler chains), schedule
                                                      (admission, steps, applying results), text
                                                      (detokenizing, stop strings), handover (to the
                                                      event loop); all but decode is host cost per token

Each server has a registry of its own (tests run several in one process).
"""

from __future__ import annotations

from collections.abc import Callable

PREFIX = "gguf_deploy"
STAGES = ("decode", "sample", "schedule", "text", "handover")  # of the model thread's time
# seconds; the finer buckets matter on a GPU, the coarse ones on a CPU
_TTFT = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TPOT = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
_LATENCY = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)


class Metrics:
    """The counters of one server; the gauges read the engine when scraped."""

    def __init__(self) -> None:
        # imported here: a runtime that cannot start (bad config, port in use) says so without the serve extra
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests", "Requests answered, by route and status.", ["route", "status"], registry=r
        )
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens of finished generations.", registry=r)
        self.cached_tokens = Counter(
            f"{PREFIX}_prompt_tokens_cached", "Prompt tokens reused from a slot's KV cache.", registry=r
        )
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "Tokens generated.", registry=r)
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds", "Time from request to first token.", buckets=_TTFT, registry=r
        )
        self.tpot = Histogram(
            f"{PREFIX}_time_per_output_token_seconds",
            "Mean time between a request's tokens after the first.",
            buckets=_TPOT,
            registry=r,
        )
        self.latency = Histogram(
            f"{PREFIX}_request_latency_seconds", "Time from request to its last token.", buckets=_LATENCY, registry=r
        )
        self.slots = Gauge(f"{PREFIX}_slots", "Slots: sequences decoded together.", registry=r)
        self.slots_busy = Gauge(f"{PREFIX}_slots_busy", "Slots holding a sequence.", registry=r)
        self.waiting = Gauge(f"{PREFIX}_requests_waiting", "Requests accepted and waiting for a slot.", registry=r)
        self.running = Gauge(f"{PREFIX}_requests_running", "Requests holding at least one slot.", registry=r)
        self.kv_usage = Gauge(f"{PREFIX}_kv_cache_usage_ratio", "KV cache cells in use, 0..1.", registry=r)
        engine = Counter(f"{PREFIX}_engine_seconds", "The model thread's time, by stage.", ["stage"], registry=r)
        self.engine_seconds = {stage: engine.labels(stage=stage) for stage in STAGES}

    def watch(self, state: Callable[[], dict[str, float]]) -> None:
        """Read the gauges from ``state()`` (keys: slots, slots_busy, waiting, running, kv_usage) when scraped."""
        for name in ("slots", "slots_busy", "waiting", "running", "kv_usage"):
            getattr(self, name).set_function(lambda name=name: state().get(name, 0.0))

    def finished(self, *, prompt: int, cached: int, generated: int, ttft: float | None, latency: float) -> None:
        """One generation is over (done, failed or cancelled)."""
        self.prompt_tokens.inc(prompt)
        self.cached_tokens.inc(cached)
        self.generation_tokens.inc(generated)
        self.latency.observe(latency)
        if ttft is not None:
            self.ttft.observe(ttft)
            if generated > 1:
                self.tpot.observe((latency - ttft) / (generated - 1))

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        from prometheus_client import generate_latest
        from prometheus_client.exposition import CONTENT_TYPE_LATEST

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
