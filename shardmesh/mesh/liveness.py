"""Which peers this node has found unreachable, and since when.

A record lives 30 s, so a node that dies keeps looking alive in every view for up to
that long, and routing keeps choosing it. But the peers connected to it see its death
at once: its libp2p connection drops. So when the connection to a peer that serves
blocks drops, this node dials it again (:func:`check_peer`); if that fails, the peer
is marked unreachable here, and the view stops offering it to routing at once
(``servers()`` leaves it out; ``/v1/swarm`` shows since when).

A connection does not always drop: a frozen process (SIGSTOP, a stuck event loop) or
a machine cut off the network without a word leaves it open for minutes. So the
serving peers a node is connected to are pinged every few seconds
(:func:`ping_connected`); one that misses two pings in a row is marked too.

A mark goes when the peer is connected again, answers a ping, or publishes a record
signed after the mark (it is alive and publishing again). One node's marks are its
own: others hear of them only as a hint (:mod:`.hints`) that they check with their own
dial, so nobody's word removes a peer from anyone else's view. Records still expire as
the backstop.
"""

from __future__ import annotations

import logging
from typing import Awaitable, Callable, Iterable

import trio

from .notifee import QuietNotifee

log = logging.getLogger("shardmesh.mesh.liveness")

RECHECK_TIMEOUT = 3.0  # s to dial a peer whose connection dropped before it counts as unreachable
PING_EVERY = 4.0  # s between two liveness pings of a connected serving peer
PING_TIMEOUT = 5.0  # s one of them may take: a node busy loading or measuring answers slowly, not never
MISSES = 2  # pings missed in a row before a peer is marked: one slow answer is not a death
MAX_PINGED = 32  # serving peers pinged per round (the ones chains would use are the connected ones)

__all__ = ["DisconnectWatcher", "Liveness", "MISSES", "PING_EVERY", "PING_TIMEOUT", "RECHECK_TIMEOUT", "check_peer", "ping_connected"]


class Liveness:
    """Peer id -> unix time it was found unreachable. Plain data."""

    def __init__(self) -> None:
        self._since: dict[str, float] = {}

    def mark(self, peer: str, now: float) -> None:
        self._since.setdefault(peer, now)

    def clear(self, peer: str) -> None:
        self._since.pop(peer, None)

    def since(self, peer: str) -> float | None:
        """When ``peer`` was found unreachable; None if it is not."""
        return self._since.get(peer)

    def unreachable(self) -> frozenset[str]:
        return frozenset(self._since)

    def record_signed(self, peer: str, seq_ms: int) -> None:
        """A record of ``peer`` signed at ``seq_ms`` (unix ms) arrived: if it was signed
        after the mark, the peer is alive again."""
        since = self._since.get(peer)
        if since is not None and seq_ms / 1000 > since:
            del self._since[peer]


async def check_peer(peer: str, dial: Callable[[str], Awaitable[None]], liveness: Liveness, clock: Callable[[], float]) -> bool:
    """Dial ``peer`` (within :data:`RECHECK_TIMEOUT`): cleared if it answers, marked if not.
    True if it is reachable."""
    try:
        with trio.fail_after(RECHECK_TIMEOUT):
            await dial(peer)
    except Exception as exc:  # TooSlowError included
        log.info("peer %s is unreachable: %s", peer, exc)
        liveness.mark(peer, clock())
        return False
    liveness.clear(peer)
    return True


async def ping_connected(
    peers: Callable[[], Iterable[str]],
    answers: Callable[[str], Awaitable[bool]],
    liveness: Liveness,
    clock: Callable[[], float],
    every: float = PING_EVERY,
) -> None:
    """Forever: every ``every`` s, ping each of ``peers()`` (the connected peers that
    routing may use: ``online`` servers; at most :data:`MAX_PINGED`) at once.
    ``answers(peer)`` is one ping with its own deadline (:data:`PING_TIMEOUT`). A peer
    that misses :data:`MISSES` in a row is marked; one that answers is cleared."""
    missed: dict[str, int] = {}

    async def ping(peer: str) -> None:
        if await answers(peer):
            missed.pop(peer, None)
            liveness.clear(peer)
            return
        missed[peer] = missed.get(peer, 0) + 1
        if missed[peer] >= MISSES and liveness.since(peer) is None:
            log.info("peer %s is unreachable: it missed %d pings in a row", peer, missed[peer])
            liveness.mark(peer, clock())

    while True:
        round_ = list(peers())[:MAX_PINGED]
        for gone in set(missed) - set(round_):  # no longer connected or serving: start afresh
            del missed[gone]
        async with trio.open_nursery() as pings:
            for peer in round_:
                pings.start_soon(ping, peer)
        await trio.sleep(every)


class DisconnectWatcher(QuietNotifee):
    """Network notifee: a dropped connection to a peer ``watched`` says is worth it is
    handed to ``recheck``; a new connection clears the peer's mark."""

    def __init__(self, liveness: Liveness, watched: Callable[[str], bool], recheck: Callable[[str], None]) -> None:
        self.liveness = liveness
        self.watched = watched
        self.recheck = recheck

    async def connected(self, network, conn) -> None:
        self.liveness.clear(conn.muxed_conn.peer_id.to_base58())
        await trio.lowlevel.checkpoint()

    async def disconnected(self, network, conn) -> None:
        peer = conn.muxed_conn.peer_id
        if peer not in network.connections and self.watched(peer.to_base58()):
            self.recheck(peer.to_base58())
        await trio.lowlevel.checkpoint()
