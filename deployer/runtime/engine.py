"""The model and the one thread that runs it.

One ``Llama`` per process, driven by one worker thread; in front of it a bounded queue of
``concurrency`` jobs (one running, the rest waiting). A job that does not fit is refused at once
(429 + Retry-After): nothing hangs, and no running stream is ever cut off for a newer request.

Two changes to ``llama_cpp.Llama`` (a subclass, :func:`serving_llama_class`):

* **Results do not depend on the cache.** The stock prefix reuse keeps any matching prefix of
  the KV cache, including tokens that were decoded one at a time, then evaluates the rest in
  batches that start at a different position. The arithmetic differs, so temperature 0 gives
  different text for the same request (measured: 4 of 6 prompts on Gemma 3 270M). Here only
  whole ``n_batch`` chunks of the previous *prompt* are reused, which are exactly the chunks a
  fresh evaluation would compute, so the rest of the prompt is evaluated in the same batches.
* **Generation can be cancelled between tokens** (client gone, shutdown).

llama_cpp is imported on the worker thread only (lean imports: see ``deployer.runtime``).
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

from deployer.runtime import logs
from deployer.runtime.config import RuntimeConfig
from deployer.runtime.protocol import ApiError

if TYPE_CHECKING:  # asyncio is imported by the web stack, after the model thread has started
    import asyncio

# ggml type ids of the KV cache types a manifest may name (ggml.h; llama_cpp lacks a BF16 constant)
KV_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "iq4_nl": 20, "bf16": 30}
RETRY_AFTER_MAX_S = 60

# llama.cpp's CPU backend runs its threads with OpenMP (libgomp), whose idle threads spin for
# 300,000 iterations after every graph before they sleep. With few cores that spin takes the core
# the event loop needs to send the token just computed: measured on 2 cores, +3.7 ms to the first
# token (the stock server pays it too) and as much on the client. 30,000 still covers the waits
# between the operations of one graph (prompt evaluation measured unchanged) and ends the spin
# soon after it. Read by libgomp when llama.cpp is loaded; a value the user set wins.
OPENMP_ENV = {"GOMP_SPINCOUNT": "30000"}


def llama_kwargs(config: RuntimeConfig) -> dict[str, Any]:
    """The ``llama_cpp.Llama(**kwargs)`` of a config (the benchmark's baseline uses the same)."""
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
        "logits_all": config.logits_all,  # the stock server's default is True: n_ctx x n_vocab floats
        "n_threads": config.n_threads,
        "verbose": config.verbose,
    }


