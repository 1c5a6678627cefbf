"""What the gateway counts, and the middleware that counts every HTTP response.

``/metrics`` serves these in Prometheus' text format. The generation counters and the
time-to-first-token histogram are fed by the gateway as tokens arrive; requests are
counted by :class:`CountRequests`, wrapped around the whole app. A node that serves
blocks also reports how its stage batches (:class:`StageCounters`): steps over batches
is the batch size its compute actually sees, the figure that decides how concurrent
sessions share it.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .speculation import SpeculationStats

# Label values for the request counter are kept to a fixed set, so a client sending
# random paths or methods cannot make the metrics grow without bound.
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class Metrics:
    """The gateway's Prometheus metrics, in a registry of its own.

    A private :class:`CollectorRegistry` per app (rather than the process-global one)
    lets several apps live in one process, as tests do, without name clashes.
    """

    def __init__(self, stage_counts: Callable[[], tuple[int, int]] | None = None,
                 links_taken: Callable[[], int] | None = None,
                 speculation: Callable[[], SpeculationStats] | None = None,
                 trunk_counts: Callable[[], tuple[int, int, int, int]] | None = None,
                 prefix_counts: Callable[[], tuple[int, int]] | None = None,
                 cached_tokens: Callable[[], int] | None = None,
                 generations: Callable[[], tuple[int, int, int, float]] | None = None,
                 collectors: Sequence[Any] = ()) -> None:
        self.registry = CollectorRegistry()
        for collector in collectors:  # the node's own figures (node/node_metrics.py)
            self.registry.register(collector)
        if generations is not None:
            self.registry.register(GenerationGauges(generations))
        if speculation is not None:
            self.registry.register(SpeculationCounters(speculation))
        if stage_counts is not None:
            self.registry.register(StageCounters(stage_counts))
        if links_taken is not None:
            self.registry.register(LinkCounter(links_taken))
        if trunk_counts is not None:
            self.registry.register(TrunkCounters(trunk_counts))
        if prefix_counts is not None or cached_tokens is not None:
            self.registry.register(PrefixCounters(prefix_counts, cached_tokens))
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
        self.time_per_output_token = Histogram(
            "shardmesh_time_per_output_token_seconds",
            "A generation's time from its first token to its last, over the tokens after the first.",
            buckets=(0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5),
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "shardmesh_request_seconds",
            "From receiving a generation request to its last token.",
            buckets=(0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0),
            registry=self.registry,
        )

    def finished(self, done: Any, started: float, first: float | None) -> None:
        """A generation ended (``done``: its :class:`~.generate.Finished`): its prompt, its
        whole time, and its time per token after the first."""
        now = time.perf_counter()
        self.prompt_tokens.inc(done.prompt_tokens)
        self.request_seconds.observe(now - started)
        if first is not None and done.completion_tokens > 1:
            self.time_per_output_token.observe((now - first) / (done.completion_tokens - 1))

    def render(self) -> bytes:
        """Everything in the Prometheus text exposition format."""
        return generate_latest(self.registry)


class GenerationGauges:
    """The gateway's generations now and their failovers since start, from
    ``(running, waiting for their first token, failovers, seconds paused by them)``."""

    def __init__(self, counts: Callable[[], tuple[int, int, int, float]]) -> None:
        self.counts = counts

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        running, waiting, failovers, paused = self.counts()
        yield GaugeMetricFamily("shardmesh_requests_running", "Generations this gateway runs now.", value=running)
        yield GaugeMetricFamily("shardmesh_requests_waiting", "Of those, the ones still waiting for their first token.", value=waiting)
        yield CounterMetricFamily("shardmesh_failovers", "Chains replaced mid-generation (a hop failed; the answer went on).",
                                  value=failovers)
        yield CounterMetricFamily("shardmesh_failover_pause_seconds", "Seconds generations paused while their chain was replaced.",
                                  value=paused)


class StageCounters:
    """A collector read at scrape time: ``counts()`` gives the steps this node's blocks
    have run (prefills and decode steps, of every session) and the batches they ran in.
    Both restart from 0 when the node loads other blocks (Prometheus reads a counter
    that goes down as a restart)."""

    def __init__(self, counts: Callable[[], tuple[int, int]]) -> None:
        self.counts = counts

    def collect(self) -> Iterator[CounterMetricFamily]:
        steps, batches = self.counts()
        yield CounterMetricFamily("shardmesh_stage_steps", "Steps this node's blocks ran, one per session per step.", value=steps)
        yield CounterMetricFamily("shardmesh_stage_batches", "Batched computations those steps ran in.", value=batches)


class LinkCounter:
    """A collector read at scrape time: session hops whose frames moved to a hop link,
    at either end (this node opened the link or took it)."""

    def __init__(self, taken: Callable[[], int]) -> None:
        self.taken = taken

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily("shardmesh_hop_links", "Session hops moved to a hop link, at either end.", value=self.taken())


class TrunkCounters:
    """A collector read at scrape time: the ``steps`` frames this node's trunks brought
    in (each carries the steps of several sessions from one hop or gateway,
    mesh/trunk.py) and the steps in them, then the ``results`` frames its results trunks
    brought in from last hops (a gateway's) and the tokens' results in them. Items over
    frames is how many sessions shared a frame."""

    def __init__(self, counts: Callable[[], tuple[int, int, int, int]]) -> None:
        self.counts = counts

    def collect(self) -> Iterator[CounterMetricFamily]:
        frames, steps, result_frames, results = self.counts()
        yield CounterMetricFamily("shardmesh_batched_frames", "Frames of several sessions' steps received on trunks.", value=frames)
        yield CounterMetricFamily("shardmesh_batched_frame_steps", "Sessions' steps those frames carried.", value=steps)
        yield CounterMetricFamily("shardmesh_batched_result_frames", "Frames of several sessions' tokens received from last hops.",
                                  value=result_frames)  # fmt: skip
        yield CounterMetricFamily("shardmesh_batched_result_frame_tokens", "Sessions' results those frames carried.", value=results)


class PrefixCounters:
    """A collector read at scrape time: the history tokens this node's blocks took from
    their prefix cache instead of computing them, the bytes that cache holds, and (a
    gateway) the history tokens its chains held already when they opened."""

    def __init__(self, counts: Callable[[], tuple[int, int]] | None, cached: Callable[[], int] | None) -> None:
        self.counts, self.cached = counts, cached

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        if self.counts is not None:
            reused, nbytes = self.counts()
            yield CounterMetricFamily("shardmesh_prefix_tokens_reused", "History tokens this node's blocks took from their prefix cache.",
                                      value=reused)
            yield GaugeMetricFamily("shardmesh_prefix_cache_bytes", "Bytes of KV cache that finished sessions' prefixes hold here.",
                                    value=nbytes)
        if self.cached is not None:
            yield CounterMetricFamily("shardmesh_prompt_tokens_cached", "History tokens the gateway's chains held already (not prefilled).",
                                      value=self.cached())


class SpeculationCounters:
    """A collector read at scrape time: the gateway's decode trips, the tokens they
    brought back and the draft tokens proposed and accepted (:mod:`.speculation`),
    with the two figures that tell whether speculation pays: acceptance and tokens
    per trip (1.0 means it bought nothing)."""

    def __init__(self, stats: Callable[[], SpeculationStats]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        s = self.stats()
        yield CounterMetricFamily("shardmesh_decode_trips", "Decode steps that waited for tokens from a chain.", value=s.trips)
        yield CounterMetricFamily("shardmesh_decode_trip_tokens", "Tokens those decode steps brought back.", value=s.tokens)
        yield CounterMetricFamily("shardmesh_draft_tokens_proposed", "Draft tokens proposed to chains (speculative decoding).", value=s.proposed)
        yield CounterMetricFamily("shardmesh_draft_tokens_accepted", "Draft tokens the chains accepted.", value=s.accepted)
        yield GaugeMetricFamily("shardmesh_draft_acceptance", "Draft tokens accepted over proposed, since start.", value=s.acceptance)
        yield GaugeMetricFamily("shardmesh_tokens_per_trip", "Tokens per decode trip, since start.", value=s.tokens_per_trip)


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
