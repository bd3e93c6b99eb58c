"""The model thread: continuous batching of every accepted request over one llama.cpp context.

One model, one context of ``parallel`` sequences (slots), one thread that runs the loop
llama-server runs: take new requests, give free slots to waiting sequences (longest cached prefix
first), decode one batch of prompt chunks and one token per generating sequence, sample each at
its own row with its own sampler chain, hand the new text to the event loop. The decisions are in
:mod:`deployer.runtime.engine.scheduler`; the model is whatever ``load_model`` returns, behind
:class:`deployer.runtime.engine.model.ModelInterface` (llama.cpp's: :func:`deployer.runtime.llama.load`).

In front of it, a bound of ``concurrency`` requests in flight (in slots or waiting for one): a
request beyond it is refused at once (:class:`Busy`), so nothing hangs and no running stream is
ever cut off for a newer one. A request whose client goes away frees its slot at the next step.
The engine raises and reports only its own errors (:mod:`deployer.runtime.engine.errors`); the app
answers them in each protocol's shape.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import random
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from deployer.runtime import logs
from deployer.runtime.config import KV_TYPES, RuntimeConfig
from deployer.runtime.engine.checkpoints import Checkpoints
from deployer.runtime.engine.errors import Busy, EngineError, Failed, ShuttingDown
from deployer.runtime.engine.handover import Handover
from deployer.runtime.engine.sampling import Delta, Generation, TextStream, TokenLogprob
from deployer.runtime.engine.scheduler import Entry, Outcome, Scheduler, Sequence, State
from deployer.runtime.errors import ApiError
from deployer.runtime.metrics import STAGES, Metrics

if TYPE_CHECKING:  # asyncio is imported by the web stack, after the model thread has started
    import asyncio

    import numpy as np

    from deployer.runtime.engine.model import ModelInterface as Model
    from deployer.runtime.engine.model import SamplerInterface as Sampler

__all__ = ["KV_TYPES", "Engine", "Job", "Tally", "Ticket", "classify"]

RETRY_AFTER_MAX_S = 60
THREAD_NAME = "gguf-model"  # the model thread's name, for ``top -H`` and /proc/<pid>/task/<tid>/comm

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


# ## Jobs


# ("pieces", [Delta]) | ("result", dict) | ("error", EngineError, or the ApiError a work function raised)
# | ("end", Tally)
Item = tuple[str, Any]

# not items: a ticket applies them itself
STARTED = "started"  # (cached prompt tokens, when the job left the queue): before its first piece
DONE = "done"  # (tally, state, started): resolves the ticket's ``done``


class Route(Protocol):
    """Where a job's items go: a batch of ``(key, kind, value)`` per decode step, in order."""

    def post(self, batch: list[tuple[Any, str, Any]]) -> None: ...


class Job:
    """One request's work on the model thread; what it produces goes to its ``route`` under ``key``.

    A generation (``generation``) is scheduled with the others; any other work (``work``, e.g.
    embeddings) runs whole between two decode steps. The event loop holds the other end, a
    :class:`Ticket` (in this process, or in the API server's: :mod:`deployer.runtime.engine.process`).
    """

    def __init__(
        self,
        engine: Engine,
        route: Route,
        key: Any,
        *,
        generation: Generation | None = None,
        work: Callable[[Model, Job], None] | None = None,
        created: float | None = None,
    ) -> None:
        self.generation = generation
        self.work = work
        self.route, self.key = route, key
        self.cancel_event = threading.Event()
        self.state = "queued"  # -> running -> done, or queued -> cancelled
        self.tally = Tally(prompt_tokens=len(generation.prompt) if generation else 0)
        self.created = time.monotonic() if created is None else created
        self.started: float | None = None
        self.first_token: float | None = None
        self.open_choices = generation.n if generation else 1
        self._engine = engine

    def emit(self, kind: str, value: Any = None) -> None:
        """Send an item to the event loop, with the rest of this step's (see :meth:`Engine._flush`)."""
        self._engine._outbox.append((self, kind, value))

    def _finish(self) -> None:
        self.emit("end", self.tally)
        self.emit(DONE, (self.tally, self.state, self.started))

    def cancel(self) -> None:
        """Stop this job: its sequences leave their slots (or the queue) at the next step."""
        self.cancel_event.set()
        self._engine._wake()


