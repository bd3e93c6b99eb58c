"""The engine core in a process of its own, as vLLM v1 runs it: the API server's event loop and the
model thread stop sharing a GIL.

In one process the model thread waits for the GIL whenever ``llama_decode`` returns while the event
loop encodes and sends the previous step's tokens, and the event loop waits for it in turn: on a
GPU, where a step takes milliseconds, that wait is idle accelerator time (measured on the CPU with
a tiny model: BENCHMARKS.md, "Host cost per token"). Here the :class:`~deployer.runtime.engine.core.Engine`
runs unchanged in a child process (``python -m deployer.runtime.engine.process``), and the API
server holds an :class:`EngineProcess` with the same face (``submit``, ``drain``, ``cancel_all``,
``close``, ``state``, ``model``, ``chat_template``, ``metrics``)::

    API server (event loop)                         engine process
    ───────────────────────                         ──────────────
    admission (429, 503 while draining)
    tokenize, render, grammars: a Vocabulary
      (the model file read vocab-only)
    ("submit", key, created, generation, work) ───▶ reader thread ─▶ Engine inbox ─▶ model thread
    ("cancel", key) / ("drain",) / ...          ───▶   decode, sample, text, stop strings
    tickets by key ◀─── ("batch", [(key, kind, value)], metrics) ◀── one message per decode step

One socket pair carries pickled tuples both ways (``multiprocessing.connection``: a length and a
pickle). The event loop reads it with ``add_reader``, so a step's items for every stream arrive in
one wake-up; the model thread writes it without anyone else waiting for its GIL. What crosses is
plain data: token lists, :class:`~deployer.runtime.engine.sampling.Generation`, text
:class:`~deployer.runtime.engine.sampling.Delta` s, errors (picklable), counters.

Not for a model with a projector: libmtmd turns a prompt's images into chunks with the model's own
context, so the server prepares them where the model is (one process, :class:`Engine`).

If the engine process dies, every request in flight gets a 500, ``/health`` says why, and the server
exits (non-zero) so that its supervisor (Modal) starts another. If the API server dies, the engine
process goes with it (``PR_SET_PDEATHSIG``, and end of file on the socket).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from deployer.runtime import logs
from deployer.runtime.config import RuntimeConfig
from deployer.runtime.engine.core import DONE, OPENMP_ENV, Admission, Engine, Job, Ticket, coalesce, deliver
from deployer.runtime.engine.errors import Failed, ShuttingDown
from deployer.runtime.metrics import STAGES, Metrics

if TYPE_CHECKING:
    import asyncio

    from deployer.runtime.engine.model import ModelInterface as Model
    from deployer.runtime.engine.sampling import Generation

__all__ = ["EngineProcess", "main"]

GAUGES_EVERY_S = 0.1  # the engine's counters (time by stage, slots busy, KV use) ride along a batch at most this often
RECEIVE_BYTES = 1 << 18


# ## The API server's side


class EngineProcess:
    """The engine, run in a child process; the API server's handle on it (the face of :class:`Engine`)."""

    def __init__(
        self,
        config: RuntimeConfig,
        *,
        load_model: Callable[[RuntimeConfig], Model],
        load_vocabulary: Callable[[RuntimeConfig], Any],
        load_chat: Callable[[Any, RuntimeConfig], Any] | None = None,
    ) -> None:
        """``load_model`` runs in the engine process (so it is pickled: a module-level function);
        ``load_vocabulary`` here, for the tokenizer, metadata and grammars the app uses;
        ``load_chat`` then reads the chat template from it."""
        self.config = config
        self._load_model, self._load_vocabulary, self._load_chat = load_model, load_vocabulary, load_chat
        self.metrics = Metrics()
        self.metrics.watch(lambda: self._gauges)
        self.state = "loading"  # -> ready | failed; -> closed
        self.error: str | None = None
        self.load_seconds: float | None = None
        self.model: Any = None  # the vocabulary, with the sizes the engine process reported
        self.chat_template: Any = None
        self._gauges: dict[str, float] = {}
        self.admission = Admission(config.concurrency, config.parallel)
        self._tickets: dict[int, Ticket] = {}
        self._keys = itertools.count()
        self._process: subprocess.Popen[bytes] | None = None
        self._conn: Channel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the one that reads the engine's batches
        self._on_failure: Callable[[Any], None] | None = None
        self._send_lock = threading.Lock()  # the loop and shutdown's thread may both send

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def in_flight(self) -> int:
        return self.admission.in_flight

    def start(
        self, on_ready: Callable[[Any], None] | None = None, on_failure: Callable[[Any], None] | None = None
    ) -> None:
        """Start the engine process, then (once it has loaded the model) read the vocabulary here; the
        callbacks run on a thread of their own."""
        self._on_failure = on_failure
        ours, theirs = _socketpair()
        env = {**os.environ, **{k: v for k, v in OPENMP_ENV.items() if k not in os.environ}}
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # what this process imports, the child does
        self._process = subprocess.Popen(
            [sys.executable, "-m", "deployer.runtime.engine.process", str(theirs.fileno()), str(os.getpid())],
            pass_fds=(theirs.fileno(),),
            env=env,
            start_new_session=True,  # a terminal's Ctrl-C reaches the API server only, which drains and closes us
        )
        theirs.close()
        self._conn = ours
        ours.send(("start", self.config, self._load_model))
        threading.Thread(target=self._boot, args=(on_ready,), name="gguf-deploy-boot", daemon=True).start()

    def _boot(self, on_ready: Callable[[Any], None] | None) -> None:
        assert self._conn is not None
        started = time.monotonic()
        try:
            kind, value = self._conn.recv()  # the engine's verdict first: it reads the file as it should be read
        except (EOFError, OSError):
            kind, value = "failed", self._exited()
        vocabulary = None
        if kind == "loaded":
            try:
                vocabulary = self._load_vocabulary(self.config)
            except Exception as exc:
                kind, value = "failed", f"{self.config.model_path}: llama.cpp could not read the vocabulary ({exc})"
        if vocabulary is None:
            self.error, self.state = value, "failed"
            if self._on_failure:
                self._on_failure(self)
            return
        self.model = _ServedModel(vocabulary, value)
        try:
            self.chat_template = self._load_chat(self.model, self.config) if self._load_chat else None
        except Exception as exc:  # a template Jinja cannot even parse: completions still work
            logs.event("chat_template_unusable", model=self.config.model_name, level="warn", error=str(exc))
        self.load_seconds = time.monotonic() - started
        logs.event(
            "api_ready",
            model=self.config.model_name,
            load_s=round(self.load_seconds, 3),
            engine_pid=self._process.pid if self._process else None,
            chat_template=self.chat_template is not None,
        )
        self.state = "ready"
        if on_ready:
            on_ready(self)
        self._watch()

    def _watch(self) -> None:
        """Wait (on the boot thread) for the engine process to end; unless it was closed, it was lost."""
        assert self._process is not None
        self._process.wait()
        loop = self._loop
        if self.state == "ready":
            if loop is None:
                self._lost()
            else:
                with contextlib.suppress(RuntimeError):  # the loop is closed: the server is gone already
                    loop.call_soon_threadsafe(self._lost)

    # -- admission (the event loop)

    def submit(
        self, generation: Generation | None = None, *, work: Callable[[Model, Job], None] | None = None
    ) -> Ticket:
        """Accept a generation (or other work); :class:`Busy` at once when ``concurrency`` are in."""
        import asyncio

        loop = asyncio.get_running_loop()
        if self._loop is None and self._conn is not None:  # the batches are read where the requests are
            self._loop = loop
            loop.add_reader(self._conn.fileno(), self._receive)
        if self.state != "ready":
            raise Failed("EngineProcessExited") if self.state == "failed" else ShuttingDown()
        self.admission.enter()
        key = next(self._keys)
        ticket = Ticket(loop, generation)
        ticket.cancel = lambda: self._send(("cancel", key))
        self._tickets[key] = ticket
        if not self._send(("submit", key, ticket.created, generation, work)):
            self._lost()
        return ticket

    def _send(self, message: tuple[Any, ...]) -> bool:
        """Send ``message`` to the engine process; False when it is gone."""
        if self._conn is None:
            return False
        try:
            with self._send_lock:
                self._conn.send(message)
        except (OSError, ValueError):  # a broken pipe, or closed here
            return False
        return True

    def _receive(self) -> None:
        """On the event loop: every message the engine process sent (one per decode step)."""
        conn = self._conn
        assert conn is not None
        try:
            messages = conn.received()
            if messages:
                self._apply(coalesce([batch for _, batch, _ in messages]))
            for _, _, extra in messages:
                if extra:
                    self._account(extra)
        except (EOFError, OSError):
            self._lost()

    def _apply(self, batch: list[tuple[int, str, Any]]) -> None:
        tickets = self._tickets
        now = time.monotonic()
        for key, kind, value in batch:
            ticket = tickets.get(key)
            if ticket is None:
                continue
            if kind == DONE:
                del tickets[key]
                started = value[2]
                self.admission.leave(None if started is None else now - started)
            ticket.put(kind, value)

    def _account(self, extra: dict[str, Any]) -> None:
        """The engine's counters since its last batch: the model thread's time by stage, finished generations."""
        for stage, seconds in extra.get("laps", {}).items():
            self.metrics.engine_seconds[stage].inc(seconds)
        for finished in extra.get("finished", ()):
            self.metrics.finished(**finished)
        if "gauges" in extra:
            self._gauges = extra["gauges"]

    def _lost(self) -> None:
        """The engine process is gone: fail what is in flight, and stop (its supervisor starts another)."""
        if self.state in ("failed", "closed"):
            return
        self.error = self._exited()
        self.state = "failed"
        logs.event("engine_process_exited", model=self.config.model_name, level="error", error=self.error)
        self._stop_reading()
        tickets, self._tickets = self._tickets, {}
        self.admission.in_flight = 0
        for ticket in tickets.values():
            deliver([[(ticket, "error", Failed("EngineProcessExited")), (ticket, "end", ticket.tally)]])
            deliver([[(ticket, DONE, (ticket.tally, "done", ticket.started))]])
        if self._on_failure:
            self._on_failure(self)

    def _exited(self) -> str:
        process = self._process
        code = None if process is None else process.poll()
        if code is None and process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = process.wait(2)
        how = "" if code is None else f" (signal {-code})" if code < 0 else f" (status {code})"
        return f"the engine process exited{how}; see the log above"

    def _stop_reading(self) -> None:
        if self._loop is not None and self._conn is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._conn.fileno())
        self._loop = None

    # -- shutdown

    def drain(self) -> None:
        """Refuse new requests; the waiting ones end now (503), the admitted ones finish."""
        self.admission.refusing = True
        self._send(("drain",))

    def cancel_all(self) -> None:
        """Cut every running generation at its next step; the waiting ones end without starting."""
        self.admission.refusing = True
        self._send(("cancel_all",))

    def close(self, timeout: float = 5.0) -> None:
        """Stop the engine process (it frees the model), waiting up to ``timeout`` for it."""
        self.state = "closed" if self.state == "ready" else self.state
        self.admission.refusing = True
        self._send(("close", timeout))
        self._stop_reading()
        process = self._process
        if process is not None:
            try:
                process.wait(timeout + 5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self.model is not None:
            self.model.close()
            self.model = None


class _ServedModel:
    """The model as the API server sees it: the vocabulary loaded here, the sizes the engine reported."""

    projector = None  # a model with a projector runs in one process

    def __init__(self, vocabulary: Any, sizes: dict[str, Any]) -> None:
        self._vocabulary = vocabulary
        self.n_vocab: int = vocabulary.n_vocab  # read per request: no __getattr__ on the way
        self.bos: int = vocabulary.bos
        self.eos: int = vocabulary.eos
        self.n_ctx: int = sizes["n_ctx"]
        self.n_batch: int = sizes["n_batch"]
        self.n_threads: int = sizes["n_threads"]
        self.n_embd: int = sizes["n_embd"]
        self.windowed: bool = sizes["windowed"]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._vocabulary, name)  # close() among them


