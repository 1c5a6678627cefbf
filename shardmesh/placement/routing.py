"""Routing: the cheapest chain of servers that carries a token through every block.

A route is a list of :class:`Hop` whose ranges tile ``[0, total_blocks)`` in order. The
gateway (``origin``) sends token ids to the first hop, each hop pushes hidden states to
the next, and the last hop sends the sampled token straight back to the gateway
(docs/ARCHITECTURE.md, "The life of a request"). So one token costs, in milliseconds::

    sum over hops of  compute + RTT(previous peer -> hop's peer) + hop_overhead
                      + RTT(last hop's peer -> origin)

where the first hop's "previous peer" is the gateway and compute is
``1000 * blocks / throughput * (1 + load)``. A server short of free KV cache pays a big
fixed penalty instead of being excluded: when every server is full, a slow answer beats
none. An RTT nobody measured is the default, plus :data:`RELAY_PENALTY_MS` into a
``relayed`` server (one behind a NAT: reached through a relay, a detour through a
third machine that also carries others' traffic), so direct paths are preferred and a
relayed hop is still used when nothing else serves its blocks.

The search. A hop may enter and leave a server at any block boundary inside its span,
and the RTT a hop pays depends on who came before it, so a state is (boundary, last
peer). Hops only move forward through the blocks, so the graph is acyclic: Dijkstra's
priority queue reduces to visiting boundaries in increasing order, and each state is
settled exactly once. Two things keep this fast on a thousand servers:

* a hop over ``[a, b)`` is "enter at a" plus one step per block, so extending a hop
  never re-enumerates its end points;
* most peer pairs have no measured RTT and cost the default, so the best predecessor for
  entering server t is the cheapest state *without* a measurement to t (a scan in cost
  order that almost always stops at once) or one of t's few measured neighbours.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from .spans import ONLINE, ServerView, valid_span

CACHE_PENALTY_MS = 10_000.0  # added to a hop whose server lacks the KV cache asked for
RELAY_PENALTY_MS = 50.0  # added to an unmeasured RTT into a server reached through a relay


@dataclass(frozen=True)
class Hop:
    """One link of a route: ``peer`` runs blocks ``[start, end)``."""

    peer: str
    start: int
    end: int


class _Rtt:
    """RTT lookup: the sender's measurement, else the receiver's, else the default."""

    def __init__(self, views: Mapping[str, ServerView], default_ms: float) -> None:
        self.default_ms = default_ms
        self.relayed = {p for p, s in views.items() if s.relayed}
        self.maps = {p: s.rtt_ms for p, s in views.items()}
        self.measured_by: dict[str, set[str]] = {}  # peer -> who measured it
        for p, m in self.maps.items():
            for q in m:
                self.measured_by.setdefault(q, set()).add(p)

    def ms(self, src: str, dst: str) -> float:
        if src == dst:
            return 0.0
        for a, b in ((src, dst), (dst, src)):
            v = self.maps.get(a, {}).get(b)
            if v is not None and v >= 0:  # a negative or NaN figure is a broken record
                return float(v)
        return self.unmeasured_ms(dst)

    def unmeasured_ms(self, dst: str) -> float:
        """The RTT into ``dst`` assumed where nobody measured it."""
        return self.default_ms + (RELAY_PENALTY_MS if dst in self.relayed else 0.0)

    def neighbours(self, peer: str) -> set[str]:
        """Every peer whose RTT to ``peer`` may differ from the default."""
        return set(self.maps.get(peer, ())) | self.measured_by.get(peer, set())


def _block_ms(s: ServerView) -> float:
    return 1000.0 * (1.0 + max(0.0, s.load)) / s.throughput


def _entry_ms(s: ServerView, tokens_needed: int, hop_overhead_ms: float) -> float:
    return hop_overhead_ms + (CACHE_PENALTY_MS if s.cache_tokens_free < tokens_needed else 0.0)


def find_route(
    servers: Iterable[ServerView],
    total_blocks: int,
    *,
    origin: str,
    exclude: Collection[str] = (),
    tokens_needed: int = 0,
    default_rtt_ms: float = 2.0,
    hop_overhead_ms: float = 0.5,
) -> list[Hop] | None:
    """The cheapest chain of hops covering ``[0, total_blocks)`` in order, or None.

    Only online servers not in ``exclude`` with a positive throughput are used. One view
    per peer: a later view of the same peer replaces an earlier one, as a newer record
    would. Equal costs are settled by peer id, and staying on a server beats an equally
    cheap new hop, so the same swarm always gets the same route.
    """
    views = {s.peer: s for s in servers}
    rtt = _Rtt(views, default_rtt_ms)
    skip = set(exclude)
    usable = sorted(
        p for p, s in views.items()
        if s.state == ONLINE and p not in skip and valid_span(s, total_blocks)
        and s.throughput > 0 and math.isfinite(_block_ms(s))
    )
    if total_blocks <= 0 or not usable:
        return None
    step = {p: _block_ms(views[p]) for p in usable}
    entry = {p: _entry_ms(views[p], tokens_needed, hop_overhead_ms) for p in usable}
    # near[t] = {p: RTT p -> t} for the usable peers with a measured RTT to t that could
    # come right before it (p's span ends inside t's): the only ones off the default.
    near = {t: {p: rtt.ms(p, t) for p in rtt.neighbours(t) if p in step and p != t
                and max(views[t].start, views[p].start + 1) <= min(views[t].end - 1, views[p].end)}
            for t in usable}
    covering: list[list[str]] = [[] for _ in range(total_blocks)]
    for p in usable:
        for b in range(views[p].start, views[p].end):
            covering[b].append(p)

    # states[a][p] = (cost, entered_at, previous peer) of the best chain whose current
    # hop is on p and has run blocks up to boundary a; it may stop there or go on.
    # Boundary 0 holds only the gateway (key None): nothing has run yet.
    states: list[dict[str | None, tuple[float, int, str | None]]] = [{None: (0.0, 0, None)}]
    for a in range(total_blocks):
        here = states[a]
        ranked = sorted((c[0], p) for p, c in here.items() if p is not None)
        nxt: dict[str | None, tuple[float, int, str | None]] = {}
        for t in covering[a]:
            best: tuple[float, str | None] | None = None  # (cost before entering t, from)
            if a == 0:
                best = (rtt.ms(origin, t), None)
            else:
                for c, p in ranked:  # cheapest predecessor at the default RTT
                    if p != t and p not in near[t]:
                        best = (c + rtt.unmeasured_ms(t), p)
                        break
                for p, ms in near[t].items():  # predecessors with a measured RTT to t
                    if p in here:
                        cand = (here[p][0] + ms, p)
                        best = cand if best is None or cand < best else best
            stay = here.get(t)  # already on t: keep going; beats an equally cheap new hop
            if best is not None and (stay is None or best[0] + entry[t] < stay[0]):
                stay = (best[0] + entry[t], a, best[1])
            if stay is not None:
                nxt[t] = (stay[0] + step[t], stay[1], stay[2])
        states.append(nxt)

    if not states[total_blocks]:
        return None
    _, last = min((c[0] + rtt.ms(p, origin), p) for p, c in states[total_blocks].items())
    route: list[Hop] = []
    end, peer = total_blocks, last
    while peer is not None:
        _, start, prev = states[end][peer]
        route.append(Hop(peer, start, end))
        end, peer = start, prev
    return route[::-1]


def route_cost(
    route: Sequence[Hop],
    servers: Iterable[ServerView],
    *,
    origin: str,
    tokens_needed: int = 0,
    default_rtt_ms: float = 2.0,
    hop_overhead_ms: float = 0.5,
) -> float:
    """Milliseconds per token of ``route`` under the cost model :func:`find_route` minimises.

    For logs, the swarm map and tests. Raises KeyError for a hop whose peer has no view.
    """
    views = {s.peer: s for s in servers}
    rtt = _Rtt(views, default_rtt_ms)
    total, prev = 0.0, origin
    for hop in route:
        s = views[hop.peer]
        total += (rtt.ms(prev, hop.peer) + _entry_ms(s, tokens_needed, hop_overhead_ms)
                  + (hop.end - hop.start) * _block_ms(s))
        prev = hop.peer
    return total + rtt.ms(prev, origin)


class FailureBackoff:
    """Which peers to leave out of routing for a while after they failed a session.

    The first failure excludes a peer for ``base_s`` seconds; each further failure in a
    row doubles that, up to ``cap_s``; a success forgets the streak. Failures reported
    while the peer is still excluded do not double it: they are the same outage seen by
    several sessions at once (one dead peer fails every session routed through it).
    Time is passed in, so this stays pure and testable.
    """

    def __init__(self, base_s: float = 5.0, cap_s: float = 120.0) -> None:
        self.base_s, self.cap_s = base_s, cap_s
        self._streak: dict[str, int] = {}
        self._until: dict[str, float] = {}

    def failed(self, peer: str, now: float) -> None:
        if self._until.get(peer, -math.inf) > now:
            return  # same outage, already backed off
        n = self._streak.get(peer, 0) + 1
        self._streak[peer] = n
        # The exponent is capped so a long streak cannot overflow a float.
        self._until[peer] = now + min(self.cap_s, self.base_s * 2 ** min(n - 1, 60))

    def succeeded(self, peer: str) -> None:
        self._streak.pop(peer, None)
        self._until.pop(peer, None)

    def excluded(self, now: float) -> set[str]:
        return {p for p, until in self._until.items() if until > now}