class Ticket:
    """The event loop's end of a job: its items in order, its counts, and ``done`` when it is over."""

    def __init__(self, loop: asyncio.AbstractEventLoop, generation: Generation | None) -> None:
        self.state = "queued"  # as the job's, known here when it is done
        self.tally = Tally(prompt_tokens=len(generation.prompt) if generation else 0)
        self.created = time.monotonic()
        self.started: float | None = None
        self.cancel: Callable[[], None] = _nothing  # stops the job (set by whoever submitted it)
        self._loop = loop
        self._items: deque[Item] = deque()
        self._waiter: asyncio.Future[None] | None = None  # the event loop waits for items
        # takes an item at once, on the event loop, as it arrives (a stream writing it to its client);
        # returns False for one it leaves to the queue: then the items after it queue too, in order
        self.sink: Callable[[str, Any], bool] | None = None
        self.done: asyncio.Future[Tally] = loop.create_future()

    async def admission(self) -> None:
        """Until the job leaves the queue for a slot (``started`` set), or an item comes first (its
        error or its end: it never ran)."""
        while self.started is None and not self._items:
            await self._wait()

    async def next(self) -> Item:
        """The next item the model thread produced."""
        while not self._items:
            await self._wait()
        return self._items.popleft()

    async def take(self) -> list[Item]:
        """Every item produced and not yet taken (at least one): a stream that fell behind sends them together."""
        while not self._items:
            await self._wait()
        items = list(self._items)
        self._items.clear()
        return items

    async def _wait(self) -> None:
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def put(self, kind: str, value: Any) -> None:
        """On the event loop: one item in, the waiting reader woken."""
        if kind == STARTED:
            self.tally.cached_tokens, self.started = value
            self.state = "running"
            self._wake()
            return
        if kind == DONE:
            self.tally, self.state, self.started = value
            if not self.done.done():
                self.done.set_result(self.tally)
            return
        if self.sink is not None and not self._items and self.sink(kind, value):
            return
        self._items.append((kind, value))
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    @property
    def queue_ms(self) -> int | None:
        return None if self.started is None else int((self.started - self.created) * 1000)


def _nothing() -> None:
    pass


K = TypeVar("K")  # what names a job in a batch: its ticket here, its number between the processes


def deliver(batches: list[list[tuple[Ticket, str, Any]]]) -> None:
    """On the event loop: the steps' items that arrived since it last looked, for every job at once (one
    wake-up per step at most, not per token), a job's pieces of several steps as one (:func:`coalesce`)."""
    for ticket, kind, value in coalesce(batches):
        ticket.put(kind, value)


def coalesce(batches: list[list[tuple[K, str, Any]]]) -> list[tuple[K, str, Any]]:
    """Several steps' items as one batch, each job's in its order: a job's pieces that follow one
    another join into one item. When the event loop falls behind the model (the very case where its
    time per token decides throughput), a stream then writes its client once for all those steps,
    not once per step."""
    if len(batches) == 1:
        return batches[0]
    out: list[tuple[K, str, Any]] = []
    joinable: dict[K, int] = {}  # a job whose last item so far is pieces: where that item is in `out`
    for batch in batches:
        for key, kind, value in batch:
            if kind == "pieces":
                at = joinable.get(key)
                if at is not None:
                    out[at] = (key, kind, out[at][2] + value)
                    continue
                joinable[key] = len(out)
            else:
                joinable.pop(key, None)
            out.append((key, kind, value))
    return out


@dataclass(eq=False)
class _Choice:
    """What the engine keeps per running sequence besides the scheduler's bookkeeping."""

    sampler: Sampler
    text: TextStream