def _socketpair() -> tuple[Channel, Channel]:
    a, b = socket.socketpair()
    return Channel(a), Channel(b)


class Channel:
    """Pickled messages over a socket, each after its length (4 bytes): what the two processes say.

    Leaner than ``multiprocessing.connection`` where it counts, per decode step: one ``send`` a
    message, and on the event loop one ``recv`` for every message that has arrived (no ``select``
    per message).
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = bytearray()
        self._view = memoryview(bytearray(RECEIVE_BYTES))

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, message: Any) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self.sock.sendall(len(data).to_bytes(4, "big") + data)

    def recv(self) -> Any:
        """The next message, waiting for it; EOFError when the other side is gone."""
        while True:
            messages = self._frames(limit=1)
            if messages:
                return messages[0]
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise EOFError
            self._buffer += chunk

    def received(self) -> list[Any]:
        """Every whole message that has arrived, without waiting; EOFError when the other side is gone."""
        view = self._view
        while True:
            try:
                n = self.sock.recv_into(view, 0, socket.MSG_DONTWAIT)  # into a buffer kept: no allocation per step
            except (BlockingIOError, InterruptedError):
                break
            if not n:
                raise EOFError
            self._buffer += view[:n]
            if n < len(view):
                break
        return self._frames()

    def _frames(self, limit: int | None = None) -> list[Any]:
        out, buffer, at = [], self._buffer, 0
        while len(buffer) - at >= 4 and (limit is None or len(out) < limit):
            size = int.from_bytes(buffer[at : at + 4], "big")
            if len(buffer) - at - 4 < size:
                break
            # the peer is our own child (or parent) on a socketpair nobody else holds
            out.append(pickle.loads(buffer[at + 4 : at + 4 + size]))  # noqa: S301
            at += 4 + size
        del buffer[:at]
        return out

    def close(self) -> None:
        self.sock.close()


# ## The engine process


class _Outbound:
    """The engine process's route: a decode step's items for every job in one message to the API server."""

    def __init__(self, conn: Channel, relay: _Relay, jobs: dict[int, Job]) -> None:
        self._conn, self._relay, self._jobs = conn, relay, jobs

    def post(self, batch: list[tuple[Any, str, Any]]) -> None:
        ended = False
        for key, kind, _ in batch:
            if kind == DONE:
                self._jobs.pop(key, None)
                ended = True
        try:
            self._conn.send(("batch", batch, self._relay.take(force=ended)))
        except OSError:  # the API server is gone: so is the reason to go on
            os._exit(1)


class _Relay:
    """The engine's metrics in the engine process: counted here, sent with the next batch."""

    def __init__(self) -> None:
        self.engine_seconds = {stage: _Counter() for stage in STAGES}
        self._finished: list[dict[str, Any]] = []
        self._gauges: Callable[[], dict[str, float]] = dict
        self._sent = 0.0

    def watch(self, state: Callable[[], dict[str, float]]) -> None:
        self._gauges = state

    def finished(self, **counts: Any) -> None:
        self._finished.append(counts)

    def take(self, *, force: bool = False) -> dict[str, Any] | None:
        """What to send with a batch: every ``GAUGES_EVERY_S``, and whenever a job ended (``force``)."""
        now = time.monotonic()
        if not force and now - self._sent < GAUGES_EVERY_S:
            return None
        self._sent = now
        extra: dict[str, Any] = {"gauges": self._gauges()}
        laps = {stage: c.take() for stage, c in self.engine_seconds.items() if c.seconds}
        if laps:
            extra["laps"] = laps
        if self._finished:
            extra["finished"], self._finished = self._finished, []
        return extra


