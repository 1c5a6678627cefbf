"""The gateway's HTTP side: an OpenAI-compatible Starlette app served by hypercorn on trio.

Routes::

    GET  /health                200 {"status": "ok", "model": ...} when ready, else 503
    GET  /v1/models             the one model this node serves
    GET  /v1/models/{id}        that model, or 404
    POST /v1/chat/completions   chat, streaming (SSE) or not
    POST /v1/completions        plain text completion, streaming or not
    GET  /metrics               Prometheus text format
    GET  /                      the web UI (static/index.html)

How a generation request flows:

1. The body is read (at most 1 MiB, else 413), decoded as JSON and validated into a
   request model (``openai.py``); anything wrong is a 400 in OpenAI's error body.
2. The model name, readiness and sampling parameters are checked, the prompt is
   tokenized in a worker thread (chat templates can be slow), and the context window
   is checked: all of this *before* a byte of the response is sent, so every client
   mistake gets a proper status code.
3. A :class:`GenerationResponse` runs ``generator.stream()`` and sends either one JSON
   body or a stream of server-sent events. It watches for the client going away and
   then cancels the generation, so an abandoned request stops using the swarm.

Errors: client mistakes are :class:`~shardmesh.api.openai.ApiError` (4xx); a model
that cannot serve is a 503; anything unexpected is logged with its traceback and
answered with a 500, and the server keeps serving. Once a stream has started the
status code cannot change, so a failure mid-stream is sent as a last event
``data: {"error": {...}}`` followed by ``data: [DONE]``.

Everything is trio (hypercorn's trio worker, ``trio.to_thread`` for tokenizing);
Starlette itself runs on anyio, which runs on trio.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import socket
import time
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Union

import hypercorn.config
import hypercorn.trio
import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shardmesh.api.generate import Finished, GenerationRequest, Generator, ModelUnavailable, PromptTooLong, TokenEvent
from shardmesh.api.openai import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    chat_chunk,
    chat_completion,
    chat_logprob_entry,
    chat_prompt_ids,
    check_request,
    completion_logprobs,
    completion_prompt_ids,
    error_body,
    generation_request,
    new_id,
    now,
    parse_request,
    text_completion,
    usage_chunk,
)

__all__ = ["MAX_BODY_BYTES", "create_app", "serve"]

log = logging.getLogger(__name__)

#: Largest request body accepted; larger ones get a 413 without being parsed.
MAX_BODY_BYTES = 1 << 20
#: Time given to a generation to clean up (close its chain) after its client left.
CLOSE_GRACE_SECONDS = 5.0
#: Served at ``/``.
INDEX_HTML = Path(__file__).parent / "static" / "index.html"

# Label values for the request counter are kept to a fixed set, so a client sending
# random paths or methods cannot make the metrics grow without bound.
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


# --------------------------------------------------------------------------- metrics


class Metrics:
    """The gateway's Prometheus metrics, in a registry of its own.

    A private :class:`CollectorRegistry` per app (rather than the process-global one)
    lets several apps live in one process, as tests do, without name clashes.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "shardmesh_http_requests",
            "HTTP requests answered, by route template, method and status code.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "shardmesh_prompt_tokens", "Prompt tokens of finished generations.", registry=self.registry
        )
        self.generated_tokens = Counter(
            "shardmesh_generated_tokens", "Tokens generated (streamed or not).", registry=self.registry
        )
        self.time_to_first_token = Histogram(
            "shardmesh_time_to_first_token_seconds",
            "From receiving a generation request to its first generated token.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
            registry=self.registry,
        )

    def render(self) -> bytes:
        """Everything in the Prometheus text exposition format."""
        return generate_latest(self.registry)