class Admission:
    """The bound of ``concurrency`` requests in flight (in slots or waiting for one), and the
    ``Retry-After`` of a refusal: decided where requests arrive (the engine's, or the API server's
    when the engine runs in a process of its own)."""

    def __init__(self, concurrency: int, parallel: int) -> None:
        self.concurrency, self.parallel = concurrency, parallel
        self.in_flight = 0
        self.refusing = False  # stopping: every new request is refused (503)
        self._mean_job_s = 1.0
        self._lock = threading.Lock()  # the model thread leaves, the event loop enters

    def enter(self, *, bounded: bool = True) -> None:
        """One more request in; :class:`ShuttingDown` or :class:`Busy` instead (unless not ``bounded``)."""
        with self._lock:
            if bounded and self.refusing:
                raise ShuttingDown()
            if bounded and self.in_flight >= self.concurrency:
                raise Busy(self.in_flight, self.concurrency, self.retry_after())
            self.in_flight += 1

    def leave(self, seconds: float | None) -> None:
        """A request is over; ``seconds`` since it left the queue (None: it never did)."""
        with self._lock:
            self.in_flight -= 1
            if seconds is not None:
                self._mean_job_s = 0.8 * self._mean_job_s + 0.2 * seconds

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: a request's mean time, shared by the slots."""
        return max(1, min(RETRY_AFTER_MAX_S, math.ceil(self._mean_job_s * self.in_flight / self.parallel)))


# ## The engine


