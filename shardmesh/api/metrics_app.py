"""``/metrics`` alone, for a node that serves no API (``--api off --metrics HOST:PORT``).

A node that only serves blocks has no gateway, yet its operator wants to see how its
stage batches and how many sessions moved to hop links. This app serves the same
collectors the gateway's ``/metrics`` holds for them, and nothing else; with an API key
it wants the key, as the gateway does.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .auth import RequireApiKey
from .metrics import Metrics

__all__ = ["create_metrics_app"]


def create_metrics_app(
    *, stage_counts: Callable[[], tuple[int, int]] | None = None, links_taken: Callable[[], int] | None = None,
    trunk_counts: Callable[[], tuple[int, int, int, int]] | None = None, api_key: str | None = None,
    prefix_counts: Callable[[], tuple[int, int]] | None = None, collectors: Sequence[Any] = (),
) -> Starlette:
    """An app with ``GET /metrics`` only: the node's stage, link and trunk counters, and
    its own figures (``collectors``: node/node_metrics.py)."""
    metrics = Metrics(stage_counts, links_taken, trunk_counts=trunk_counts, prefix_counts=prefix_counts, collectors=collectors)

    async def render(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    middleware = [Middleware(RequireApiKey, api_key=api_key)] if api_key is not None else []
    return Starlette(routes=[Route("/metrics", render, methods=["GET"])], middleware=middleware)
