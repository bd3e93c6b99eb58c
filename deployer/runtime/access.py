"""Request ids and the one JSON log line per request: the outermost middleware of the app.

Handlers fill in what they know (tokens, queue time) on the request's :class:`RequestLog`; the
middleware writes the line when the response is done, streamed or not (see
:mod:`deployer.runtime.logs` for its shape). A client's ``X-Request-Id`` is kept when it is
sane, and every response carries the id back.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployer.runtime import logs
from deployer.runtime.engine.core import Job, classify
from deployer.runtime.errors import api_error
from deployer.runtime.metrics import Metrics

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
CLIENT_CLOSED = 499  # nginx's status for "the client went away": only ever logged, never sent
# the scope key of the ASGI server's ``send``, as the outermost middleware received it: what a stream
# writes its body chunks with (no middleware here changes a body; they all read the response's start)
SERVER_SEND = "gguf_server_send"


@dataclass
class RequestLog:
    """What the one log line of a request says; handlers fill in the tokens."""

    id: str
    method: str
    route: str
    started: float = field(default_factory=time.monotonic)
    status: int | None = None
    stream: bool | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    queue_ms: int | None = None
    error: str | None = None

    def record(self, job: Job) -> None:
        self.queue_ms = job.queue_ms
        if job.started is not None:
            self.prompt_tokens = job.tally.prompt_tokens
            self.completion_tokens = job.tally.completion_tokens
            self.cached_tokens = job.tally.cached_tokens


def log_of(request: Request) -> RequestLog:
    """The log record of ``request`` (set by :class:`AccessLog`)."""
    return request.scope["gguf_request"]


ROUTES = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/models",
    "/v1/responses",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/chat/completions",
    "/completions",
    "/embeddings",
    "/models",
    "/tokenize",
    "/detokenize",
    "/metrics",
)


def _route_label(path: str) -> str:
    """A path as a metrics label: one of the routes, never what a client made up (unbounded series)."""
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    if path.startswith("/v1/responses/"):
        return "/v1/responses/{id}"
    return path if path in ROUTES else "other"


class AccessLog:
    """Outermost middleware: a request id, one JSON log line per request, a 500 for bugs."""

    def __init__(self, app: ASGIApp, metrics: Metrics | None = None) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        log = RequestLog(
            given if _REQUEST_ID.fullmatch(given) else f"req_{uuid.uuid4().hex}", scope["method"], scope["path"]
        )
        scope["gguf_request"] = log
        scope[SERVER_SEND] = send  # the ASGI server's own: a stream's body chunks need no middleware
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                log.status = log.status or message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", log.id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:  # a bug: answer 500 in OpenAI's shape if we still can
            error = api_error(classify(exc))
            log.status, log.error = error.status, error.code or error.type
            if not started:
                await JSONResponse(error.body(), status_code=error.status)(scope, receive, send_with_id)
        finally:
            if self.metrics is not None and log.route != "/health":
                self.metrics.requests.labels(route=_route_label(log.route), status=str(log.status)).inc()
            if not (log.route == "/health" and log.status == 200):  # readiness probes would drown the log
                logs.event(
                    "request",
                    id=log.id,
                    method=log.method,
                    route=log.route,
                    status=log.status,
                    stream=log.stream,
                    prompt_tokens=log.prompt_tokens,
                    completion_tokens=log.completion_tokens,
                    cached_tokens=log.cached_tokens,
                    queue_ms=log.queue_ms,
                    latency_ms=int((time.monotonic() - log.started) * 1000),
                    error=log.error,
                )