class _Counter:
    def __init__(self) -> None:
        self.seconds = 0.0

    def inc(self, seconds: float) -> None:
        self.seconds += seconds

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def main(argv: list[str]) -> None:
    """The engine process: load the model, then serve the API server's messages until it closes."""
    conn = Channel(socket.socket(fileno=int(argv[0])))
    _die_with_parent(int(argv[1]))
    for sig in (signal.SIGINT, signal.SIGTERM):  # the API server drains, then closes us
        signal.signal(sig, signal.SIG_IGN)
    logs.configure()
    _, config, load_model = conn.recv()
    relay, jobs = _Relay(), {}
    outbound = _Outbound(conn, relay, jobs)
    engine = Engine(config, relay, load_model=load_model)  # type: ignore[arg-type]
    loaded = threading.Event()
    engine.start(on_ready=lambda _: loaded.set(), on_failure=lambda _: loaded.set())
    loaded.wait()
    if engine.state != "ready":
        conn.send(("failed", engine.error))
        return
    model = engine.model
    assert model is not None
    sizes = {
        "n_ctx": model.n_ctx,
        "n_batch": model.n_batch,
        "n_threads": model.n_threads,
        "n_embd": model.n_embd,
        "windowed": model.windowed,
    }
    conn.send(("loaded", sizes))
    timeout = 0.0
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the API server is gone
            break
        kind = message[0]
        if kind == "submit":
            _, key, created, generation, work = message
            job = jobs[key] = Job(engine, outbound, key, generation=generation, work=work, created=created)
            engine.accept(job)
        elif kind == "cancel":
            job = jobs.get(message[1])
            if job is not None:
                job.cancel()
        elif kind == "drain":
            engine.drain()
        elif kind == "cancel_all":
            engine.cancel_all()
        elif kind == "close":
            timeout = message[1]
            break
    engine.close(timeout=timeout)
    os._exit(0)  # the model thread may still be inside llama.cpp (a daemon thread): no interpreter teardown


def _die_with_parent(parent: int) -> None:
    """Linux: the kernel sends SIGKILL when the API server's process ends, however it ends."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it ended before prctl
        os._exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
