"""What the engine reports to a request, in its own terms: the app gives each its protocol's status and shape.

EngineError     the base: a request the engine could not serve
Busy            ``concurrency`` requests are already in (the app: 429 + Retry-After; Anthropic's 529)
ShuttingDown    the server is stopping: the request did not start, or was cut (the app: 503)
Failed          llama.cpp failed, or a bug: logged with its traceback (the app: 500)
"""

from __future__ import annotations

from typing import Any


class EngineError(Exception):
    """A request the engine could not serve (never the client's fault: that is a 4xx before submit)."""


class Busy(EngineError):
    """The engine holds ``limit`` requests (running or waiting): refused at once, never queued without bound."""

    def __init__(self, in_flight: int, limit: int, retry_after: int) -> None:
        super().__init__(
            f"the server is busy: {in_flight} requests are running or queued (its limit is {limit}); "
            f"retry in {retry_after} s"
        )
        self.in_flight, self.limit, self.retry_after = in_flight, limit, retry_after

    def __reduce__(self) -> tuple[Any, ...]:  # errors cross to the API server's process pickled
        return (Busy, (self.in_flight, self.limit, self.retry_after))


class ShuttingDown(EngineError):
    """The server is stopping: retry elsewhere."""

    def __init__(self) -> None:
        super().__init__("the server is shutting down; retry")

    def __reduce__(self) -> tuple[Any, ...]:
        return (ShuttingDown, ())


class Failed(EngineError):
    """An unexpected failure (llama.cpp's or ours), logged with its traceback where it happened."""

    def __init__(self, kind: str) -> None:
        super().__init__(f"internal error ({kind}); see the server log")
        self.kind = kind

    def __reduce__(self) -> tuple[Any, ...]:
        return (Failed, (self.kind,))
