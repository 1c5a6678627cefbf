"""Throughput a server claims, held to what the gateway has seen of it.

A record's ``throughput`` is the server's own word. Routing prefers fast servers, so a
peer that claims a huge figure would get every request (and see every prompt) on its
word alone. The gateway therefore routes on a *capped* figure:

* It measures its chains. A decode step that took ``t`` seconds through a route of
  ``n`` hops shows that a hop running ``b`` blocks did its part in under ``t``; its fair
  share, ``b * n / t`` block-tokens per second, is kept as that peer's measured speed
  (the best seen; :class:`MeasuredSpeeds`).
* A claim counts for at most :data:`SLACK` times the peer's measured speed, and at
  most the swarm's *typical* speed (:data:`SLACK` times the median measured speed, or,
  before anything was measured, the median claim of all servers) when that is higher.
  One peer, or a minority of fresh identities, cannot move a median.

So a new peer is routed like a typical one until it has shown more, and an honest fast
one earns its place in a few steps. Pure: views and figures in, views out.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

from .routing import Hop
from .spans import ServerView

__all__ = ["MAX_MEASURED", "SLACK", "MeasuredSpeeds", "capped_claims"]

SLACK = 2.0  # how far above what we measured a claim may still count
MAX_MEASURED = 4096  # peers whose speed a gateway remembers


class MeasuredSpeeds:
    """The best fair-share speed (block-tokens per second) each peer has shown."""

    def __init__(self) -> None:
        self._best: dict[str, float] = {}

    def record(self, route: Sequence[Hop], seconds: float) -> None:
        """One decode step (one token) through ``route`` took ``seconds``."""
        if seconds <= 0 or not route:
            return
        for hop in route:
            speed = (hop.end - hop.start) * len(route) / seconds
            if speed > self._best.get(hop.peer, 0.0):
                self._best[hop.peer] = speed
        if len(self._best) > MAX_MEASURED:
            slowest = sorted(self._best, key=self._best.__getitem__)[: len(self._best) - MAX_MEASURED]
            for peer in slowest:
                del self._best[peer]

    def figures(self) -> Mapping[str, float]:
        return self._best


def capped_claims(servers: Iterable[ServerView], measured: Mapping[str, float]) -> list[ServerView]:
    """``servers`` with each ``throughput`` cut to what the gateway can vouch for."""
    views = list(servers)
    seen = [v for v in measured.values() if v > 0]
    if seen:
        typical = SLACK * statistics.median(seen)
    else:
        claims = [s.throughput for s in views if s.throughput > 0]
        typical = statistics.median(claims) if claims else 0.0
    capped = []
    for s in views:
        cap = max(typical, SLACK * measured.get(s.peer, 0.0))
        capped.append(replace(s, throughput=min(s.throughput, cap)) if s.throughput > cap else s)
    return capped
