"""The ASGI app: four wire protocols over one engine, with what a production endpoint needs.

    GET  /health                    503 while loading, 200 when ready (no auth: Modal's readiness)
    GET  /v1/models                 the manifest name as the one model id
    POST /v1/chat/completions       OpenAI chat, streaming or not
    POST /v1/completions            legacy completions (text or token-array prompt)
    POST /v1/embeddings             when the manifest enables them, else 400
    POST /v1/responses              OpenAI's Responses API (GET / DELETE /v1/responses/{id}: the store)
    POST /v1/messages               Anthropic's Messages API (and /v1/messages/count_tokens)
    POST /tokenize, /detokenize     llama-server's: text <-> this model's token ids
    the OpenAI routes without /v1   as llama-server answers them

Each protocol's decoder (``deployer.runtime.protocols``) makes one internal request; below it the
rendering, the engine, tool-call parsing and reasoning separation are shared; each protocol's
encoder writes the answer, its stream and its errors in the protocol's shape. Every API route
checks the key (``Authorization: Bearer <key>`` or ``x-api-key``, constant-time) when one is
configured. Request bodies are capped, parsed strictly and checked before they reach the model; a
client that goes away cancels its generation. One JSON log line per request (``deployer.runtime.logs``).

Why not llama-cpp-python's ``create_app``: it loads the model before it can answer anything (no
"loading" state), and its routes share module-global locks that either serialise requests with
no bound or cut off a running stream for a newer one.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable
from dataclasses import replace
from functools import partial
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from deployer.runtime import logs
from deployer.runtime.access import CLIENT_CLOSED, SERVER_SEND, AccessLog, RequestLog, log_of
from deployer.runtime.config import RuntimeConfig
from deployer.runtime.engine.core import Engine, Job
from deployer.runtime.engine.errors import EngineError, ShuttingDown
from deployer.runtime.engine.sampling import Generation
from deployer.runtime.errors import ApiError, api_error, bad_request
from deployer.runtime.media.fetch import inline_remote_images
from deployer.runtime.media.images import CHAT, MESSAGES, RESPONSES, Media, Shape, limits_of, take_request_images
from deployer.runtime.media.projector import media_prompt
from deployer.runtime.prepare import completion_prompt, generation, json_grammar
from deployer.runtime.protocols import messages, openai, responses
from deployer.runtime.protocols.checks import normalize_embedding, parse_json
from deployer.runtime.protocols.openai import Responder, run_embedding
from deployer.runtime.protocols.request import GenerationRequest

ErrorEncoder = Callable[[ApiError], Response]
Handler = Callable[[Request], Awaitable[Response]]

# ## Building the app


def build_app(config: RuntimeConfig, engine: Engine) -> ASGIApp:
    """The ASGI app serving ``engine`` with the settings of ``config`` (its API key included)."""
    api = _Api(config, engine)
    anthropic = partial(api.route, errors=messages.error_response)
    routes = [Route("/health", api.health, methods=["GET", "HEAD"])]
    for prefix in ("/v1", ""):  # llama-server answers the OpenAI routes without /v1 too
        routes += [
            Route(f"{prefix}/models", api.route(api.models), methods=["GET"]),
            Route(f"{prefix}/models/{{model:path}}", api.route(api.model), methods=["GET"]),
            Route(f"{prefix}/chat/completions", api.route(api.chat), methods=["POST"]),
            Route(f"{prefix}/completions", api.route(api.completions), methods=["POST"]),
            Route(f"{prefix}/embeddings", api.route(api.embeddings), methods=["POST"]),
        ]
    routes += [
        Route("/v1/responses", api.route(api.responses), methods=["POST"]),
        Route("/v1/responses/{id}", api.route(api.stored_response), methods=["GET", "DELETE"]),
        Route("/v1/messages", anthropic(api.messages), methods=["POST"]),
        Route("/v1/messages/count_tokens", anthropic(api.count_tokens), methods=["POST"]),
        Route("/tokenize", api.route(api.tokenize), methods=["POST"]),
        Route("/detokenize", api.route(api.detokenize), methods=["POST"]),
        Route("/metrics", api.authenticated(api.metrics), methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(_Cors)],  # browser chat UIs call the API directly
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
    anthropic = request.url.path.startswith("/v1/messages")
    return _error_response(request, error, messages.error_response if anthropic else _openai_error)


def _openai_error(error: ApiError) -> Response:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _error_response(request: Request | None, error: ApiError, errors: ErrorEncoder = _openai_error) -> Response:
    if request is not None:
        log_of(request).error = error.code or error.type
    return errors(error)


class _Api:
    def __init__(self, config: RuntimeConfig, engine: Engine) -> None:
        self.config = config
        self.engine = engine
        self._key = config.api_key.encode() if config.api_key else None
        self.store = responses.ResponseStore()

    def route(self, handler: Handler, errors: ErrorEncoder = _openai_error) -> Handler:
        """An API route: authenticated, errors in the protocol's shape (``errors``)."""

        async def endpoint(request: Request) -> Response:
            request.state.errors = errors
            try:
                self._authenticate(request)
                return await handler(request)
            except ApiError as error:
                return _error_response(request, error, errors)
            except EngineError as error:  # Busy, at submit
                return _error_response(request, api_error(error), errors)
            except ClientDisconnect:  # gone while sending its body
                log_of(request).status = CLIENT_CLOSED
                return Response(status_code=CLIENT_CLOSED)

        return endpoint

    def authenticated(self, handler: Handler) -> Handler:
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
            token = request.headers.get("x-api-key", "")  # Anthropic's header
            if not token.strip():
                raise ApiError(
                    401,
                    "You didn't provide an API key: send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'",
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
        raw, marker, images = await self._take_images(await self._json(request), CHAT)
        decoded = openai.decode_chat(raw)
        work, parsers = await self._chat_generation(decoded, marker, images)
        return await self._generate(
            request, decoded.stream, work, Responder(decoded, self.config.model_name, parsers=parsers)
        )

    async def completions(self, request: Request) -> Response:
        self._require_ready()
        decoded = openai.decode_completion(await self._json(request))
        model = self.engine.model
        prompt = completion_prompt(model, decoded)
        grammar = json_grammar(model, decoded) or decoded.grammar
        work = generation(model, decoded, n_ctx=self.config.n_ctx, prompt=prompt, grammar=grammar)
        echo = decoded.prompt if decoded.echo and isinstance(decoded.prompt, str) else ""
        return await self._generate(
            request, decoded.stream, work, Responder(decoded, self.config.model_name, echo=echo)
        )

    async def responses(self, request: Request) -> Response:
        self._require_ready()
        body = await self._json(request)
        # the media of the turns before (previous_response_id) stand under their own marker: this turn's join them
        before, carried = self.store.media(body.get("previous_response_id") if isinstance(body, dict) else None)
        raw, marker, images = await self._take_images(body, RESPONSES, marker=before or None, carried=carried)
        images = [*carried, *images]
        call = responses.decode(raw, self.store)
        if call.dropped:  # Codex's default web_search: left out, and said so (here and in a header)
            logs.event("hosted_tools_left_out", tools=list(call.dropped), route="/v1/responses")
        work, parsers = await self._chat_generation(call.request, marker, images)
        keep = partial(self.store.put, media=(marker, tuple(images))) if call.store else None
        encoder = responses.ResponsesEncoder(call, parsers[0], self.config.model_name, self._count_tokens, keep)
        response = await self._generate(request, call.request.stream, work, encoder)
        if call.dropped:
            response.headers["x-gguf-deploy-dropped-tools"] = ",".join(call.dropped)
        return response

    async def stored_response(self, request: Request) -> Response:
        response_id = request.path_params["id"]
        if request.method == "DELETE":
            if not self.store.delete(response_id):
                self.store.get(response_id)  # the 404
            return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})
        return JSONResponse(self.store.get(response_id)[0])

    async def messages(self, request: Request) -> Response:
        self._require_ready()
        raw, marker, images = await self._take_images(await self._json(request), MESSAGES)
        decoded = messages.decode(raw)
        work, parsers = await self._chat_generation(decoded, marker, images)
        tally_holder: list[Job] = []
        encoder = messages.MessagesEncoder(
            parsers[0], self.config.model_name, tuple(decoded.stop), _LazyTally(tally_holder)
        )
        return await self._generate(request, decoded.stream, work, encoder, tally_holder)

    async def count_tokens(self, request: Request) -> Response:
        self._require_ready()
        raw, marker, images = await self._take_images(await self._json(request), MESSAGES)
        rendered = self._render(messages.decode(raw, counting=True))
        model = self.engine.model
        if not images:
            return JSONResponse({"input_tokens": len(model.tokenize(rendered.prompt, add_special=rendered.add_bos))})
        media = await asyncio.to_thread(
            media_prompt, model, rendered.prompt, add_bos=rendered.add_bos, marker=marker, images=images
        )
        media.free()  # counted, never run
        return JSONResponse({"input_tokens": len(media.tokens)})

    async def tokenize(self, request: Request) -> Response:
        self._require_ready()
        body = await self._json(request)
        if not isinstance(body, dict) or not isinstance(body.get("content"), str):
            raise bad_request('the body must be {"content": "text"} (add_special, with_pieces: optional)', "content")
        for key in ("add_special", "with_pieces"):
            if not isinstance(body.get(key, False), bool):
                raise bad_request(f"{key} must be true or false", key)
        unknown = sorted(body.keys() - {"content", "add_special", "with_pieces", "model"})
        if unknown:
            raise bad_request(f"unknown field '{unknown[0]}'", unknown[0])
        model = self.engine.model
        tokens = model.tokenize(body["content"], add_special=body.get("add_special", False)) if body["content"] else []
        shown: list[Any] = list(tokens)
        if body.get("with_pieces"):
            shown = [{"id": t, "piece": model.piece(t).decode("utf-8", errors="replace")} for t in tokens]
        return JSONResponse({"tokens": shown, "count": len(tokens), "max_model_len": self.config.n_ctx})

    async def detokenize(self, request: Request) -> Response:
        self._require_ready()
        body = await self._json(request)
        tokens = body.get("tokens") if isinstance(body, dict) else None
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise bad_request('the body must be {"tokens": [token ids]}', "tokens")
        unknown = sorted(body.keys() - {"tokens", "model"})
        if unknown:
            raise bad_request(f"unknown field '{unknown[0]}'", unknown[0])
        model = self.engine.model
        bad = next((t for t in tokens if not 0 <= t < model.n_vocab), None)
        if bad is not None:
            raise bad_request(f"token id {bad} is outside the vocabulary (0..{model.n_vocab - 1})", "tokens")
        text = b"".join(model.piece(t) for t in tokens).decode("utf-8", errors="replace")
        return JSONResponse({"content": text})

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

    # -- chat: one rendering for every protocol

    async def _take_images(self, body: Any, shape: Shape, **carry: Any) -> tuple[Any, str, list[Media]]:
        """The body with its images and audio clips taken out (``media.take_request_images``), remote ones fetched first
        when the manifest turns them on (``deployer.runtime.media.fetch``)."""
        limits = limits_of(self.config, self.engine.model.projector)
        if limits.remote and limits.vision:
            body = await inline_remote_images(body, shape, limits)
        return take_request_images(body, limits, shape, **carry)

    def _render(self, decoded: GenerationRequest) -> Any:
        template = self.engine.chat_template
        if template is None:
            raise bad_request(
                "this model has no chat template: set [server] chat_format in its manifest, or use /v1/completions",
                "messages",
                "no_chat_template",
            )
        return template.render(
            decoded.messages,
            tools=decoded.tools or None,
            tool_choice=decoded.tool_choice,
            parallel_tool_calls=decoded.parallel_tool_calls,
            variables=decoded.template_kwargs or None,
            continue_final=decoded.continue_final,
        )

    async def _chat_generation(
        self, decoded: GenerationRequest, marker: str = "", images: list[Media] | None = None
    ) -> tuple[Generation, list[Any]]:
        """The engine's generation of a chat request, and a parser per choice. ``images`` (images and
        audio clips) stood where ``marker`` is in the messages (``media.take_images``)."""
        rendered = self._render(decoded)
        model = self.engine.model
        media = None
        if images:  # decoded and preprocessed off the event loop; encoded later, on the model thread
            media = await asyncio.to_thread(
                media_prompt, model, rendered.prompt, add_bos=rendered.add_bos, marker=marker, images=images
            )
            prompt = media.tokens
        else:
            prompt = model.tokenize(rendered.prompt, add_special=rendered.add_bos)
        grammar = rendered.grammar or json_grammar(model, decoded) or decoded.grammar
        work = generation(
            model, decoded, n_ctx=self.config.n_ctx, prompt=prompt, grammar=grammar, extra_stop=rendered.stop
        )
        if media is not None:
            work = replace(work, media=media)
        return work, [rendered.parser() for _ in range(decoded.n)]

    def _count_tokens(self, text: str) -> int:
        return len(self.engine.model.tokenize(text, add_special=False)) if text else 0

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

    async def _generate(
        self, request: Request, stream: bool, work: Generation, encoder: Any, jobs: list[Job] | None = None
    ) -> Response:
        log_of(request).stream = stream
        job = self.engine.submit(work)
        if jobs is not None:
            jobs.append(job)
        if stream:
            return await self._stream(request, job, encoder)
        return await self._result(request, job, encoder)

    async def _result(self, request: Request, job: Job, encoder: Any = None) -> Response:
        """The whole answer of ``job`` as one JSON response (an error, or a 503 when a shutdown cut it)."""
        log = log_of(request)
        errors = getattr(request.state, "errors", _openai_error)
        error: ApiError | None = None
        result: Any = None
        watch = _Watch(request.receive, job)
        try:
            while True:
                kind, value = await job.next()
                if kind == "pieces" and encoder is not None:
                    encoder.add(value)
                elif kind == "result":
                    result = value
                elif kind == "error":
                    error = api_error(value)
                elif kind == "end":
                    break
        finally:
            watch.stop()
        if watch.gone:
            return await self._abandoned(request, job)
        await job.done
        log.record(job)
        if error is not None:
            return _error_response(request, error, errors)
        if job.tally.cut or job.state == "cancelled":  # cancelled by a shutdown: never a truncated answer as a 200
            return _error_response(request, _stopping(), errors)
        return JSONResponse(result if encoder is None else encoder.result(job.tally))

    async def _stream(self, request: Request, job: Job, encoder: Any) -> Response:
        # the headers go as the job leaves the queue for a slot, while its prompt decodes (the first
        # token then goes straight out); a job that never ran (refused by a shutdown, or the engine
        # gone) is still a plain status
        watch = _Watch(request.receive, job)
        try:
            await job.admission()
            if job.started is not None and not watch.gone:  # the stream's from here: it stops the watch
                return _EventStream(job, encoder, log_of(request), watch)
            kind, value = await job.next()
        except BaseException:
            watch.stop()
            raise
        watch.stop()
        if watch.gone:
            return await self._abandoned(request, job)
        await job.done
        log_of(request).record(job)
        errors = getattr(request.state, "errors", _openai_error)
        return _error_response(request, api_error(value) if kind == "error" else _stopping(), errors)

    async def _abandoned(self, request: Request, job: Job) -> Response:
        job.cancel()
        if job.state != "cancelled":
            await job.done  # stops at the next token; its counts go in the log line
        log = log_of(request)
        log.record(job)
        log.status = CLIENT_CLOSED
        return Response(status_code=CLIENT_CLOSED)