class CountRequests:
    """ASGI middleware: count every HTTP response by route template, method and status.

    The route label is the matching route's template (``/v1/models/{model_id:path}``),
    or ``unmatched``: never the raw path, which a client controls.
    """

    def __init__(self, app: ASGIApp, *, metrics: Metrics, routes: list[BaseRoute]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the client gets if the app fails before starting a response

        async def send_and_note_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            method = scope["method"] if scope["method"] in _KNOWN_METHODS else "other"
            self.metrics.requests.labels(route=route_label(self.routes, scope), method=method, status=str(status)).inc()


def route_label(routes: list[BaseRoute], scope: Scope) -> str:
    """The template of the route that serves this path (any method), or ``unmatched``."""
    for route in routes:
        match, _ = route.matches(scope)
        if match is not Match.NONE:
            return getattr(route, "path", "unmatched")
    return "unmatched"


# --------------------------------------------------------------------------- auth


class RequireApiKey:
    """ASGI middleware: ``Authorization: Bearer <key>`` on ``/v1/*`` and ``/metrics``.

    ``/health`` and the web UI stay open (load balancers and browsers fetch them
    without credentials; the UI asks for the key itself). The comparison runs in
    constant time so the key cannot be guessed byte by byte from response timings.
    """

    def __init__(self, app: ASGIApp, *, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and is_protected(scope["path"]) and not self.authorized(scope):
            error = ApiError(
                401,
                "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.",
                type="invalid_request_error",
                code="invalid_api_key",
            )
            response = JSONResponse(error.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def authorized(self, scope: Scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                # The scheme is case-insensitive ("bearer" works too); the key is not.
                scheme, _, key = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(b"Bearer " + key.strip(), self.expected)
        return False


def is_protected(path: str) -> bool:
    """Paths that need the API key when one is configured."""
    return path == "/metrics" or path == "/v1" or path.startswith("/v1/")


# --------------------------------------------------------------------------- helpers


async def read_json(request: Request) -> Any:
    """The request body decoded as JSON, or an ApiError (413 too large, 400 malformed).

    The size limit is checked against ``Content-Length`` before reading and again
    while reading (a chunked body has no length), so no more than ``MAX_BODY_BYTES``
    is ever held. ``NaN``/``Infinity`` (which Python's json accepts but JSON does not)
    and lone UTF-16 surrogates (which no tokenizer can encode) are refused here.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _too_large()
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise _too_large()
    if not body.strip():
        raise ApiError(400, "the request body is empty; expected a JSON object")
    try:
        value = json.loads(bytes(body), parse_constant=_reject_constant)
    except RecursionError:
        raise ApiError(400, "invalid JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ApiError(400, f"invalid JSON: {exc}") from None
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, "the request holds a string that is not valid Unicode (a lone surrogate)") from None
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _too_large() -> ApiError:
    # The rest of the body is never read, so the connection cannot carry another
    # request: "Connection: close" tells the client (and h11) not to reuse it.
    return ApiError(
        413,
        f"the request body is larger than {MAX_BODY_BYTES} bytes",
        code="request_too_large",
        headers={"Connection": "close"},
    )


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def internal_error() -> ApiError:
    return ApiError(500, "internal server error (the gateway logged the details)", type="server_error", code="internal_error")


# What an endpoint returns: a Starlette response, or a GenerationResponse (any ASGI
# callable works as a response: Starlette just awaits ``response(scope, receive, send)``).
Reply = Union[Response, "GenerationResponse"]
Endpoint = Callable[[Request], Awaitable[Reply]]


def guarded(endpoint: Endpoint) -> Endpoint:
    """Wrap an endpoint so that it always returns a response and never raises.

    ApiError becomes its OpenAI error body; a client that hangs up while sending the
    body gets nothing (no one is listening); anything else is a bug or an outage:
    logged with its traceback, answered with a 500.
    """

    async def run(request: Request) -> Reply:
        try:
            return await endpoint(request)
        except ApiError as exc:
            return error_response(exc)
        except ClientDisconnect:
            return Response(status_code=400)
        except Exception:
            log.exception("unexpected error in %s %s", request.method, request.url.path)
            return error_response(internal_error())

    return run


async def http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 (unknown route) and 405 (wrong method), in OpenAI's format."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"Invalid URL ({request.method} {request.url.path})"
    else:
        message = f"{exc.detail} ({request.method} {request.url.path})"
    return JSONResponse(error_body(message), status_code=exc.status_code, headers=exc.headers)


@asynccontextmanager
async def closing(events: Any) -> AsyncIterator[Any]:
    """Like ``contextlib.aclosing``, but the close survives cancellation.

    When a client disconnects we cancel the request; the generation still needs a
    moment to close its chain of nodes, so its ``aclose()`` runs shielded, for at
    most ``CLOSE_GRACE_SECONDS``.
    """
    try:
        yield events
    finally:
        with trio.move_on_after(CLOSE_GRACE_SECONDS, shield=True):
            await events.aclose()


async def cancel_on_disconnect(receive: Receive, cancel_scope: trio.CancelScope) -> None:
    """Wait for the client to hang up, then cancel ``cancel_scope``.

    Called once the request body has been read, so the next ASGI message can only be
    ``http.disconnect``.
    """
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            cancel_scope.cancel()
            return


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event: ``data: <json>`` and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def finite(logprob: float) -> float:
    """JSON has no -inf: the logprob of an impossible (masked) token is sent as -9999."""
    return logprob if math.isfinite(logprob) else -9999.0


# --------------------------------------------------------------------------- formats


class ChatFormat:
    """How ``/v1/chat/completions`` writes a generation: whole or as chunks."""

    object = "chat.completion.chunk"

    def __init__(self, *, model: str, tokenizer: Any, logprobs: bool, include_usage: bool) -> None:
        self.id = new_id("chatcmpl")
        self.created = now()
        self.model = model
        self.tokenizer = tokenizer
        self.logprobs = logprobs
        self.include_usage = include_usage
        self.content: list[str] = []
        self.entries: list[dict[str, Any]] = []

    def _chunk(self, delta: dict[str, Any], *, finish_reason: str | None = None, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        return chat_chunk(
            id=self.id,
            created=self.created,
            model=self.model,
            delta=delta,
            finish_reason=finish_reason,
            logprobs=logprobs,
            include_usage=self.include_usage,
        )

    def prelude(self) -> list[dict[str, Any]]:
        """The first chunk names the speaker, as OpenAI's does."""
        return [self._chunk({"role": "assistant", "content": ""})]

    def on_token(self, event: TokenEvent) -> dict[str, Any] | None:
        """Record one token; return its chunk, or None when there is nothing to send."""
        self.content.append(event.text)
        entry = None
        if self.logprobs and event.logprob is not None:
            entry = chat_logprob_entry(self.tokenizer.decode([event.token_id]), _finite_event(event))
            self.entries.append(entry)
        if not event.text and entry is None:
            return None
        return self._chunk({"content": event.text}, logprobs=None if entry is None else [entry])

    def on_finish(self, done: Finished) -> dict[str, Any]:
        self.content.append(done.text)
        return self._chunk({"content": done.text} if done.text else {}, finish_reason=done.reason)

    def usage_chunk(self, done: Finished) -> dict[str, Any]:
        return usage_chunk(
            id=self.id,
            created=self.created,
            model=self.model,
            object=self.object,
            prompt_tokens=done.prompt_tokens,
            completion_tokens=done.completion_tokens,
        )

    def whole(self, done: Finished) -> dict[str, Any]:
        """The non-streaming body, after every event went through on_token/on_finish."""
        return chat_completion(
            id=self.id,
            created=self.created,
            model=self.model,
            content="".join(self.content),
            finish_reason=done.reason,
            prompt_tokens=done.prompt_tokens,
            completion_tokens=done.completion_tokens,
            logprobs=self.entries if self.logprobs else None,
        )


class CompletionFormat:
    """How ``/v1/completions`` writes a generation: whole or as chunks."""

    object = "text_completion"

    def __init__(self, *, model: str, tokenizer: Any, logprobs: bool, include_usage: bool) -> None:
        self.id = new_id("cmpl")
        self.created = now()
        self.model = model
        self.tokenizer = tokenizer
        self.logprobs = logprobs
        self.include_usage = include_usage
        self.text: list[str] = []
        self.offset = 0  # characters of completion text released so far
        self.entries: list[tuple[str, TokenEvent, int]] = []

    def _chunk(self, text: str, *, finish_reason: str | None = None, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        return text_completion(
            id=self.id,
            created=self.created,
            model=self.model,
            text=text,
            finish_reason=finish_reason,
            logprobs=logprobs,
            include_usage=self.include_usage,
        )

    def prelude(self) -> list[dict[str, Any]]:
        return []

    def on_token(self, event: TokenEvent) -> dict[str, Any] | None:
        entry = None
        if self.logprobs and event.logprob is not None:
            entry = (self.tokenizer.decode([event.token_id]), _finite_event(event), self.offset)
            self.entries.append(entry)
        self.text.append(event.text)
        self.offset += len(event.text)
        if not event.text and entry is None:
            return None
        return self._chunk(event.text, logprobs=None if entry is None else completion_logprobs([entry]))

    def on_finish(self, done: Finished) -> dict[str, Any]:
        self.text.append(done.text)
        return self._chunk(done.text, finish_reason=done.reason)

    def usage_chunk(self, done: Finished) -> dict[str, Any]:
        return usage_chunk(
            id=self.id,
            created=self.created,
            model=self.model,
            object=self.object,
            prompt_tokens=done.prompt_tokens,
            completion_tokens=done.completion_tokens,
        )

    def whole(self, done: Finished) -> dict[str, Any]:
        return text_completion(
            id=self.id,
            created=self.created,
            model=self.model,
            text="".join(self.text),
            finish_reason=done.reason,
            logprobs=completion_logprobs(self.entries) if self.logprobs else None,
            prompt_tokens=done.prompt_tokens,
            completion_tokens=done.completion_tokens,
        )


Format = ChatFormat | CompletionFormat


def _finite_event(event: TokenEvent) -> TokenEvent:
    """The event with infinite logprobs made finite (see :func:`finite`)."""
    return TokenEvent(
        token_id=event.token_id,
        text=event.text,
        logprob=None if event.logprob is None else finite(event.logprob),
        top_logprobs=tuple((token, finite(lp)) for token, lp in event.top_logprobs),
    )


# --------------------------------------------------------------------------- generation


class GenerationResponse:
    """An ASGI response that runs one generation and sends it, whole or streamed.

    The generator's async iterator is created, consumed and closed in this one task
    (never handed between tasks), inside a nursery that also watches for the client
    disconnecting. The first event is awaited *before* the status line goes out, so
    errors the generator raises up front (model unavailable, prompt too long) still
    get their own status code when streaming.
    """

    def __init__(self, gateway: Gateway, request: GenerationRequest, fmt: Format, *, stream: bool, started: float) -> None:
        self.gateway = gateway
        self.request = request
        self.fmt = fmt
        self.stream = stream
        self.started = started

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancel_on_disconnect, receive, nursery.cancel_scope)
            if self.stream:
                await self.send_stream(send)
            else:
                await self.send_whole(send)
            nursery.cancel_scope.cancel()

    async def send_whole(self, send: Send) -> None:
        try:
            async with closing(self.gateway.events(self.request, self.started)) as events:
                async for event in events:
                    if isinstance(event, Finished):
                        self.fmt.on_finish(event)
                        body = self.fmt.whole(event)
                        break
                    self.fmt.on_token(event)
                else:
                    raise RuntimeError("the generator ended without a Finished event")
        except ApiError as exc:
            await send_json(send, exc.status, exc.body())
            return
        except Exception:
            log.exception("generation failed")
            await send_json(send, 500, internal_error().body())
            return
        await send_json(send, 200, body)

    async def send_stream(self, send: Send) -> None:
        async with closing(self.gateway.events(self.request, self.started)) as events:
            try:
                first = await anext(events)
            except ApiError as exc:
                await send_json(send, exc.status, exc.body())
                return
            except Exception:  # StopAsyncIteration included: a generator must end with Finished
                log.exception("generation failed before its first event")
                await send_json(send, 500, internal_error().body())
                return

            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"text/event-stream; charset=utf-8"),
                        (b"cache-control", b"no-cache"),
                        (b"x-accel-buffering", b"no"),  # tell nginx-like proxies not to buffer
                    ],
                }
            )

            async def emit(chunk: dict[str, Any] | str) -> None:
                await send({"type": "http.response.body", "body": sse(chunk), "more_body": True})

            try:
                for chunk in self.fmt.prelude():
                    await emit(chunk)
                event: TokenEvent | Finished = first
                while not isinstance(event, Finished):
                    chunk = self.fmt.on_token(event)
                    if chunk is not None:
                        await emit(chunk)
                    event = await anext(events)
                await emit(self.fmt.on_finish(event))
                if self.fmt.include_usage:
                    await emit(self.fmt.usage_chunk(event))
            except ApiError as exc:
                log.warning("generation failed mid-stream: %s", exc.message)
                await emit(exc.body())
            except Exception:  # StopAsyncIteration included
                log.exception("generation failed mid-stream")
                await emit(internal_error().body())
            await emit("[DONE]")
            await send({"type": "http.response.body", "body": b"", "more_body": False})


