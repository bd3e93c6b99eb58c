"""The ASGI app: OpenAI's routes over the engine, with what a production endpoint needs.

    GET  /health                503 while loading, 200 when ready (no auth: Modal's readiness)
    GET  /v1/models             the manifest name as the one model id
    POST /v1/chat/completions   chat, streaming or not
    POST /v1/completions        legacy completions (text or token-array prompt)
    POST /v1/embeddings         when the manifest enables them, else 400

Every ``/v1`` route checks ``Authorization: Bearer <key>`` when a key is configured (constant-time
comparison). Every error, including 404/405/413/429, has OpenAI's shape. Request bodies are
capped, parsed strictly and checked before they reach the model; a client that goes away
cancels its generation. One JSON log line per request (see :mod:`deployer.runtime.logs`).

Why not llama-cpp-python's ``create_app``: it loads the model before it can answer anything (no
"loading" state), and its routes share module-global locks that either serialise requests with
no bound or cut off a running stream for a newer one. What is right in it is reused: its
request types (``llama_cpp.server.types``), its ``Llama`` calls and chat formats.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Awaitable, Callable
from dataclasses import replace
from functools import partial
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from deployer.runtime.access import CLIENT_CLOSED, AccessLog, RequestLog, log_of
from deployer.runtime.calls import Responder, completion_prompt, generation, json_grammar, run_embedding, usage
from deployer.runtime.config import RuntimeConfig
from deployer.runtime.engine import Engine, Job
from deployer.runtime.media import limits_of, take_request_images
from deployer.runtime.protocol import (
    ApiError,
    Call,
    bad_request,
    normalize_chat,
    normalize_completion,
    normalize_embedding,
    parse_json,
)
from deployer.runtime.vision import media_prompt

# ## Building the app


def build_app(config: RuntimeConfig, engine: Engine) -> ASGIApp:
    """The ASGI app serving ``engine`` with the settings of ``config`` (its API key included)."""
    api = _Api(config, engine)
    routes = [
        Route("/health", api.health, methods=["GET", "HEAD"]),
        Route("/v1/models", api.openai(api.models), methods=["GET"]),
        Route("/v1/models/{model:path}", api.openai(api.model), methods=["GET"]),
        Route("/v1/chat/completions", api.openai(api.chat), methods=["POST"]),
        Route("/v1/completions", api.openai(api.completions), methods=["POST"]),
        Route("/v1/embeddings", api.openai(api.embeddings), methods=["POST"]),
        Route("/metrics", api.authenticated(api.metrics), methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        middleware=[
            # browser chat UIs call the API directly; the key, not the origin, is what protects it
            Middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"]),
        ],
        exception_handlers={HTTPException: _http_exception},
    )
    return AccessLog(app, engine.metrics)


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        error = ApiError(404, f"no route {request.method} {request.url.path}", code="not_found")
    elif exc.status_code == 405:
        error = ApiError(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed")
    else:
        error = ApiError(exc.status_code, str(exc.detail))
    return _error_response(request, error)


def _error_response(request: Request | None, error: ApiError) -> JSONResponse:
    if request is not None:
        log_of(request).error = error.code or error.type
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


class _Api:
    def __init__(self, config: RuntimeConfig, engine: Engine) -> None:
        self.config = config
        self.engine = engine
        self._key = config.api_key.encode() if config.api_key else None

    def openai(self, handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        """An OpenAI route: authenticated, errors in OpenAI's shape."""

        async def endpoint(request: Request) -> Response:
            try:
                self._authenticate(request)
                return await handler(request)
            except ApiError as error:
                return _error_response(request, error)
            except ClientDisconnect:  # gone while sending its body
                log_of(request).status = CLIENT_CLOSED
                return Response(status_code=CLIENT_CLOSED)

        return endpoint

    def authenticated(
        self, handler: Callable[[Request], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        """A route that needs the API key when the endpoint has one (errors in OpenAI's shape)."""

        async def endpoint(request: Request) -> Response:
            try:
                self._authenticate(request)
            except ApiError as error:
                return _error_response(request, error)
            return await handler(request)

        return endpoint

    def _authenticate(self, request: Request) -> None:
        if self._key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(
                401,
                "You didn't provide an API key: send it as 'Authorization: Bearer <key>'",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not hmac.compare_digest(token.strip().encode(), self._key):
            raise ApiError(
                401, "Incorrect API key provided", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
            )

    def _require_ready(self) -> None:
        if not self.engine.ready:
            loading = self.engine.state == "loading"
            raise ApiError(
                503,
                "the model is still loading; retry shortly"
                if loading
                else f"the model is not available ({self.engine.state})",
                type="server_error",
                code="model_loading" if loading else "model_unavailable",
                headers={"Retry-After": "2"} if loading else {},
            )

    # -- routes

    async def health(self, request: Request) -> Response:
        engine = self.engine
        body = {
            "status": {"ready": "ok"}.get(engine.state, engine.state),
            "model": self.config.model_name,
            "in_flight": engine.in_flight,
            "concurrency": self.config.concurrency,
            "parallel": self.config.parallel,
        }
        if engine.error:
            body["error"] = engine.error
        return JSONResponse(body, status_code=200 if engine.ready else 503)

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        if name != self.config.model_name:
            raise ApiError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")
        return JSONResponse(self._model_card())

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.config.model_name, "object": "model", "created": 0, "owned_by": "gguf-deploy"}

    async def metrics(self, request: Request) -> Response:
        body, content_type = self.engine.metrics.render()
        return Response(body, media_type=content_type)

    async def chat(self, request: Request) -> Response:
        self._require_ready()
        raw, marker, images = take_request_images(await self._json(request), limits_of(self.config))
        call = normalize_chat(raw)
        template = self.engine.chat_template
        if template is None:
            raise bad_request(
                "this model has no chat template: set [server] chat_format in its manifest, or use /v1/completions",
                "messages",
                "no_chat_template",
            )
        from llama_cpp.server.types import CreateChatCompletionRequest

        # the messages were checked by normalize_chat, in OpenAI's shapes the stock type does not know
        body = _validated(CreateChatCompletionRequest, {**call.params, "messages": []})
        params = call.params
        rendered = template.render(
            params["messages"],
            tools=params.get("tools"),
            tool_choice=params.get("tool_choice"),
            parallel_tool_calls=params.get("parallel_tool_calls", True),
        )
        model = self.engine.model
        media = None
        if images:  # the images decoded and preprocessed off the event loop; encoded later, on the model thread
            media = await asyncio.to_thread(
                media_prompt, model, rendered.prompt, add_bos=rendered.add_bos, marker=marker, images=images
            )
            prompt = media.tokens
        else:
            prompt = model.tokenize(rendered.prompt, add_special=rendered.add_bos)
        grammar = rendered.grammar or json_grammar(call) or body.grammar
        work = generation(
            model, call, body, n_ctx=self.config.n_ctx, prompt=prompt, grammar=grammar, extra_stop=rendered.stop
        )
        if media is not None:
            work = replace(work, media=media)
        parsers = [rendered.parser() for _ in range(call.n)]
        return await self._generate(request, call, work, Responder(call, self.config.model_name, parsers=parsers))

    async def completions(self, request: Request) -> Response:
        self._require_ready()
        call = normalize_completion(await self._json(request))
        from llama_cpp.server.types import CreateCompletionRequest

        body = _validated(CreateCompletionRequest, call.params)
        model = self.engine.model
        prompt = completion_prompt(model, call)
        work = generation(
            model, call, body, n_ctx=self.config.n_ctx, prompt=prompt, grammar=json_grammar(call) or body.grammar
        )
        echo = call.params.get("prompt", "") if body.echo else ""
        return await self._generate(request, call, work, Responder(call, self.config.model_name, echo=echo))

    async def embeddings(self, request: Request) -> Response:
        if not self.config.embeddings:
            raise bad_request(
                "embeddings are not enabled for this model: set [server] embeddings = true in its manifest",
                "input",
                "embeddings_disabled",
            )
        self._require_ready()
        call = normalize_embedding(await self._json(request))
        job = self.engine.submit(work=partial(run_embedding, call=call, model_name=self.config.model_name))
        return await self._result(request, job)

    # -- request bodies

    async def _json(self, request: Request) -> Any:
        cap = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > cap):
            raise _too_large(cap)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > cap:
                raise _too_large(cap)
        return parse_json(bytes(body))

    # -- running jobs

    async def _generate(self, request: Request, call: Call, work: Any, responder: Responder) -> Response:
        log_of(request).stream = call.stream
        job = self.engine.submit(work)
        if call.stream:
            return await self._stream(request, job, responder)
        return await self._result(request, job, responder)

    async def _result(self, request: Request, job: Job, responder: Responder | None = None) -> Response:
        """The whole answer of ``job`` as one JSON response (an error, or a 503 when a shutdown cut it)."""
        log = log_of(request)
        error: ApiError | None = None
        result: Any = None
        while True:
            item = await _unless_disconnected(request, job.next())
            if item is None:
                return await self._abandoned(request, job)
            kind, value = item
            if kind == "pieces" and responder is not None:
                responder.add(value)
            elif kind == "result":
                result = value
            elif kind == "error":
                error = value
            elif kind == "end":
                break
        await job.done
        log.record(job)
        if error is not None:
            return _error_response(request, error)
        if job.tally.cut or job.state == "cancelled":  # cancelled by a shutdown: never a truncated answer as a 200
            return _error_response(request, _stopping())
        return JSONResponse(result if responder is None else responder.result(job.tally))

    async def _stream(self, request: Request, job: Job, responder: Responder) -> Response:
        # headers wait for the first piece, so an error before it (a shutdown) is still a plain status
        item = await _unless_disconnected(request, job.next())
        if item is None:
            return await self._abandoned(request, job)
        kind, value = item
        if kind != "pieces":
            await job.done
            log_of(request).record(job)
            return _error_response(request, value if kind == "error" else _stopping())
        return _EventStream(job, responder.chunks(value), responder, log_of(request))

    async def _abandoned(self, request: Request, job: Job) -> Response:
        job.cancel()
        if job.state != "cancelled":
            await job.done  # stops at the next token; its counts go in the log line
        log = log_of(request)
        log.record(job)
        log.status = CLIENT_CLOSED
        return Response(status_code=CLIENT_CLOSED)


async def _unless_disconnected(request: Request, waiting: Awaitable[Any]) -> Any:
    """``await waiting``, or None as soon as the client disconnects."""
    task = asyncio.ensure_future(waiting)
    watch = asyncio.ensure_future(_disconnect(request.receive))
    done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        watch.cancel()
        return task.result()
    task.cancel()
    return None


async def _disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class _EventStream(StreamingResponse):
    """Server-sent events of a job; cancels the job when the client goes away."""

    def __init__(self, job: Job, first: list[dict[str, Any]], responder: Responder, log: RequestLog) -> None:
        self.job, self.responder, self.log = job, responder, log
        self._complete = False
        super().__init__(self._events(first), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _events(self, first: list[dict[str, Any]]) -> Any:
        yield b"".join(map(_sse, first))
        while True:
            kind, value = await self.job.next()
            if kind == "pieces":
                yield b"".join(map(_sse, self.responder.chunks(value)))
            elif kind == "error":  # after the headers: an error event, as OpenAI's SDKs expect
                self.log.error = value.code or value.type
                yield _sse(value.body())
            elif kind == "end":
                break
        if self.job.tally.cut:  # a shutdown cut it: say so, rather than end as if complete
            error = _stopping()
            self.log.error = error.code
            yield _sse(error.body())
        if self.responder.call.include_usage:
            yield _sse({**self.responder.head(), "choices": [], "usage": usage(self.job.tally)})
        yield b"data: [DONE]\n\n"
        self._complete = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self._complete:
                self.job.cancel()
                self.log.status = CLIENT_CLOSED
            await asyncio.shield(self.job.done)
            self.log.record(self.job)


def _sse(data: Any) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


# ## Parsing and validation


def _validated(model: Any, params: dict[str, Any]) -> Any:
    from pydantic import ValidationError

    try:
        return model.model_validate(params)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"] if not str(part).startswith("function-"))
        raise bad_request(f"{where}: {first['msg']}" if where else first["msg"], where or None) from exc


def _stopping() -> ApiError:
    return ApiError(503, "the server is shutting down; retry", type="server_error", code="shutting_down")


def _too_large(cap: int) -> ApiError:
    return ApiError(413, f"the request body is larger than {cap:,} bytes", code="request_too_large")
