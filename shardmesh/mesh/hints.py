"""Suspicion travels as a hint; each node confirms it with its own dial.

The peers connected to a dead or frozen server find out in seconds (:mod:`.liveness`),
but a gateway that is not connected to it would keep routing through it until its
record expires. So a node names the serving peers it has marked unreachable in its own
record's ``suspects`` (at most 8, the latest), and every node that reads such a record
checks each suspect it still routes to, itself: a ping if it is connected to that peer,
a dial if not. Only its own failed check marks the peer here. A hostile node can thus
make others check a peer (at most once per :data:`RECHECK` each), never make them drop
one.

:func:`hinted` and :func:`own_suspects` are pure; :func:`follow_hints` is the loop that
runs them, and :func:`confirm` the check.
"""

from __future__ import annotations

import logging
from typing import Awaitable, Callable, Iterable

import trio

from .liveness import Liveness, check_peer
from .record_checks import MAX_SUSPECTS
from .records import NodeRecord

log = logging.getLogger("shardmesh.mesh.hints")

POLL = 1.0  # s between two looks at the view's hints (and at our own marks, to publish them)
RECHECK = 10.0  # s before the same suspect is checked again, whoever names it
MAX_CHECKS = 8  # checks started per look: a view full of hints costs a bounded trickle

__all__ = ["RECHECK", "confirm", "follow_hints", "hinted", "own_suspects"]


def own_suspects(liveness: Liveness, serving: Iterable[str]) -> tuple[str, ...]:
    """The ``serving`` peers we marked unreachable, latest first, at most MAX_SUSPECTS."""
    marked = [(since, peer) for peer in serving if (since := liveness.since(peer)) is not None]
    return tuple(peer for _, peer in sorted(marked, reverse=True)[:MAX_SUSPECTS])


def hinted(records: Iterable[NodeRecord], me: str, liveness: Liveness, checked: dict[str, float], now: float) -> list[str]:
    """Suspects named in others' records that we should check now: serving peers in
    our view, not us, not marked here already, not checked in the last :data:`RECHECK` s."""
    serving = {}
    suspects: list[str] = []
    for record in records:
        if record.serves_blocks:
            serving[record.peer] = record
        if record.peer != me:
            suspects.extend(record.suspects)
    due = []
    for peer in dict.fromkeys(suspects):  # once each, in the order first named
        if peer == me or peer not in serving or liveness.since(peer) is not None:
            continue
        if now - checked.get(peer, -RECHECK) < RECHECK:
            continue
        due.append(peer)
    return due[:MAX_CHECKS]


async def confirm(
    peer: str,
    connected: Callable[[str], bool],
    ping: Callable[[str], Awaitable[bool]],
    dial: Callable[[str], Awaitable[None]],
    liveness: Liveness,
    clock: Callable[[], float],
) -> None:
    """Check a hinted ``peer`` ourselves: a ping over our connection to it (an open
    connection says nothing of a frozen process), else a dial (:func:`check_peer`)."""
    if not connected(peer):
        await check_peer(peer, dial, liveness, clock)
    elif await ping(peer):
        liveness.clear(peer)
    elif liveness.since(peer) is None:
        log.info("peer %s is unreachable: it did not answer a ping after a hint", peer)
        liveness.mark(peer, clock())


async def follow_hints(
    me: str,
    records: Callable[[], list[NodeRecord]],
    liveness: Liveness,
    check: Callable[[str], Awaitable[None]],
    publish: Callable[[tuple[str, ...]], None],
    clock: Callable[[], float],
) -> None:
    """Forever: publish our own suspects when they change, and :func:`confirm` (through
    ``check``) the suspects others name."""
    checked: dict[str, float] = {}
    published: tuple[str, ...] = ()
    async with trio.open_nursery() as checks:
        while True:
            view = records()
            own = own_suspects(liveness, (r.peer for r in view if r.serves_blocks and r.peer != me))
            if own != published:
                publish(own)
                published = own
            now = clock()
            for peer in [p for p, at in checked.items() if now - at >= RECHECK]:
                del checked[peer]
            for peer in hinted(view, me, liveness, checked, now):
                checked[peer] = now
                log.info("checking peer %s: another node found it unreachable", peer)
                checks.start_soon(check, peer)
            await trio.sleep(POLL)
