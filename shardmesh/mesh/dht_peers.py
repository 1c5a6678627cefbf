"""Peer adoption: the DHT's routing table follows our connections.

py-libp2p's ``KadDHT`` adds a peer to its routing table only when that peer sends
*us* a DHT request or shows up in a lookup. A peer that only connected (through
``--join``, mDNS or a chain) would stay unknown to it, and so would everyone behind
that peer: in a swarm where each node dials one other, nobody could be found through
anybody. So every connection is handed to :func:`adopt_peers`, which puts the peer
into the routing table once identify has run.

Pubsub has the same blind spot for connections made before it started; those peers
get their gossip stream opened here as well.
"""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable

import trio

from .host import MeshHost
from .notifee import QuietNotifee

log = logging.getLogger("shardmesh.mesh.dht_peers")

ADOPT_PEER_TIMEOUT = 15.0  # seconds to wait for identify before giving up on a new peer
ADOPT_AT_ONCE = 16  # peers being adopted concurrently


class ConnectionWatcher(QuietNotifee):
    """Network notifee: hands each new connection's peer id to :func:`adopt_peers`.

    Runs inside the swarm's notification path, so it must neither block nor raise:
    it only drops the id into a buffered channel (or drops the id if the buffer is
    full; a later connection or the DHT's own traffic will add the peer).
    """

    def __init__(self, send: trio.MemorySendChannel) -> None:
        self.send = send

    async def connected(self, network, conn) -> None:
        try:
            self.send.send_nowait(conn.muxed_conn.peer_id)
        except Exception:
            pass


async def adopt_peers(
    mesh_host: MeshHost,
    kad: Any,
    new_peers: trio.MemoryReceiveChannel,
    already_connected: list,
    ensure_gossip_stream: Callable[[Any, float], Awaitable[None]],
    adopted: Callable[[], None],
) -> None:
    """Put every connected peer into ``kad``'s routing table, until cancelled.

    ``already_connected`` predate pubsub too: each also gets ``ensure_gossip_stream``.
    ``new_peers`` brings the rest, from a :class:`ConnectionWatcher`. ``adopted()`` is
    called after each peer that entered the table.

    We wait for identify first: it brings the peer's listen addresses (which
    ``add_peer`` needs, and an inbound connection lacks) and its protocols. A peer
    without the DHT protocol (a client-mode or non-DHT peer) is left out: ``add_peer``
    admits anyone whose protocols are not known yet, and such a peer in the table
    costs every later lookup a failed stream.
    """
    from libp2p.kad_dht.common import PROTOCOL_ID as KAD_PROTOCOL

    limiter = trio.CapacityLimiter(ADOPT_AT_ONCE)
    in_flight: set = set()
    peerstore = mesh_host.host.get_peerstore()

    def identified(peer_id) -> list[str]:
        try:
            return [str(p) for p in peerstore.get_protocols(peer_id)]
        except Exception:  # PeerStoreError: not known yet
            return []

    async def adopt(peer_id, predates_pubsub: bool) -> None:
        if peer_id in in_flight:
            return
        in_flight.add(peer_id)
        try:
            async with limiter:
                with trio.move_on_after(ADOPT_PEER_TIMEOUT):
                    if predates_pubsub:
                        await ensure_gossip_stream(peer_id, ADOPT_PEER_TIMEOUT)
                    delay = 0.05
                    while not identified(peer_id) or not await kad.add_peer(peer_id):
                        if identified(peer_id) and str(KAD_PROTOCOL) not in identified(peer_id):
                            return
                        if peer_id not in mesh_host.host.get_network().connections:
                            return
                        await trio.sleep(delay)
                        delay = min(1.0, delay * 2)
                    adopted()
        except Exception as exc:
            log.debug("adopting peer %s failed: %s: %s", peer_id, type(exc).__name__, exc)
        finally:
            in_flight.discard(peer_id)

    async with trio.open_nursery() as nursery:
        for peer_id in already_connected:
            nursery.start_soon(adopt, peer_id, True)
        async for peer_id in new_peers:
            nursery.start_soon(adopt, peer_id, False)