class Engine:
    """Loads the model on its own thread, then runs the batching loop there."""

    def __init__(
        self,
        config: RuntimeConfig,
        metrics: Metrics | None = None,
        *,
        load_model: Callable[[RuntimeConfig], Model],
        load_chat: Callable[[Model, RuntimeConfig], Any] | None = None,
    ) -> None:
        """``load_model`` makes the model on the model thread: :func:`deployer.runtime.llama.load`, or
        the tests' fake one (the engine never imports llama.cpp); ``load_chat`` then reads its chat
        template (:func:`deployer.runtime.chat.template.template_of`: the engine never renders one)."""
        self.config = config
        self._load_model = load_model
        self._load_chat = load_chat
        self.metrics = metrics or Metrics()
        self.state = "loading"  # -> ready | failed; -> closed
        self.error: str | None = None
        self.load_seconds: float | None = None
        self.model: Model | None = None
        self.has_chat_template = True
        self.chat_template: Any = None  # what load_chat made of the model's template (the app renders with it)
        self.scheduler = Scheduler(config.parallel, config.n_ctx, config.n_batch)
        self.checkpoints = Checkpoints(config.parallel, config.ctx_checkpoints)
        self._inbox: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self.admission = Admission(config.concurrency, config.parallel)
        self._jobs: set[Job] = set()  # accepted and not finished (model thread only)
        self._others: list[Job] = []  # non-generation work, waiting its turn (model thread only)
        self._choices: dict[Sequence, _Choice] = {}
        self._outbox: list[tuple[Job, str, Any]] = []  # items for the event loop, sent once per decode
        self._handovers: dict[Any, Handover] = {}  # per event loop (one in a server)
        self._laps = dict.fromkeys(STAGES, 0.0)  # seconds per stage since the last report
        self._closing = False  # set by cancel_all(): nothing new starts
        self._draining = False  # set by drain(): nothing new is accepted, nothing waiting starts
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
        return self.admission.in_flight

    def start(
        self, on_ready: Callable[[Engine], None] | None = None, on_failure: Callable[[Engine], None] | None = None
    ) -> None:
        """Start loading the model on the model thread; the callbacks run on that thread."""
        self._on_ready, self._on_failure = on_ready, on_failure
        self._thread.start()

    # -- admission (the event loop)

    def submit(
        self, generation: Generation | None = None, *, work: Callable[[Model, Job], None] | None = None
    ) -> Ticket:
        """Accept a generation (or other work); :class:`Busy` at once when ``concurrency`` are in."""
        import asyncio

        loop = asyncio.get_running_loop()
        handover = self._handovers.get(loop)
        if handover is None:  # made here, on the loop's thread (the model thread only reads it)
            handover = self._handovers[loop] = Handover(loop, deliver)
        self.admission.enter()
        ticket = Ticket(loop, generation)
        job = Job(self, handover, ticket, generation=generation, work=work, created=ticket.created)
        ticket.cancel = job.cancel
        self._inbox.put(job)
        return ticket

    def accept(self, job: Job) -> None:
        """Take a job admitted elsewhere (the API server's process counts what is in flight)."""
        self.admission.enter(bounded=False)
        self._inbox.put(job)

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
        _name_thread(THREAD_NAME)
        if not self._load():
            return
        assert self.model is not None
        self.scheduler = Scheduler(self.config.parallel, self.model.n_ctx, self.config.n_batch, self._resumable)
        while not self._stop:
            try:
                self._iterate()
            except Exception as exc:  # a bug: the requests in flight get a 500, the server goes on
                self._fail_all(classify(exc))
            self._flush()
        self._fail_all(ShuttingDown())
        self._flush()

    def _flush(self) -> None:
        """Hand what the model thread produced to the event loop: one call for every job (GIL and
        wake-ups are paid once per decode, not once per token and job)."""
        if not self._outbox:
            return
        items, self._outbox = self._outbox, []
        by_route: dict[Route, list[tuple[Any, str, Any]]] = {}
        for job, kind, value in items:
            by_route.setdefault(job.route, []).append((job.key, kind, value))
        for route, batch in by_route.items():
            route.post(batch)

    def _resumable(self, slot: int, keep: int) -> int:
        """Where a slot's cache can be cut back to, at most ``keep``: anywhere, unless windowed layers
        cache only their window; then at a context checkpoint (none: 0, the prompt is evaluated whole)."""
        assert self.model is not None
        if self.model.windowed:
            return self.checkpoints.nearest(slot, keep)
        return keep if self.model.can_rewind(slot) else 0

    def _checkpoint(self, entries: list[Entry], slots: dict[Sequence, int]) -> None:
        """After a decode: a prompt that completed a unit the prompt cache may reuse (a whole chunk,
        an image, or the text up to an image: the scheduler's trusted edges) keeps a checkpoint of
        its windowed layers there, so a later prompt with the same prefix resumes from it.

        The sequence is also restored from it at once, so that a fresh evaluation goes on from the
        very cache state (the same cells, in the same order) that a later prompt restoring the same
        checkpoint starts from: the rest of the prompt is computed alike, and a cached prefix never
        changes a result.
        """
        model = self.model
        assert model is not None
        for entry in entries:
            seq, end = entry.seq, entry.pos + len(entry.tokens)
            if seq.trusted == end and seq in slots:  # this entry moved the trusted edge: a unit's end
                slot = slots[seq]
                state = model.save_window(slot)
                model.restore_window(slot, state)
                self.checkpoints.put(slot, end, state)

    def _iterate(self) -> None:
        """One turn of the loop: take new requests, drop cancelled ones, fill free slots, decode one step."""
        self._take(block=self.scheduler.idle and not self._others)
        if self._stop:
            return
        self._reap()
        if self._others:
            self._run_other(self._others.pop(0))
            return
        lap = time.perf_counter()
        self._admit()
        lap = self._lap("schedule", lap)
        if self._outbox:  # who left the queue, at once: their responses start while their prompts decode
            self._flush()
            lap = self._lap("handover", lap)
        batches = self.scheduler.step()
        lap = self._lap("schedule", lap)
        for batch in batches:
            out: dict[Job, list[Delta]] = {}
            if not self._decode(batch, out):
                return
            lap = time.perf_counter()
            for job, pieces in out.items():
                job.emit("pieces", pieces)
                if job.open_choices == 0:
                    self._end_job(job)
            lap = self._lap("schedule", lap)
            self._flush()  # at once: a first token does not wait for the step's other decodes
            lap = self._lap("handover", lap)
        self._report_laps()

    def _lap(self, stage: str, since: float) -> float:
        """Add the time since ``since`` to ``stage`` (the model thread's time, by stage); now."""
        now = time.perf_counter()
        self._laps[stage] += now - since
        return now

    def _report_laps(self) -> None:
        for stage, seconds in self._laps.items():
            if seconds:
                self.metrics.engine_seconds[stage].inc(seconds)
                self._laps[stage] = 0.0

    def _load(self) -> bool:
        for key, value in OPENMP_ENV.items():  # before the first `import llama_cpp` of the process
            os.environ.setdefault(key, value)
        started = time.monotonic()
        logs.event("loading", model=self.config.model_name, path=self.config.model_path)
        try:
            self.model = self._load_model(self.config)
        except Exception as exc:  # llama.cpp reports a bad file through LlamaError/ValueError/OSError
            self.error = f"{self.config.model_path}: llama.cpp could not load the model ({exc})"
            self.state = "failed"
            logs.event("load_failed", model=self.config.model_name, error=self.error)
            if self._on_failure:
                self._on_failure(self)
            return False
        model = self.model
        try:
            self.chat_template = self._load_chat(model, self.config) if self._load_chat else None
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
            chat_template=self.has_chat_template if self._load_chat else None,  # None: read elsewhere
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
        """End the jobs that were cancelled (client gone, shutdown): their slots are free for this step.
        While draining, the jobs that have not started end at once with :class:`ShuttingDown`."""
        for job in [job for job in self._jobs if job.cancel_event.is_set() or self._closing or self._draining]:
            if not (job.cancel_event.is_set() or self._closing) and job.started is not None:
                continue  # draining: an admitted request finishes
            if self._draining and job.started is None and not job.cancel_event.is_set():
                job.emit("error", ShuttingDown())  # never started: the client (or Modal) retries elsewhere
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
                job.emit(STARTED, (admission.keep, job.started))
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

    def _decode(self, entries: list[Entry], out: dict[Job, list[Delta]]) -> bool:
        """Decode one batch, sample every row it computed, apply the results (:meth:`Scheduler.update`),
        and put the new text in ``out``; False when llama.cpp failed (the requests got a 500)."""
        model = self.model
        assert model is not None
        lap = time.perf_counter()
        try:
            if entries[0].seq.span_at(entries[0].pos) is not None:  # an image: a batch of its own (Scheduler.step)
                rows = self._evaluate_image(entries[0])
            else:
                rows = model.decode([(e.seq.slot.id, e.tokens, e.pos, e.logits) for e in entries])
        except model.errors as exc:  # nothing a request did: fail the running ones, start again clean
            self._fail_all(classify(exc))
            return False
        lap = self._lap("decode", lap)
        slots = {e.seq: e.seq.slot.id for e in entries if e.seq.slot is not None}  # before update frees any
        sampled: list[tuple[Sequence, int]] = []
        logprobs: dict[Sequence, tuple[TokenLogprob, ...]] = {}
        copies: list[tuple[int, int]] = []
        for entry, row in zip((e for e in entries if e.logits), rows, strict=True):
            seq = entry.seq
            group = []  # the followers first: they take the prompt from the leader, which may end at once
            if seq.state is State.PROMPT:  # the others of its request share this prompt: they sample the same row
                for follower in [f for f in seq.followers if f.state is State.FOLLOWING]:
                    assert follower.slot is not None
                    copies.append((slots[seq], follower.slot.id))
                    group.append(follower)
            group.append(seq)
            for member in group:
                token, logprob = self._sample(member, row)
                sampled.append((member, token))
                if logprob:
                    logprobs[member] = logprob
        lap = self._lap("sample", lap)
        outcomes = self.scheduler.update(entries, sampled, model.is_eog)
        if model.windowed:  # the sequences that ended now still leave their checkpoints
            self._checkpoint(entries, slots)
        for source, target in copies:  # the followers' caches: before the next decode reads them
            model.copy(source, target)
            self.checkpoints.copy(source, target)
        lap = self._lap("schedule", lap)
        now = time.monotonic()
        for outcome in outcomes:
            self._emit_token(outcome, logprobs.get(outcome.seq, ()), out, now)
        self._lap("text", lap)
        return True

    def _evaluate_image(self, entry: Entry) -> list[int]:
        """Encode one image (or audio chunk) of a prompt and decode it into its sequence (libmtmd); the row of its
        logits when the prompt ends with it (-1: the last output)."""
        model, seq = self.model, entry.seq
        assert model is not None and seq.slot is not None
        model.evaluate_image(seq.owner.generation.media.chunk_at[entry.pos], entry.pos, seq.slot.id, entry.logits)
        return [-1] if entry.logits else []

    def _sample(self, seq: Sequence, row: int) -> tuple[int, tuple[TokenLogprob, ...]]:
        """``seq``'s next token at ``row`` (its own sampler chain), and its logprobs when asked for."""
        model, choice = self.model, self._choices[seq]
        assert model is not None
        generation: Generation = seq.owner.generation
        banned = model.eog_tokens if seq.generated < generation.min_tokens else ()
        if generation.logprobs is None:
            return choice.sampler.sample(row, banned), ()
        logits = model.logits(row)  # before sampling: the chain may change them in place
        token = choice.sampler.sample(row, banned)
        return token, (_logprob(model, logits, token, generation.logprobs),)

    def _emit_token(
        self, outcome: Outcome, logprobs: tuple[TokenLogprob, ...], out: dict[Job, list[Delta]], now: float
    ) -> None:
        """A sampled token as text (stop strings held back and matched); the choice ends with its outcome or a stop string."""
        model, seq = self.model, outcome.seq
        assert model is not None
        job, choice = seq.owner, self._choices[seq]
        if job.first_token is None:
            job.first_token = now
        finish = outcome.finish
        if finish == "stop":  # an end-of-generation token: not part of the text, not counted
            text = choice.text.flush()
        else:
            job.tally.completion_tokens += 1
            text, stopped = choice.text.feed(model.piece(outcome.token))
            if stopped:
                finish = "stop"
            elif finish == "length":
                text += choice.text.flush()
        if text or logprobs or finish is not None:  # text held back (a possible stop string) waits for the next
            out.setdefault(job, []).append(Delta(seq.index, text, logprobs, finish, choice.text.matched))
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
            job.generation.media.free()  # libmtmd's chunks: the preprocessed images and clips
        if job.state != "cancelled":
            job.state = "done"
        now = time.monotonic()
        elapsed = now - (job.started or now)
        self.admission.leave(elapsed if job.started is not None else None)
        if job.generation is not None and job.started is not None:
            self.metrics.finished(
                prompt=job.tally.prompt_tokens,
                cached=job.tally.cached_tokens,
                generated=job.tally.completion_tokens,
                ttft=None if job.first_token is None else job.first_token - job.created,
                latency=now - job.created,
            )
        job._finish()

    def _fail_all(self, error: EngineError) -> None:
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

    def drain(self) -> None:
        """The server is stopping: refuse new requests, end the waiting ones now (503, so that they are
        retried elsewhere at once), let the admitted ones finish."""
        self._draining = self.admission.refusing = True
        self._wake()

    def cancel_all(self) -> None:
        """Cut every running generation at its next step; the waiting ones end without starting."""
        self._closing = self.admission.refusing = True
        self._wake()

    def close(self, timeout: float = 5.0) -> None:
        """Cancel everything, stop the model thread, free the model (when it is idle)."""
        self.state = "closed" if self.state == "ready" else self.state
        self._closing = self.admission.refusing = True
        self._stop = True
        self._wake()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self.model is not None and not self._thread.is_alive():
            self.model.close()  # never while the thread may still be inside llama.cpp
            self.model = None
        for handover in self._handovers.values():
            handover.close()
        self._handovers.clear()


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


def _name_thread(name: str) -> None:
    """Give the calling thread its name in the OS too (Python before 3.14 does not): Linux only."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME


def classify(exc: BaseException) -> Failed:
    """An unexpected exception (logged with its traceback): a bug or llama.cpp's failure, never the client's fault."""
    logs.event("internal_error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
    return Failed(type(exc).__name__)