async def send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    """A whole JSON response through raw ASGI ``send``."""
    data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": data, "more_body": False})


# --------------------------------------------------------------------------- the app


class Gateway:
    """The endpoints, sharing one generator and one set of metrics."""

    def __init__(self, generator: Generator, metrics: Metrics) -> None:
        self.generator = generator
        self.metrics = metrics
        self.created = now()
        # Tokenizing (and chat templates) run in worker threads; one at a time, because
        # a tokenizer object is not documented as safe to share between threads.
        self.tokenizer_lock = trio.CapacityLimiter(1)

    # ---- small endpoints

    async def health(self, request: Request) -> Response:
        ready = self.generator.ready()
        body = {"status": "ok" if ready else "unavailable", "model": self.generator.model_name}
        return JSONResponse(body, status_code=200 if ready else 503)

    def model_card(self) -> dict[str, Any]:
        """OpenAI's model object, plus ``max_model_len`` (the context window, as vLLM names it)."""
        return {
            "id": self.generator.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "shardmesh",
            "max_model_len": self.generator.context_length,
        }

    async def list_models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def get_model(self, request: Request) -> Response:
        self.check_model(request.path_params["model_id"])
        return JSONResponse(self.model_card())

    async def metrics_text(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def index(self, request: Request) -> Response:
        if not INDEX_HTML.is_file():
            raise ApiError(404, "this node has no web UI")
        return FileResponse(INDEX_HTML, media_type="text/html")

    # ---- checks

    def check_model(self, name: str) -> None:
        if name != self.generator.model_name:
            raise ApiError(
                404,
                f"The model '{name}' does not exist. Available models: '{self.generator.model_name}'.",
                param="model",
                code="model_not_found",
            )

    def check_ready(self) -> None:
        if not self.generator.ready():
            raise unavailable("the model is not ready: it is loading, or no complete chain of nodes serves it yet")

    async def tokenize(self, fn: Callable[..., list[int]], *args: Any) -> list[int]:
        return await trio.to_thread.run_sync(partial(fn, self.generator.tokenizer, *args), limiter=self.tokenizer_lock)

    # ---- generation endpoints

    async def chat_completions(self, request: Request) -> Reply:
        started = time.perf_counter()
        req = parse_request(ChatCompletionRequest, await read_json(request))
        self.check_model(req.model)
        sampling = check_request(req)
        self.check_ready()
        prompt_ids = await self.tokenize(chat_prompt_ids, req.messages)
        gen_req = generation_request(req, prompt_ids, self.generator.context_length, sampling)
        fmt = ChatFormat(
            model=self.generator.model_name,
            tokenizer=self.generator.tokenizer,
            logprobs=bool(req.logprobs),
            include_usage=req.include_usage,
        )
        return GenerationResponse(self, gen_req, fmt, stream=req.streaming, started=started)

    async def completions(self, request: Request) -> Reply:
        started = time.perf_counter()
        req = parse_request(CompletionRequest, await read_json(request))
        self.check_model(req.model)
        sampling = check_request(req)
        self.check_ready()
        prompt_ids = await self.tokenize(completion_prompt_ids, req.prompt, len(self.generator.tokenizer))
        gen_req = generation_request(req, prompt_ids, self.generator.context_length, sampling)
        fmt = CompletionFormat(
            model=self.generator.model_name,
            tokenizer=self.generator.tokenizer,
            logprobs=req.logprobs is not None,
            include_usage=req.include_usage,
        )
        return GenerationResponse(self, gen_req, fmt, stream=req.streaming, started=started)

    async def events(self, request: GenerationRequest, started: float) -> AsyncIterator[TokenEvent | Finished]:
        """``generator.stream()`` with its errors mapped to ApiError and metrics recorded."""
        first = True
        try:
            async with closing(self.generator.stream(request)) as events:
                async for event in events:
                    if isinstance(event, TokenEvent):
                        if first:
                            self.metrics.time_to_first_token.observe(time.perf_counter() - started)
                            first = False
                        self.metrics.generated_tokens.inc()
                    else:
                        self.metrics.prompt_tokens.inc(event.prompt_tokens)
                    yield event
        except ModelUnavailable as exc:
            raise unavailable(str(exc) or "the model is unavailable") from None
        except PromptTooLong as exc:
            raise ApiError(400, str(exc) or "the prompt is too long", code="context_length_exceeded") from None


def unavailable(message: str) -> ApiError:
    return ApiError(503, message, type="server_error", code="model_unavailable")


def create_app(generator: Generator, *, api_key: str | None = None) -> Starlette:
    """The gateway app for ``generator``. With ``api_key``, /v1 and /metrics need it."""
    gateway = Gateway(generator, Metrics())
    routes: list[BaseRoute] = [
        Route("/health", guarded(gateway.health), methods=["GET"]),
        Route("/v1/models", guarded(gateway.list_models), methods=["GET"]),
        # ":path" because hub model ids hold a slash (Qwen/Qwen3-0.6B).
        Route("/v1/models/{model_id:path}", guarded(gateway.get_model), methods=["GET"]),
        Route("/v1/chat/completions", guarded(gateway.chat_completions), methods=["POST"]),
        Route("/v1/completions", guarded(gateway.completions), methods=["POST"]),
        Route("/metrics", guarded(gateway.metrics_text), methods=["GET"]),
        Route("/", guarded(gateway.index), methods=["GET"]),
    ]
    # First listed = outermost: count every response, 401s included.
    middleware = [Middleware(CountRequests, metrics=gateway.metrics, routes=routes)]
    if api_key is not None:
        middleware.append(Middleware(RequireApiKey, api_key=api_key))
    app = Starlette(routes=routes, middleware=middleware, exception_handlers={HTTPException: http_exception})
    app.state.gateway = gateway
    return app


# --------------------------------------------------------------------------- serving


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` and listening; port 0 picks a free port.

    Binding here, rather than letting hypercorn do it, means a busy port fails with a
    plain ``OSError`` from :func:`serve` (not one buried in nested exception groups),
    and the bound port is known before the server starts.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host.strip("[]"), port), family=family)


async def serve(app: ASGIApp, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``app`` over HTTP with hypercorn's trio worker until cancelled.

    Use it from the node's nursery: ``port = await nursery.start(serve, app, host, 0)``
    returns once requests are being accepted, with the port actually bound (so port 0
    works and the caller can print the URL).
    """
    sock = listening_socket(host, port)
    bound_port = sock.getsockname()[1]
    config = hypercorn.config.Config()
    # hypercorn adopts an open socket through an "fd://" bind. detach() hands the file
    # descriptor over, so exactly one socket object owns (and finally closes) it.
    config.bind = [f"fd://{sock.detach()}"]
    config.accesslog = None  # requests are counted in /metrics; no per-request log lines
    config.errorlog = logging.getLogger("hypercorn.error")  # the node's logging setup decides
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(hypercorn.trio.serve, app, config))
        task_status.started(bound_port)
