"""The runtime's one request error: a status, a message, and the field it is about.

Raised wherever a request is found wanting (its body, its messages, its images, its grammar) and
answered by the app in the shape of the protocol that asked: OpenAI's ``{"error": {...}}`` by
default (:meth:`ApiError.body`), Anthropic's by :func:`deployer.runtime.protocols.messages.error_response`.
The engine raises none: the app translates its :mod:`deployer.runtime.engine.errors`.
"""

from __future__ import annotations

from typing import Any

from deployer.runtime.engine.errors import Busy, Failed, ShuttingDown


class ApiError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # OpenAI's field name
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def __reduce__(self) -> tuple[Any, ...]:  # raised in the engine's process, answered in the API server's
        fields = {"type": self.type, "code": self.code, "param": self.param, "headers": self.headers}
        return (_api_error, (self.status, self.message, fields))

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _api_error(status: int, message: str, fields: dict[str, Any]) -> ApiError:
    return ApiError(status, message, **fields)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    """A 400 about one field of the request."""
    return ApiError(400, message, param=param, code=code)


def api_error(error: Exception) -> ApiError:
    """An error a job reported, as the status and fields its protocol's encoder writes: the engine's
    own errors get theirs here (a request error a work function raised is one already)."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, Busy):
        return ApiError(
            429, str(error), type="rate_limit_error", code="server_busy",
            headers={"Retry-After": str(error.retry_after)},
        )  # fmt: skip
    if isinstance(error, ShuttingDown):
        # Retry-After 0: another container (Modal routes the retry) can take it now
        return ApiError(503, str(error), type="server_error", code="shutting_down", headers={"Retry-After": "0"})
    kind = error.kind if isinstance(error, Failed) else type(error).__name__
    return ApiError(500, f"internal error ({kind}); see the server log", type="server_error")