class _LazyTally:
    """The tally of the job a request is about to submit (the Messages encoder reads it as the stream starts)."""

    def __init__(self, jobs: list[Job]) -> None:
        self._jobs = jobs

    def __getattr__(self, name: str) -> Any:
        return getattr(self._jobs[0].tally, name)


class _Watch:
    """The client's side of a request, from submission to the answer's end: one task that cancels the
    job as soon as the client disconnects (the job then ends at its next step, and whoever waits for
    its items gets its end)."""

    def __init__(self, receive: Receive, job: Job) -> None:
        self.gone = False
        self._job = job
        self._task = asyncio.ensure_future(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        self._job.cancel()

    def stop(self) -> None:
        self._task.cancel()


_SSE_HEADERS = ((b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"))


class _EventStream:
    """Server-sent events of a job, written by the protocol's encoder; cancels the job when the client goes away.

    An ASGI response of its own rather than Starlette's ``StreamingResponse``. When decoding is fast,
    the event loop's cost per streamed token bounds throughput, so a step's pieces are written as the
    engine's batch is read: the ticket's ``sink`` encodes them and calls the ASGI server's ``send``
    then and there (a call that completes at once unless the client is behind), with no task woken
    per token and no middleware between (only the response's start goes through them). What cannot
    be written at once (the end, an error, pieces behind a send still waiting for the client) queues,
    in order, for the stream's task. A :class:`_Watch` cancels the job when the client goes away.
    """

    def __init__(self, job: Job, encoder: Any, log: RequestLog, watch: _Watch) -> None:
        self.job, self.encoder, self.log, self.watch = job, encoder, log, watch
        self.headers: dict[str, str] = {}  # more response headers, as a Response's (set before it is sent)
        self._body: Send | None = None  # the server's send, for the body chunks
        self._busy = False  # the stream's task is sending: pieces queue behind it
        self._writing: asyncio.Future[None] | None = None  # a send the sink started that waits for the client
        self._failed: BaseException | None = None  # what the sink's send raised: the task raises it

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = self._body = scope.get(SERVER_SEND, send)
        complete = False
        try:
            extra = tuple(
                (key.lower().encode("latin-1"), value.encode("latin-1")) for key, value in self.headers.items()
            )
            await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS + extra})
            opening = self.encoder.events([])  # what the protocol sends before any token (none for OpenAI's)
            await body({"type": "http.response.body", "body": opening, "more_body": True})
            self.job.sink = self._sink
            await body({"type": "http.response.body", "body": await self._rest(body), "more_body": False})
            complete = not self.watch.gone
        finally:
            self.job.sink = None
            self.watch.stop()
            if self._writing is not None:
                self._writing.cancel()
            if not complete:
                self.job.cancel()
                self.log.status = CLIENT_CLOSED
            await asyncio.shield(self.job.done)
            self.log.record(self.job)

    def _sink(self, kind: str, value: Any) -> bool:
        """On the event loop, as the engine's batch is read: write pieces now; False leaves an item to the task."""
        if kind != "pieces" or self._busy or self._writing is not None or self._failed is not None:
            return False
        assert self._body is not None
        try:
            out = self.encoder.events(value)
            if not out:
                return True
            sending = self._body({"type": "http.response.body", "body": out, "more_body": True})
            try:
                waits_on = sending.send(None)
            except StopIteration:
                return True
            # the server waits for the client to read: the rest of this send runs on a task of its own,
            # and what comes next queues behind it
            self._writing = asyncio.ensure_future(_Resumed(sending, waits_on))
            return True
        except Exception as exc:  # raised where the stream's task can end the response with it
            self._failed = exc
            return False

    async def _rest(self, send: Send) -> bytes:
        """Send the job's events the sink left to the task; the last bytes (the stream's end) are returned."""
        failed = ended = False
        encoder, job = self.encoder, self.job
        while not ended:
            items = await job.take()
            if self._failed is not None:
                raise self._failed
            self._busy = True  # until these are sent, new pieces queue behind them
            if self._writing is not None:
                await self._writing
                self._writing = None
            out = b""  # what arrived since the last send goes in one write (a stream behind catches up)
            for kind, value in items:
                if kind == "pieces":
                    out += encoder.events(value)
                elif kind == "error":
                    error = api_error(value)
                    self.log.error = error.code or error.type
                    failed = True
                    out += encoder.error_event(error)
                elif kind == "end":
                    ended = True
            if out:
                await send({"type": "http.response.body", "body": out, "more_body": True})
            self._busy = False
        tail = b""
        if job.tally.cut:  # a shutdown cut it: say so, rather than end as if complete
            error = _stopping()
            self.log.error = error.code
            failed = True
            tail = encoder.error_event(error)
        if not failed or isinstance(encoder, Responder):  # OpenAI's chat streams still end with [DONE]
            tail += encoder.end(job.tally)
        return tail


class _Resumed:
    """The rest of a coroutine that was started by hand (``coroutine.send(None)``) and is waiting on
    ``waits_on``: an awaitable a task can run to its end."""

    def __init__(self, coroutine: Any, waits_on: Any) -> None:
        self.coroutine, self.waits_on = coroutine, waits_on

    def __await__(self) -> Any:
        waits_on = self.waits_on
        while True:
            try:
                yield waits_on
            except BaseException as exc:  # a cancellation: passed on to the coroutine
                try:
                    waits_on = self.coroutine.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    waits_on = self.coroutine.send(None)
                except StopIteration as stop:
                    return stop.value


class _Cors:
    """CORS for browser chat UIs (any origin: the key, not the origin, protects the API); a request
    without ``Origin`` (every SDK's) passes straight through, its ``send`` unwrapped."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.cors = CORSMiddleware(app, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not any(key == b"origin" for key, _ in scope["headers"]):
            await self.app(scope, receive, send)
        else:
            await self.cors(scope, receive, send)


# ## Errors


def _stopping() -> ApiError:
    return api_error(ShuttingDown())


def _too_large(cap: int) -> ApiError:
    return ApiError(413, f"the request body is larger than {cap:,} bytes", code="request_too_large")
