"""Spans: which servers hold which blocks, and how much throughput each block has.

A model is a stack of ``total_blocks`` transformer blocks, numbered 0..total_blocks-1.
Each server holds one contiguous *span* ``[start, end)`` of them (``end`` exclusive),
so the swarm can serve the model only when the spans of its online servers cover every
block. How *well* it serves is limited by its weakest block: a token must pass through
every block, so the swarm's rate is bounded by the smallest per-block sum of server
throughputs. That minimum, the **bottleneck**, is what joining nodes and rebalancing try
to raise (docs/ARCHITECTURE.md, "Placement").

Everything here is pure: a list of :class:`ServerView` in, numbers out. A view is what
the registry knows about a server from its signed record; records come from other
machines, so a view with an impossible span is skipped rather than trusted or fatal.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

JOINING = "joining"  # announced, still loading weights: not yet serving
ONLINE = "online"  # serving its span
DRAINING = "draining"  # leaving: finishes its sessions, takes no new ones
STATES = (JOINING, ONLINE, DRAINING)


@dataclass(frozen=True)
class ServerView:
    """What placement and routing know about one server.

    ``throughput`` is the measured decode rate, in tokens/s, for ONE block on this
    server: serving k blocks costs k / throughput seconds per token. ``load`` (0..1) is
    the fraction of time it is busy, which inflates that cost. ``rtt_ms`` holds the
    round-trip times this server measured to other peers, keyed by peer id.
    ``relayed`` servers cannot be dialled (behind a NAT): whoever is not connected to
    one already reaches it through a relay.
    """

    peer: str
    start: int
    end: int
    throughput: float
    state: str = ONLINE
    cache_tokens_free: int = 0
    load: float = 0.0
    # hash=False keeps views hashable (a dict is not); equality still compares it.
    rtt_ms: Mapping[str, float] = field(default_factory=dict, hash=False)
    relayed: bool = False  # nobody can dial it: reached through relays (its reach is private)


def valid_span(server: ServerView, total_blocks: int) -> bool:
    """True when ``[start, end)`` is a non-empty range inside ``[0, total_blocks)``."""
    return 0 <= server.start < server.end <= total_blocks


def _serving(servers: Iterable[ServerView], total_blocks: int) -> Iterator[ServerView]:
    # Only "online" servers count: a joining one has no weights yet, a draining one
    # is about to go. Counting either would hide a gap that is real for new sessions.
    return (s for s in servers if s.state == ONLINE and valid_span(s, total_blocks))


def block_throughput(servers: Iterable[ServerView], total_blocks: int) -> list[float]:
    """Summed throughput of the online servers holding each block (0.0 where none)."""
    per_block = [0.0] * max(total_blocks, 0)
    for s in _serving(servers, total_blocks):
        if s.throughput > 0:  # unmeasured or broken (negative, NaN) adds nothing, subtracts nothing
            for b in range(s.start, s.end):
                per_block[b] += s.throughput
    return per_block


def coverage(servers: Iterable[ServerView], total_blocks: int) -> list[int]:
    """Number of online servers holding each block."""
    counts = [0] * max(total_blocks, 0)
    for s in _serving(servers, total_blocks):
        for b in range(s.start, s.end):
            counts[b] += 1
    return counts


def gaps(servers: Iterable[ServerView], total_blocks: int) -> list[tuple[int, int]]:
    """Maximal runs ``(start, end)`` of blocks that no online server holds, in order."""
    runs: list[tuple[int, int]] = []
    run_start: int | None = None
    # A covered sentinel after the last block closes a run that reaches the end.
    for b, n in enumerate([*coverage(servers, total_blocks), 1]):
        if n == 0 and run_start is None:
            run_start = b
        elif n and run_start is not None:
            runs.append((run_start, b))
            run_start = None
    return runs


@dataclass(frozen=True)
class Repair:
    """Where the swarm has holes, and whether someone is filling them.

    ``gaps`` are the runs of blocks no online server holds; ``unfilled`` the runs of
    those that no joining server (a node loading them, or moving there) covers either;
    ``served`` whether any block has an online server at all. A request can wait while
    a repair is :attr:`under_way`; and for a moment when a swarm that serves part of
    the model has just lost the rest (:attr:`may_heal`): nodes take a few seconds to
    notice a gap and announce that they move in.
    """

    gaps: list[tuple[int, int]]
    unfilled: list[tuple[int, int]]
    served: bool = False

    @property
    def under_way(self) -> bool:
        return bool(self.gaps) and not self.unfilled

    @property
    def may_heal(self) -> bool:
        return self.under_way or (bool(self.gaps) and self.served)


def repair(servers: Iterable[ServerView], total_blocks: int) -> Repair:
    """The swarm's :class:`Repair` state, from its views."""
    views = list(servers)
    holes = gaps(views, total_blocks)
    loading = [s for s in views if s.state == JOINING and valid_span(s, total_blocks)]
    unfilled: list[tuple[int, int]] = []
    for start, end in holes:
        run: int | None = None
        for b in range(start, end + 1):
            bare = b < end and not any(s.start <= b < s.end for s in loading)
            if bare and run is None:
                run = b
            elif not bare and run is not None:
                unfilled.append((run, b))
                run = None
    return Repair(holes, unfilled, served=any(coverage(views, total_blocks)))


def is_complete(servers: Iterable[ServerView], total_blocks: int) -> bool:
    """True when the online servers together hold every block of a non-empty model."""
    return total_blocks > 0 and not gaps(servers, total_blocks)


def bottleneck(servers: Iterable[ServerView], total_blocks: int) -> float:
    """The swarm's rate limit: the smallest per-block throughput (0.0 if any block is uncovered)."""
    return min(block_throughput(servers, total_blocks), default=0.0)
