"""The model thread: continuous batching of every accepted request over one llama.cpp context.

One model, one context of ``parallel`` sequences (slots), one thread that runs the loop
llama-server runs: take new requests, give free slots to waiting sequences (longest cached prefix
first), decode one batch of prompt chunks and one token per generating sequence, sample each at
its own row with its own sampler chain, hand the new text to the event loop. The decisions are in
:mod:`deployer.runtime.scheduler`; llama.cpp is behind :mod:`deployer.runtime.llama`.

In front of it, a bound of ``concurrency`` requests in flight (in slots or waiting for one): a
request beyond it is refused at once (429 + Retry-After), so nothing hangs and no running stream
is ever cut off for a newer one. A request whose client goes away frees its slot at the next step.

llama_cpp is imported on the model thread only (lean imports: see ``deployer.runtime``).
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import random
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from deployer.runtime import logs
from deployer.runtime.checkpoints import Checkpoints
from deployer.runtime.config import KV_TYPES, RuntimeConfig
from deployer.runtime.metrics import Metrics
from deployer.runtime.protocol import ApiError
from deployer.runtime.sampling import Generation, Piece, TextStream, TokenLogprob
from deployer.runtime.scheduler import Entry, Scheduler, Sequence, State

if TYPE_CHECKING:  # asyncio is imported by the web stack, after the model thread has started
    import asyncio

    import numpy as np

    from deployer.runtime.llama import Model, Sampler

__all__ = ["KV_TYPES", "Engine", "Job", "Tally", "classify"]

RETRY_AFTER_MAX_S = 60

# llama.cpp's CPU backend runs its threads with OpenMP (libgomp), whose idle threads spin for
# 300,000 iterations after every graph before they sleep. With few cores that spin takes the core
# the event loop needs to send the token just computed: measured on 2 cores, +3.7 ms to the first
# token (the stock server pays it too) and as much on the client. 30,000 still covers the waits
# between the operations of one graph (prompt evaluation measured unchanged) and ends the spin
# soon after it. Read by libgomp when llama.cpp is loaded; a value the user set wins.
OPENMP_ENV = {"GOMP_SPINCOUNT": "30000"}


@dataclass
class Tally:
    """Token counts of one request (all its choices)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV cache was reused
    cut: bool = False  # stopped early because the request was cancelled


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


Item = tuple[str, Any]  # ("pieces", [Piece]) | ("result", dict) | ("error", ApiError) | ("end", Tally)


class Job:
    """One request's work on the model thread, and the channel its results come back on.

    A generation (``generation``) is scheduled with the others; any other work (``work``, e.g.
    embeddings) runs whole between two decode steps.
    """

    def __init__(
        self,
        engine: Engine,
        loop: asyncio.AbstractEventLoop,
        *,
        generation: Generation | None = None,
        work: Callable[[Model, Job], None] | None = None,
    ) -> None:
        import asyncio

        self.generation = generation
        self.work = work
        self.cancel_event = threading.Event()
        self.state = "queued"  # -> running -> done, or queued -> cancelled
        self.tally = Tally(prompt_tokens=len(generation.prompt) if generation else 0)
        self.created = time.monotonic()
        self.started: float | None = None
        self.first_token: float | None = None
        self.open_choices = generation.n if generation else 1
        self._engine = engine
        self._loop = loop
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
        """Stop this job: its sequences leave their slots (or the queue) at the next step."""
        self.cancel_event.set()
        self._engine._wake()

    @property
    def queue_ms(self) -> int | None:
        return None if self.started is None else int((self.started - self.created) * 1000)


@dataclass(eq=False)
class _Choice:
    """What the engine keeps per running sequence besides the scheduler's bookkeeping."""

    sampler: Sampler
    text: TextStream


# ## The engine


