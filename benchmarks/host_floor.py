"""The machine's floor for streaming a token: what the kernel charges a server's event loop per
wake-up and per write, before any Python of the server runs.

An API server that streams tokens pays, per decode step, one wake-up (the step's message arrives
from the engine: ``epoll`` returns, one ``recv``) and, per stream, one write to a client that waits
for it (a loopback TCP ``send`` that wakes the client). Both are system calls whose cost is the
kernel's and the (virtual) machine's: on a VM, waking a sleeping CPU is expensive. Measured here with
two processes and nothing else, in the CPU time of the measuring thread:

- **wake-up**: waiting in ``select`` (epoll) on a socket pair until another process writes a
  step-sized message (every millisecond), then ``recv`` it: what our event loop pays per step;
- **write to a waiting reader**: ``send`` of a chunk-sized message to a process that waits in
  ``recv``, one per millisecond: what a server pays per streamed token when its client keeps up;
- **write, back to back**: the same with no pause (the reader seldom waits): the cost without the
  wake-up of the reader.

The floor per streamed token at *n* streams per step is ``write + wake-up / n``: what any server's
HTTP side pays for that token on this machine (llama-server's HTTP threads as ours), however little
it computes. BENCHMARKS.md sets it beside what ``benchmarks.concurrency`` measures of each server's.

    .venv/bin/python -m benchmarks.host_floor
"""

from __future__ import annotations

import argparse
import os
import platform
import selectors
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from deployer.runtime.cpu import cpu_name

STEP_BYTES = 300  # about a step's message from the engine at one stream
CHUNK_BYTES = 180  # about one streamed token's SSE chunk (OpenAI's completions)
PAUSE_S = 0.001  # between messages: the reader (or the loop) is asleep when the next one comes
STREAMS = (1, 4, 8, 16)
PEER_TIMEOUT_S = 10.0  # a peer process that never writes (or connects) fails the run rather than hangs it


@dataclass(frozen=True)
class Floor:
    """Microseconds of the measuring thread's CPU, medians over rounds."""

    wakeup_us: float
    write_waiting_us: float
    write_busy_us: float

    def per_token_us(self, streams: int) -> float:
        """The floor per streamed token when one step carries a token for each of ``streams`` streams."""
        return self.write_waiting_us + self.wakeup_us / streams


# the other process of each measurement: a writer of step messages, or a reader of chunks
WRITER = """
import socket, sys, time
peer = socket.socket(fileno=int(sys.argv[1]))
data = b"m" * int(sys.argv[2])
for _ in range(int(sys.argv[3])):
    time.sleep(float(sys.argv[4]))
    peer.sendall(data)
"""
READER = """
import socket, sys
client = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
while client.recv(65536):
    pass
"""


def wakeup_us(messages: int) -> float:
    """CPU per message of a thread that waits in epoll for another process's message, then reads it."""
    ours, theirs = socket.socketpair()
    args = [str(theirs.fileno()), str(STEP_BYTES), str(messages), str(PAUSE_S)]
    writer = subprocess.Popen([sys.executable, "-c", WRITER, *args], pass_fds=[theirs.fileno()])
    theirs.close()
    selector = selectors.DefaultSelector()
    selector.register(ours, selectors.EVENT_READ)
    got, want = 0, messages * STEP_BYTES
    try:
        started = time.thread_time_ns()
        while got < want:
            if not selector.select(PEER_TIMEOUT_S):
                raise RuntimeError(f"no message from the writer process in {PEER_TIMEOUT_S} s")
            got += len(ours.recv(65536))
        spent = time.thread_time_ns() - started
    finally:
        selector.close()
        ours.close()
        _reap(writer)
    return spent / messages / 1e3


def write_us(writes: int, *, pause: bool) -> float:
    """CPU of one ``send`` of a chunk to a loopback TCP client that reads everything (waits in recv)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(PEER_TIMEOUT_S)
        reader = subprocess.Popen([sys.executable, "-c", READER, str(listener.getsockname()[1])])
        try:
            conn, _ = listener.accept()
        except OSError:
            _reap(reader)
            raise
    chunk, spent = b"c" * CHUNK_BYTES, 0
    try:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as uvicorn's
        for _ in range(writes):
            if pause:
                time.sleep(PAUSE_S)
            started = time.thread_time_ns()
            conn.send(chunk)
            spent += time.thread_time_ns() - started
    finally:
        conn.close()
        _reap(reader)
    return spent / writes / 1e3


def _reap(peer: subprocess.Popen[bytes]) -> None:
    """Wait for a peer process (it ends when its socket closes); kill it if it does not."""
    try:
        peer.wait(PEER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        peer.kill()
        peer.wait()


def measure(rounds: int, count: int) -> Floor:
    samples = [
        (wakeup_us(count), write_us(count, pause=True), write_us(count * 10, pause=False)) for _ in range(rounds)
    ]
    wake, waiting, busy = (statistics.median(column) for column in zip(*samples, strict=True))
    return Floor(wake, waiting, busy)


def markdown(floor: Floor, streams: tuple[int, ...], rounds: int, count: int) -> str:
    lines = [
        "| what | µs of CPU |",
        "|---|--:|",
        f"| wake-up: epoll returns for another process's message, one recv (per step) | {floor.wakeup_us:.1f} |",
        f"| write to a client that waits in recv (per streamed token) | {floor.write_waiting_us:.1f} |",
        f"| write, back to back (the client seldom waits) | {floor.write_busy_us:.1f} |",
        "",
        "| streams per step | floor per streamed token, µs (write + wake-up ÷ streams) |",
        "|--:|--:|",
        *(f"| {n} | {floor.per_token_us(n):.1f} |" for n in streams),
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {platform.machine()}, {os.cpu_count()} CPUs, {cpu_name()}, "
        f"Python {platform.python_version()}; medians of {rounds} rounds of {count} messages "
        f"({STEP_BYTES}-byte steps, {CHUNK_BYTES}-byte chunks, {PAUSE_S * 1e3:g} ms apart).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.host_floor",
        description="What the kernel charges an event loop per wake-up and per streamed write on this machine.",
    )
    parser.add_argument("--rounds", type=int, default=5, help="rounds; medians are printed (default 5)")
    parser.add_argument("--count", type=int, default=2000, help="messages per round (default 2000)")
    args = parser.parse_args(argv)
    print(markdown(measure(args.rounds, args.count), STREAMS, args.rounds, args.count))
    return 0


if __name__ == "__main__":
    sys.exit(main())
