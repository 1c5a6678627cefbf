"""The gateway's HTTP side: an OpenAI-compatible Starlette app served by hypercorn on trio.

Routes::

    GET  /health                200 {"status": "ok", "model": ...} when ready, else 503
    GET  /v1/models             the one model this node serves
    GET  /v1/models/{id}        that model, or 404
    POST /v1/chat/completions   chat, streaming (SSE) or not
    POST /v1/completions        plain text completion, streaming or not
    GET  /metrics               Prometheus text format
    GET  /v1/swarm              the swarm map: every live record and per-block coverage
    GET  /                      the web UI (static/index.html)

How a generation request flows:

1. The body is read (at most 1 MiB, else 413) and decoded as JSON
   (``request_body.py``), then validated into a request model (``schemas.py``);
   anything wrong is a 400 in OpenAI's error body (``errors.py``).
2. The model name, readiness and sampling parameters are checked, the prompt is
   tokenized in a worker thread (chat templates can be slow), and the context window
   is checked: all of this *before* a byte of the response is sent, so every client
   mistake gets a proper status code.
3. A :class:`~shardmesh.api.streaming.GenerationResponse` runs ``generator.stream()``
   and sends either one JSON body or a stream of server-sent events, written by a
   format (``formats.py``). It watches for the client going away and then cancels the
   generation, so an abandoned request stops using the swarm.

Errors: client mistakes are :class:`~shardmesh.api.errors.ApiError` (4xx); a model
that cannot serve is a 503; anything unexpected is logged with its traceback and
answered with a 500, and the server keeps serving.

Around the routes sit two middlewares: request counting (``metrics.py``) and, when
configured, the API key (``auth.py``). :func:`serve` (``server.py``) runs the app.

Everything is trio (hypercorn's trio worker, ``trio.to_thread`` for tokenizing);
Starlette itself runs on anyio, which runs on trio.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

import trio
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route

from .auth import RequireApiKey
from .errors import ApiError, bad_request, error_body, internal_error, unavailable
from .formats import ChatFormat, CompletionFormat, Format
from .generate import Finished, GenerationRequest, Generator, PromptTooLong, TokenEvent
from .speculation import SpeculationStats
from ..contract import BadRequest, ModelUnavailable
from .metrics import CountRequests, Metrics
from .prompts import chat_prompt_ids, completion_prompt_ids
from .schemas import ChatCompletionRequest, CompletionRequest, check_request, generation_request, parse_request
from .request_body import read_json
from .response_json import now
from .server import serve
from .choices import Choices, choice_requests
from .streaming import GenerationResponse, closing
from .reasoning import template_kwargs, thinking_state
from .tool_calls import tool_plan_for

# ``serve`` is re-exported: node/run.py and tools/bench.py import both from here.
__all__ = ["create_app", "serve"]

log = logging.getLogger(__name__)

#: Served at ``/``.
INDEX_HTML = Path(__file__).parent / "static" / "index.html"


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


# What an endpoint returns: a Starlette response, or a GenerationResponse (any ASGI
# callable works as a response: Starlette just awaits ``response(scope, receive, send)``).
Reply = Response | GenerationResponse
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


# --------------------------------------------------------------------------- the app


class Gateway:
    """The endpoints, over one generator per model (the first is the default model of
    ``/health`` and ``/v1/swarm``) and one set of metrics. A request names its model;
    an unknown one is a 404 that lists those served. A gateway for whatever the swarm
    serves starts with none and adds each (:meth:`add`) as it finds it."""

    def __init__(self, generators: list[Generator], metrics: Metrics, swarm: Callable[[], dict] | None = None) -> None:
        if len({g.model_name for g in generators}) != len(generators):
            raise ValueError("a gateway serves each model once")
        self.generators = generators  # the list the metrics sum over: add() appends to it
        self.models = {g.model_name: g for g in generators}
        self.metrics = metrics
        self.swarm_view = swarm
        self.created = now()
        # Tokenizing (chat template + encode) runs in a worker thread, so a long prompt
        # does not stall the event loop; one prompt at a time, because that work holds
        # the GIL most of the way (Jinja, and the Python around the Rust encoder):
        # more threads would not finish a burst of requests sooner, only take more of
        # trio's shared thread pool. This is not exclusive use of the tokenizer: the
        # detokenizers (generate.py, text.py) decode on the event loop meanwhile. That
        # is safe because encoding and decoding only read the Rust tokenizer; what writes
        # to it (a change of truncation, padding or special-token splitting) never
        # happens here, where every call uses the same settings.
        self.tokenize_limiter = trio.CapacityLimiter(1)

    @property
    def generator(self) -> Generator | None:
        return self.generators[0] if self.generators else None

    def add(self, generator: Generator) -> None:
        """Serve one more model from now on."""
        if generator.model_name in self.models:
            raise ValueError(f"{generator.model_name} is served already")
        self.generators.append(generator)
        self.models[generator.model_name] = generator

    # ---- small endpoints

    async def swarm(self, request: Request) -> Response:
        """The live swarm map: every peer's signed record as this node sees it, and the
        routes of the answers this gateway is giving now."""
        name = self.generator.model_name if self.generator is not None else None
        body = {"model": name, "peers": [], "mesh": False} if self.swarm_view is None else self.swarm_view()
        return JSONResponse({**body, "answers": [a for g in self.models.values() for a in g.answers()]})

    async def health(self, request: Request) -> Response:
        ready = self.generator is not None and self.generator.ready()
        body = {"status": "ok" if ready else "unavailable", "model": self.generator.model_name if self.generator else None}
        if len(self.models) > 1:
            body["models"] = {name: g.ready() for name, g in self.models.items()}
        return JSONResponse(body, status_code=200 if ready else 503)

    def model_card(self, generator: Generator) -> dict[str, Any]:
        """OpenAI's model object, plus ``max_model_len`` (the context window, as vLLM names it)."""
        return {
            "id": generator.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "shardmesh",
            "max_model_len": generator.context_length,
        }

    async def list_models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self.model_card(g) for g in self.models.values()]})

    async def get_model(self, request: Request) -> Response:
        return JSONResponse(self.model_card(self.model(request.path_params["model_id"])))

    async def metrics_text(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def index(self, request: Request) -> Response:
        if not INDEX_HTML.is_file():
            raise ApiError(404, "this node has no web UI")
        return FileResponse(INDEX_HTML, media_type="text/html")

    # ---- checks

    def model(self, name: str) -> Generator:
        """The generator of model ``name``; a 404 naming those served."""
        if name not in self.models:
            available = ", ".join(f"'{m}'" for m in self.models)
            raise ApiError(404, f"The model '{name[:200]}' does not exist. Available models: {available}.", param="model",
                           code="model_not_found")  # fmt: skip
        return self.models[name]

    @staticmethod
    def check_ready(generator: Generator) -> None:
        """A 503 at once when no chain exists and none is coming; while nodes fill a gap
        in the swarm, the request is let in and waits (``ResumableChain``)."""
        if not generator.worth_waiting():
            raise unavailable("the model is not ready: it is loading, or no complete chain of nodes serves it yet")

    async def tokenize(self, generator: Generator, fn: Callable[..., list[int]], *args: Any) -> list[int]:
        return await trio.to_thread.run_sync(partial(fn, generator.tokenizer, *args), limiter=self.tokenize_limiter)

    # ---- generation endpoints

    async def chat_completions(self, request: Request) -> Reply:
        started = time.perf_counter()
        req = parse_request(ChatCompletionRequest, await read_json(request))
        gen = self.model(req.model)
        sampling = check_request(req, len(gen.tokenizer))
        tools = tool_plan_for(gen.tokenizer, req.tools, req.tool_choice, req.parallel_tool_calls)
        if tools is not None and tools.grammar is not None:
            if sampling.grammar is not None:
                raise bad_request("tool_choice 'required' or a named function cannot be combined with a response_format",
                                  param="tool_choice")
            sampling = replace(sampling, grammar=tools.grammar)
        variables = template_kwargs(req.chat_template_kwargs)
        self.check_ready(gen)
        offered = tools.tools if tools is not None else None
        prompt_ids = await self.tokenize(gen, chat_prompt_ids, req.messages, offered, variables)
        gen_req = generation_request(req, prompt_ids, gen.context_length, sampling)
        thinking = thinking_state(gen.tokenizer, offered, prompt_ids)
        fmts = [ChatFormat(model=gen.model_name, tokenizer=gen.tokenizer, logprobs=bool(req.logprobs),
                           include_usage=req.include_usage, tools=tools.format if tools is not None else None,
                           thinking=thinking) for _ in range(req.n or 1)]  # fmt: skip
        return self.response(gen, gen_req, fmts, started, req.streaming)

    async def completions(self, request: Request) -> Reply:
        started = time.perf_counter()
        req = parse_request(CompletionRequest, await read_json(request))
        gen = self.model(req.model)
        sampling = check_request(req, len(gen.tokenizer))
        self.check_ready(gen)
        prompt_ids = await self.tokenize(gen, completion_prompt_ids, req.prompt, len(gen.tokenizer))
        gen_req = generation_request(req, prompt_ids, gen.context_length, sampling)
        fmts = [CompletionFormat(model=gen.model_name, tokenizer=gen.tokenizer,
                                 logprobs=req.logprobs is not None, include_usage=req.include_usage) for _ in range(req.n or 1)]  # fmt: skip
        return self.response(gen, gen_req, fmts, started, req.streaming)

    def response(
        self, gen: Generator, request: GenerationRequest, fmts: list[Format], started: float, stream: bool,
    ) -> GenerationResponse:
        """The response of a request's choices, one per format (choices.py): with several,
        the prompt is prefilled once first, and each choice reuses it."""
        requests = choice_requests(request, len(fmts))
        before = partial(gen.prefill, request.prompt_ids) if len(fmts) > 1 else None
        return GenerationResponse([partial(self.events, gen, r, started) for r in requests], Choices(fmts), stream=stream,
                                  before=before)

    async def events(self, gen: Generator, request: GenerationRequest, started: float) -> AsyncIterator[TokenEvent | Finished]:
        """``generator.stream()`` with its errors mapped to ApiError and metrics recorded."""
        first: float | None = None
        try:
            async with closing(gen.stream(request)) as events:
                async for event in events:
                    if isinstance(event, TokenEvent):
                        if first is None:
                            first = time.perf_counter()
                            self.metrics.time_to_first_token.observe(first - started)
                        self.metrics.generated_tokens.inc()
                    else:
                        self.metrics.finished(event, started, first)
                    yield event
        except ModelUnavailable as exc:
            raise unavailable(str(exc) or "the model is unavailable") from None
        except PromptTooLong as exc:
            raise ApiError(400, str(exc) or "the prompt is too long", code="context_length_exceeded") from None
        except BadRequest as exc:
            # The last hop (or this node's own sampler) cannot sample with these
            # parameters: the request's fault, so a 400, and no peer was blamed for it.
            raise bad_request(exc.message or "the sampling parameters cannot be sampled", code="bad_sampling_parameters") from None


def _generations(gens: Sequence[Generator]) -> tuple[int, int, int, float]:
    """Generations running and waiting, failovers and their pause, over every model."""
    return (sum(g.active for g in gens), sum(g.waiting for g in gens), sum(g.failovers for g in gens),
            sum(g.failover_pause for g in gens))


def create_app(
    generator: Generator | Sequence[Generator], *, api_key: str | None = None, swarm: Callable[[], dict] | None = None,
    stage_counts: Callable[[], tuple[int, int]] | None = None, links_taken: Callable[[], int] | None = None,
    trunk_counts: Callable[[], tuple[int, int, int, int]] | None = None, cors_origins: tuple[str, ...] = (),
    prefix_counts: Callable[[], tuple[int, int]] | None = None, collectors: Sequence[Any] = (),
) -> Starlette:
    """The gateway app for ``generator`` (or several, one per model: requests name
    theirs; the metrics count them all). With ``api_key``, /v1 and /metrics need it.
    ``swarm`` returns the swarm map for ``GET /v1/swarm``; ``stage_counts`` the steps and
    batches of the node's blocks for ``/metrics`` (:class:`~.metrics.StageCounters`);
    ``links_taken`` how many session hops moved to hop links; ``prefix_counts`` the tokens
    its blocks took from their prefix cache and the bytes it holds; ``collectors`` the node's
    own figures (node/node_metrics.py); ``trunk_counts`` the frames
    and steps this node's trunks brought in (:class:`~.metrics.TrunkCounters`). ``cors_origins``: web
    pages of these origins may call the API from a browser (``--cors-origin``; none by
    default, so a page elsewhere cannot use a gateway on the user's machine)."""
    gens = list(generator) if isinstance(generator, Sequence) else [generator]  # may start empty: Gateway.add
    metrics = Metrics(stage_counts, links_taken, speculation=lambda: SpeculationStats.sum(g.speculation for g in gens),
                      trunk_counts=trunk_counts, prefix_counts=prefix_counts, cached_tokens=lambda: sum(g.cached_tokens for g in gens),
                      collectors=collectors, generations=lambda: _generations(gens))
    gateway = Gateway(gens, metrics, swarm)
    routes: list[BaseRoute] = [
        Route("/health", guarded(gateway.health), methods=["GET"]),
        Route("/v1/models", guarded(gateway.list_models), methods=["GET"]),
        # ":path" because hub model ids hold a slash (Qwen/Qwen3-0.6B).
        Route("/v1/models/{model_id:path}", guarded(gateway.get_model), methods=["GET"]),
        Route("/v1/chat/completions", guarded(gateway.chat_completions), methods=["POST"]),
        Route("/v1/completions", guarded(gateway.completions), methods=["POST"]),
        Route("/v1/swarm", guarded(gateway.swarm), methods=["GET"]),
        Route("/metrics", guarded(gateway.metrics_text), methods=["GET"]),
        Route("/", guarded(gateway.index), methods=["GET"]),
    ]
    # First listed = outermost: count every response, 401s included.
    middleware = [Middleware(CountRequests, metrics=gateway.metrics, routes=routes)]
    if cors_origins:
        # Before the key check: a browser's preflight carries no Authorization header.
        middleware.append(Middleware(
            CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"], max_age=600,
        ))
    if api_key is not None:
        middleware.append(Middleware(RequireApiKey, api_key=api_key))
    app = Starlette(routes=routes, middleware=middleware, exception_handlers={HTTPException: http_exception})
    app.state.gateway = gateway
    return app
