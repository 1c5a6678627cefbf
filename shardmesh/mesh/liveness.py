"""Which peers this node has found unreachable, and since when.

A record lives 30 s, so a node that dies keeps looking alive in every view for up to
that long, and routing keeps choosing it. But the peers connected to it see its death
at once: its libp2p connection drops. So when the connection to a peer that serves
blocks drops, this node dials it again (:func:`check_peer`); if that fails, the peer
is marked unreachable here, and the view stops offering it to routing at once
(``servers()`` leaves it out; ``/v1/swarm`` shows since when). A mark goes when the peer
is connected again, or when it publishes a record signed after the mark (it is alive
and publishing again). One node's marks are its own: they never travel, so nobody's
word removes a peer from anyone else's view. Records still expire as the backstop.
"""

from __future__ import annotations

import logging
from typing import Awaitable, Callable

import trio

from .notifee import QuietNotifee

log = logging.getLogger("shardmesh.mesh.liveness")

RECHECK_TIMEOUT = 3.0  # s to dial a peer whose connection dropped before it counts as unreachable

__all__ = ["DisconnectWatcher", "Liveness", "RECHECK_TIMEOUT", "check_peer"]


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