class Engine:
    """Loads the model on its own thread, then runs the batching loop there."""

    def __init__(
        self,
        config: RuntimeConfig,
        metrics: Metrics | None = None,
        *,
        load_model: Callable[[RuntimeConfig], Any] | None = None,
    ) -> None:
        """``load_model``: another model than llama.cpp's (the tests' fake one), with the same interface."""
        self.config = config
        self._load_model = load_model
        self.metrics = metrics or Metrics()
        self.state = "loading"  # -> ready | failed; -> closed
        self.error: str | None = None
        self.load_seconds: float | None = None
        self.model: Model | None = None
        self.has_chat_template = True
        self.chat_template: Any = None  # deployer.runtime.chat.ChatTemplate, once loaded
        self.scheduler = Scheduler(config.parallel, config.n_ctx, config.n_batch)
        self.checkpoints = Checkpoints(config.parallel, config.ctx_checkpoints)
        self._inbox: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._mean_job_s = 1.0
        self._jobs: set[Job] = set()  # accepted and not finished (model thread only)
        self._others: list[Job] = []  # non-generation work, waiting its turn (model thread only)
        self._choices: dict[Sequence, _Choice] = {}
        self._closing = False  # set by cancel_all(): nothing new starts
        self._stop = False
        self._thread = threading.Thread(target=self._main, name="gguf-deploy-model", daemon=True)
        self._on_ready: Callable[[Engine], None] | None = None
        self._on_failure: Callable[[Engine], None] | None = None
        self.metrics.watch(self._gauges)

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def in_flight(self) -> int:
        """Requests accepted and not finished: those in slots and those waiting for one."""
        return self._in_flight

    def start(
        self, on_ready: Callable[[Engine], None] | None = None, on_failure: Callable[[Engine], None] | None = None
    ) -> None:
        """Start loading the model on the model thread; the callbacks run on that thread."""
        self._on_ready, self._on_failure = on_ready, on_failure
        self._thread.start()

    # -- admission (the event loop)

    def submit(self, generation: Generation | None = None, *, work: Callable[[Model, Job], None] | None = None) -> Job:
        """Accept a generation (or other work); :class:`ApiError` 429 at once when ``concurrency`` are in."""
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
            job = Job(self, loop, generation=generation, work=work)
        self._inbox.put(job)
        return job

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: a request's mean time, shared by the slots."""
        return max(1, min(RETRY_AFTER_MAX_S, math.ceil(self._mean_job_s * self._in_flight / self.config.parallel)))

    def _wake(self) -> None:
        self._inbox.put(None)  # the model thread re-checks cancellations

    def _gauges(self) -> dict[str, float]:
        scheduler = self.scheduler
        running = list(scheduler.running)
        used = sum(seq.n_past for seq in running)
        return {
            "slots": len(scheduler.slots),
            "slots_busy": len(running),
            "waiting": len({id(seq.owner) for seq in scheduler.waiting}),
            "running": len({id(seq.owner) for seq in running}),
            "kv_usage": used / (self.config.n_ctx * len(scheduler.slots)),
        }

    # -- the model thread

    def _main(self) -> None:
        if not self._load():
            return
        assert self.model is not None
        self.scheduler = Scheduler(self.config.parallel, self.model.n_ctx, self.config.n_batch, self._resumable)
        while not self._stop:
            try:
                self._iterate()
            except Exception as exc:  # a bug: the requests in flight get a 500, the server goes on
                self._fail_all(classify(exc))
        self._fail_all(_stopping_error())

    def _resumable(self, slot: int, keep: int) -> int:
        """Where a slot's cache can be cut back to, at most ``keep``: anywhere, unless windowed layers
        cache only their window; then at a context checkpoint (none: 0, the prompt is evaluated whole)."""
        assert self.model is not None
        if self.model.windowed:
            return self.checkpoints.nearest(slot, keep)
        return keep if self.model.can_rewind(slot) else 0

    def _checkpoint(self, entries: list[Entry]) -> None:
        """After a decode: a prompt that completed a whole chunk (a position the prompt cache may reuse)
        keeps a checkpoint of its windowed layers there.

        The sequence is also restored from it at once, so that a fresh evaluation goes on from the
        very cache state (the same cells, in the same order) that a later prompt restoring the same
        checkpoint starts from: the rest of the prompt is computed alike, and a cached prefix never
        changes a result.
        """
        model = self.model
        assert model is not None
        for entry in entries:
            seq, end = entry.seq, entry.pos + len(entry.tokens)
            if len(entry.tokens) == self.config.n_batch and seq.trusted == end and seq.slot is not None:
                state = model.save_window(seq.slot.id)
                model.restore_window(seq.slot.id, state)
                self.checkpoints.put(seq.slot.id, end, state)

    def _iterate(self) -> None:
        """One turn of the loop: take new requests, drop cancelled ones, fill free slots, decode one step."""
        self._take(block=self.scheduler.idle and not self._others)
        if self._stop:
            return
        self._reap()
        if self._others:
            self._run_other(self._others.pop(0))
            return
        self._admit()
        for batch in self.scheduler.step():
            out: dict[Job, list[Piece]] = {}
            if not self._decode(batch, out):
                return
            for job, pieces in out.items():  # at once: a first token does not wait for the step's other decodes
                job.emit("pieces", pieces)
                if job.open_choices == 0:
                    self._end_job(job)

    def _load(self) -> bool:
        for key, value in OPENMP_ENV.items():  # before the first `import llama_cpp` of the process
            os.environ.setdefault(key, value)
        started = time.monotonic()
        logs.event("loading", model=self.config.model_name, path=self.config.model_path)
        try:
            if self._load_model is not None:
                self.model = self._load_model(self.config)
            else:
                route_llama_logs(self.config.verbose)
                from deployer.runtime.llama import Model

                self.model = Model(self.config)
        except Exception as exc:  # llama.cpp reports a bad file through LlamaError/ValueError/OSError
            self.error = f"{self.config.model_path}: llama.cpp could not load the model ({exc})"
            self.state = "failed"
            logs.event("load_failed", model=self.config.model_name, error=self.error)
            if self._on_failure:
                self._on_failure(self)
            return False
        from deployer.runtime.chat import ChatTemplate

        model = self.model
        try:
            self.chat_template = ChatTemplate.load(
                template=model.metadata.get("tokenizer.chat_template"),
                chat_format=self.config.chat_format,
                bos_token=model.token_text(model.bos),
                eos_token=model.token_text(model.eos),
                reasoning_format=self.config.reasoning_format,
                thinking=self.config.thinking,
            )
        except Exception as exc:  # a template Jinja cannot even parse: completions still work
            logs.event("chat_template_unusable", model=self.config.model_name, level="warn", error=str(exc))
            self.chat_template = None
        self.has_chat_template = self.chat_template is not None
        self.load_seconds = time.monotonic() - started
        self.state = "ready"
        logs.event(
            "ready",
            model=self.config.model_name,
            load_s=round(self.load_seconds, 3),
            n_ctx=self.model.n_ctx,
            parallel=self.config.parallel,
            threads=self.model.n_threads,
            chat_template=self.has_chat_template,
        )
        if self._on_ready:
            self._on_ready(self)
        return True

    def _take(self, *, block: bool) -> None:
        """Move new jobs from the inbox into the scheduler; wait for one when there is nothing to do."""
        try:
            job = self._inbox.get() if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if job is not None:
                self._accept(job)
            try:
                job = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _accept(self, job: Job) -> None:
        self._jobs.add(job)
        if job.generation is None:
            self._others.append(job)
            return
        generation = job.generation
        room = self.model.n_ctx - len(generation.prompt) if self.model else 0
        limit = room if generation.max_tokens is None else min(generation.max_tokens, room)
        spans = tuple(generation.media.spans) if generation.media is not None else ()
        self.scheduler.add(Sequence(job, i, generation.prompt, limit, spans=spans) for i in range(generation.n))

    def _reap(self) -> None:
        """End the jobs that were cancelled (client gone, shutdown): their slots are free for this step."""
        for job in [job for job in self._jobs if job.cancel_event.is_set() or self._closing]:
            if job.state == "queued" or job.started is None:
                job.state = "cancelled"
            else:
                job.tally.cut = True
            self._end_job(job)

    def _admit(self) -> None:
        assert self.model is not None
        for admission in self.scheduler.admit():
            seq, job = admission.seq, admission.seq.owner
            if job.started is None:
                job.started, job.state = time.monotonic(), "running"
            if seq.index == 0:  # the prompt is counted once, as the first choice found it
                job.tally.cached_tokens = admission.keep
            self.model.forget(admission.slot.id, admission.keep)
            if self.model.windowed:  # the windowed layers' cells before `keep` come from its checkpoint
                self.checkpoints.keep_until(admission.slot.id, admission.keep)
                if admission.keep:
                    self.model.restore_window(
                        admission.slot.id, self.checkpoints.get(admission.slot.id, admission.keep)
                    )
            generation = job.generation
            seed = random.getrandbits(32) if generation.sampling.seed is None else generation.sampling.seed + seq.index
            sampler = self.model.sampler(generation.sampling, seed)
            self._choices[seq] = _Choice(sampler, TextStream(generation.stop))

    def _decode(self, entries: list[Entry], out: dict[Job, list[Piece]]) -> bool:
        """Decode one batch and sample what it computed; False when llama.cpp failed (the requests got a 500)."""
        assert self.model is not None
        try:
            if entries[0].seq.span_at(entries[0].pos) is not None:  # an image: a batch of its own (Scheduler.step)
                rows = self._evaluate_image(entries[0])
            else:
                rows = self.model.decode([(e.seq.slot.id, e.tokens, e.pos, e.logits) for e in entries])
        except self.model.errors as exc:  # nothing a request did: fail the running ones, start again clean
            self._fail_all(classify(exc))
            return False
        self.scheduler.fed(entries)
        if self.model.windowed:  # before sampling: a sequence that stops now still leaves its checkpoints
            self._checkpoint(entries)
        now = time.monotonic()
        for entry, row in zip((e for e in entries if e.logits), rows, strict=True):
            seq = entry.seq
            if seq.state is State.PROMPT:  # the others of its request share this prompt: copy it, sample the same row
                for follower in [f for f in seq.followers if f.state is State.FOLLOWING]:
                    assert seq.slot is not None and follower.slot is not None
                    self.model.copy(seq.slot.id, follower.slot.id)
                    self.checkpoints.copy(seq.slot.id, follower.slot.id)
                    self._advance(follower, row, out, now)
            self._advance(seq, row, out, now)
        return True

    def _evaluate_image(self, entry: Entry) -> list[int]:
        """Encode one image of a prompt and decode it into its sequence (libmtmd); the row of its
        logits when the prompt ends with it (-1: the last output)."""
        from deployer.runtime.llama import LlamaError
        from deployer.runtime.vision import ProjectorError

        model, seq = self.model, entry.seq
        assert model is not None and model.projector is not None and seq.slot is not None
        chunk = seq.owner.generation.media.chunk_at[entry.pos]
        try:
            model.projector.evaluate(model.ctx, chunk, entry.pos, seq.slot.id, model.n_batch, entry.logits)
        except ProjectorError as exc:
            raise LlamaError(str(exc)) from exc
        return [-1] if entry.logits else []

    def _advance(self, seq: Sequence, row: int, out: dict[Job, list[Piece]], now: float) -> None:
        """Sample ``seq``'s next token at ``row``; its text (and maybe its end) goes into ``out``."""
        model, job, choice = self.model, seq.owner, self._choices[seq]
        assert model is not None
        generation: Generation = job.generation
        logprobs = ()
        if generation.logprobs is not None:
            logits = model.logits(row)
        banned = model.eog_tokens if seq.generated < generation.min_tokens else ()
        token = choice.sampler.sample(row, banned)
        if generation.logprobs is not None:
            logprobs = (_logprob(model, logits, token, generation.logprobs),)
        self.scheduler.sampled(seq, token)
        if job.first_token is None:
            job.first_token = now
        finish = None
        if model.is_eog(token):
            text, finish = choice.text.flush(), "stop"
        else:
            job.tally.completion_tokens += 1
            text, stopped = choice.text.feed(model.piece(token))
            if stopped:
                finish = "stop"
            elif self.scheduler.must_stop(seq):
                text, finish = text + choice.text.flush(), "length"
        if text or logprobs or finish is not None:  # text held back (a possible stop string) waits for the next
            out.setdefault(job, []).append(Piece(seq.index, text, logprobs, finish, choice.text.matched))
        if finish is not None:
            self._end_seq(seq)

    def _end_seq(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        choice = self._choices.pop(seq, None)
        if choice is not None:
            choice.sampler.close()
        seq.owner.open_choices -= 1

    def _end_job(self, job: Job) -> None:
        """The job is over (done, failed or cancelled): free what it holds, tell the event loop."""
        for seq in [s for s in [*self.scheduler.running, *self.scheduler.waiting] if s.owner is job]:
            self._end_seq(seq)
        if job not in self._jobs:
            return
        self._jobs.discard(job)
        if job.generation is not None and job.generation.media is not None:
            job.generation.media.free()  # libmtmd's chunks: the preprocessed images
        if job.state != "cancelled":
            job.state = "done"
        now = time.monotonic()
        elapsed = now - (job.started or now)
        with self._lock:
            self._in_flight -= 1
            if job.started is not None:
                self._mean_job_s = 0.8 * self._mean_job_s + 0.2 * elapsed
        if job.generation is not None and job.started is not None:
            self.metrics.finished(
                prompt=job.tally.prompt_tokens,
                cached=job.tally.cached_tokens,
                generated=job.tally.completion_tokens,
                ttft=None if job.first_token is None else job.first_token - job.created,
                latency=now - job.created,
            )
        job._finish()

    def _fail_all(self, error: ApiError) -> None:
        for job in list(self._jobs):
            job.emit("error", error)
            self._end_job(job)
        if self.model is not None:
            for slot in self.scheduler.slots:
                self.model.forget(slot.id)
                slot.cache = []
            self.checkpoints.clear()

    def _run_other(self, job: Job) -> None:
        if job.cancel_event.is_set() or self._closing:
            job.state = "cancelled"
            self._end_job(job)
            return
        job.started, job.state = time.monotonic(), "running"
        try:
            assert job.work is not None and self.model is not None
            job.work(self.model, job)
        except ApiError as exc:
            job.emit("error", exc)
        except Exception as exc:
            job.emit("error", classify(exc))
        self._end_job(job)

    # -- shutdown

    def cancel_all(self) -> None:
        """Cut every running generation at its next step; the waiting ones end without starting."""
        self._closing = True
        self._wake()

    def close(self, timeout: float = 5.0) -> None:
        """Cancel everything, stop the model thread, free the model (when it is idle)."""
        self.state = "closed" if self.state == "ready" else self.state
        self._closing = True
        self._stop = True
        self._wake()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self.model is not None and not self._thread.is_alive():
            self.model.close()  # never while the thread may still be inside llama.cpp
            self.model = None


def _logprob(model: Model, logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    """The chosen token's log-probability under the model (before any sampling setting), and the top ``top``."""
    import numpy as np

    peak = float(logits.max())
    total = peak + math.log(float(np.exp(logits - peak).sum()))
    best: tuple[tuple[str, bytes, float], ...] = ()
    if top > 0:
        ids = np.argpartition(logits, -top)[-top:]
        ids = ids[np.argsort(-logits[ids], kind="stable")]
        best = tuple(_token(model, int(i), float(logits[i]) - total) for i in ids)
    return TokenLogprob(*_token(model, token, float(logits[token]) - total), top=best)


def _token(model: Model, token: int, logprob: float) -> tuple[str, bytes, float]:
    data = model.piece(token)
    return data.decode("utf-8", errors="replace"), data, logprob


def _stopping_error() -> ApiError:
    return ApiError(503, "the server is shutting down; retry", type="server_error", code="shutting_down")


def classify(exc: BaseException) -> ApiError:
    """An unexpected exception as a 500 (logged with its traceback): a bug, never the client's fault."""
    logs.event("internal_error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
    return ApiError(500, f"internal error ({type(exc).__name__}); see the server log", type="server_error")