@dataclass
class Tally:
    """Token counts of one generation (or of all the generations of a job)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV cache was reused
    cut: bool = False  # stopped early because the job was cancelled

    def add(self, other: Tally, *, first: bool) -> None:
        if first:  # OpenAI counts the prompt once, however many choices
            self.prompt_tokens, self.cached_tokens = other.prompt_tokens, other.cached_tokens
        self.completion_tokens += other.completion_tokens
        self.cut = self.cut or other.cut


@cache
def serving_llama_class() -> type:
    """``llama_cpp.Llama`` with cache-independent results and cancellation (see module docstring)."""
    import llama_cpp

    class ServingLlama(llama_cpp.Llama):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.cancel_event: threading.Event | None = None
            self.tally = Tally()
            self._trusted: list[int] = []  # the last prompt whose KV was computed in aligned chunks

        def forget_cache(self) -> None:
            """Called when something else (embeddings) has used the KV cache."""
            self._trusted = []

        def _reusable(self, tokens: list[int]) -> int:
            common = 0
            for old, new in zip(self._trusted, tokens, strict=False):
                if old != new:
                    break
                common += 1
            # at least one token is always evaluated; only whole chunks from position 0 are kept
            keep = min(common, len(tokens) - 1, self.n_tokens) // self.n_batch * self.n_batch
            if keep > 0:
                memory = llama_cpp.llama_get_memory(self.ctx)
                # a sliding-window cache that already dropped early positions cannot be rewound
                if memory is None or llama_cpp.llama_memory_seq_pos_min(memory, 0) > 0:
                    keep = 0
            return keep

        def generate(self, tokens: Sequence[int], *args: Any, reset: bool = True, **kwargs: Any) -> Iterator[int]:
            tokens = list(tokens)
            keep = self._reusable(tokens) if reset else 0
            if reset:
                self.n_tokens = keep  # the stock prefix matcher then finds exactly `keep` tokens
                self._requires_eval = True
            self.tally = Tally(prompt_tokens=len(tokens), cached_tokens=keep)
            self._trusted = []  # until the prompt is fully evaluated
            vocab = self._model.vocab
            first = True
            for token in super().generate(tokens, *args, reset=reset, **kwargs):
                if first:
                    self._trusted, first = tokens, False
                if self.cancel_event is not None and self.cancel_event.is_set():
                    self.tally.cut = True
                    return
                if not llama_cpp.llama_vocab_is_eog(vocab, token):
                    self.tally.completion_tokens += 1
                yield token

    return ServingLlama


_LEVELS = {1: "debug", 2: "info", 3: "warn", 4: "error", 5: "cont"}  # enum ggml_log_level
_callbacks: list[Any] = []  # ctypes callbacks must outlive every call llama.cpp makes to them


def route_llama_logs(verbose: bool) -> None:
    """llama.cpp's own log lines as JSON events too (warnings and errors; everything when verbose)."""
    import ctypes

    import llama_cpp

    @llama_cpp.llama_log_callback  # type: ignore[misc]
    def callback(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
        if verbose or level in (3, 4):  # called for every line llama.cpp writes: the check comes first
            message = text.decode("utf-8", errors="replace").strip()
            if message:
                logs.event("llama.cpp", level=_LEVELS.get(level, str(level)), text=message)

    _callbacks.append(callback)
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


# ## Jobs


Item = tuple[str, Any]  # ("chunks", [dict]) | ("result", dict) | ("error", ApiError) | ("end", Tally)


class Job:
    """One request's work on the model thread, and the channel its results come back on."""

    def __init__(self, engine: Engine, work: Callable[[Any, Job], None], loop: asyncio.AbstractEventLoop) -> None:
        self.work = work
        self.cancel_event = threading.Event()
        self.state = "queued"  # -> running -> done, or queued -> cancelled
        self.tally = Tally()
        self.created = time.monotonic()
        self.started: float | None = None
        self._engine = engine
        self._loop = loop
        import asyncio

        self._items: asyncio.Queue[Item] = asyncio.Queue()
        self.done: asyncio.Future[Tally] = loop.create_future()

    # -- the model thread

    def emit(self, kind: str, value: Any = None) -> None:
        self._call_soon(self._items.put_nowait, (kind, value))

    def _finish(self) -> None:
        self.emit("end", self.tally)
        self._call_soon(lambda: self.done.done() or self.done.set_result(self.tally))

    def _call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is gone: the server is shutting down
            self._loop.call_soon_threadsafe(fn, *args)

    # -- the event loop

    async def next(self) -> Item:
        """The next item the model thread produced."""
        return await self._items.get()

    def cancel(self) -> None:
        """Stop this job: skipped if still queued (its slot freed now), else cut at the next token."""
        self.cancel_event.set()
        self._engine._drop_if_queued(self)

    @property
    def queue_ms(self) -> int | None:
        return None if self.started is None else int((self.started - self.created) * 1000)


# ## The engine


class Engine:
    """Loads the model on its own thread, then runs jobs there one at a time."""

    def __init__(self, config: RuntimeConfig) -> None:
        self.config = config
        self.state = "loading"  # -> ready | failed; -> closed
        self.error: str | None = None
        self.load_seconds: float | None = None
        self.llama: Any = None
        self.has_chat_template = True
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._mean_job_s = 1.0
        self._running: Job | None = None
        self._closing = False  # set by cancel_all(): no job starts any more
        self._thread = threading.Thread(target=self._main, name="gguf-deploy-model", daemon=True)
        self._on_ready: Callable[[Engine], None] | None = None
        self._on_failure: Callable[[Engine], None] | None = None

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def in_flight(self) -> int:
        """Jobs accepted and not finished: the running one and those queued behind it."""
        return self._in_flight

    def start(
        self, on_ready: Callable[[Engine], None] | None = None, on_failure: Callable[[Engine], None] | None = None
    ) -> None:
        """Start loading the model on the model thread; the callbacks run on that thread."""
        self._on_ready, self._on_failure = on_ready, on_failure
        self._thread.start()

    # -- admission

    def submit(self, work: Callable[[Any, Job], None]) -> Job:
        """Queue ``work(llama, job)``; :class:`ApiError` 429 at once when ``concurrency`` jobs are in."""
        import asyncio

        loop = asyncio.get_running_loop()
        with self._lock:
            if self._in_flight >= self.config.concurrency:
                wait = self.retry_after()
                raise ApiError(
                    429,
                    f"the server is busy: {self._in_flight} requests are running or queued "
                    f"(its limit is {self.config.concurrency}); retry in {wait} s",
                    type="rate_limit_error",
                    code="server_busy",
                    headers={"Retry-After": str(wait)},
                )
            self._in_flight += 1
            job = Job(self, work, loop)
        self._jobs.put(job)
        return job

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: about one job's time (one runs at a time)."""
        return max(1, min(RETRY_AFTER_MAX_S, math.ceil(self._mean_job_s)))

    def _drop_if_queued(self, job: Job) -> None:
        with self._lock:
            if job.state == "queued":
                self._drop(job)

    def _drop(self, job: Job) -> None:  # with the lock held
        job.state = "cancelled"
        self._in_flight -= 1
        job._finish()

    # -- the model thread

    def _main(self) -> None:
        if not self._load():
            return
        while (job := self._jobs.get()) is not None:
            self._run(job)

    def _load(self) -> bool:
        for key, value in OPENMP_ENV.items():  # before the first `import llama_cpp` of the process
            os.environ.setdefault(key, value)
        started = time.monotonic()
        logs.event("loading", model=self.config.model_name, path=self.config.model_path)
        try:
            route_llama_logs(self.config.verbose)
            self.llama = serving_llama_class()(**llama_kwargs(self.config))
        except Exception as exc:  # llama.cpp reports a bad file as ValueError/RuntimeError
            self.error = f"{self.config.model_path}: llama.cpp could not load the model ({exc})"
            self.state = "failed"
            logs.event("load_failed", model=self.config.model_name, error=self.error)
            if self._on_failure:
                self._on_failure(self)
            return False
        self.has_chat_template = self.config.chat_format is not None or bool(
            self.llama.metadata.get("tokenizer.chat_template")
        )
        self.load_seconds = time.monotonic() - started
        self.state = "ready"
        logs.event(
            "ready",
            model=self.config.model_name,
            load_s=round(self.load_seconds, 3),
            n_ctx=self.llama.n_ctx(),
            chat_template=self.has_chat_template,
        )
        if self._on_ready:
            self._on_ready(self)
        import llama_cpp.server.types  # noqa: F401 -- the request types, before the first request needs them

        return True

    def _run(self, job: Job) -> None:
        with self._lock:
            if job.state != "queued":
                return  # cancelled while it waited
            if self._closing:  # shutting down: a job still waiting never starts
                self._drop(job)
                return
            job.state = "running"
            self._running = job
        job.started = time.monotonic()
        self.llama.cancel_event = job.cancel_event
        try:
            job.work(self.llama, job)
        except ApiError as exc:
            job.emit("error", exc)
        except Exception as exc:
            job.emit("error", classify(exc))
        finally:
            self.llama.cancel_event = None
            elapsed = time.monotonic() - job.started
            with self._lock:
                job.state = "done"
                self._running = None
                self._in_flight -= 1
                self._mean_job_s = 0.8 * self._mean_job_s + 0.2 * elapsed
            job._finish()

    # -- shutdown

    def cancel_all(self) -> None:
        """Cut the running job at its next token; the queued ones end without starting (each ends with "end")."""
        with self._lock:  # with _run's check under the same lock, no job can start uncancelled after this
            self._closing = True
            running = self._running
        if running is not None:
            running.cancel_event.set()

    def close(self, timeout: float = 5.0) -> None:
        """Cancel everything, stop the model thread, free the model (when it is idle)."""
        self.state = "closed" if self.state == "ready" else self.state
        self.cancel_all()
        self._jobs.put(None)
        if self._thread.is_alive() and self.llama is not None:
            self._thread.join(timeout)
        if self.llama is not None and not self._thread.is_alive():
            self.llama.close()  # never while the thread may still be inside llama.cpp


def classify(exc: BaseException) -> ApiError:
    """An unexpected exception as a 500 (logged with its traceback): a bug, never the client's fault."""
    logs.event("internal_error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
    return ApiError(500, f"internal error ({type(exc).__name__}); see the server log", type="server_error")
