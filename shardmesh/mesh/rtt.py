"""Round-trip times to the peers we might chain with, for the record's ``rtt`` map.

Routing prices a hop by the RTT from the previous peer (docs/ARCHITECTURE.md, "Placement"),
and only the previous peer can measure that. So every node pings the serving peers it is
connected to now and then and publishes what it measured; gateways do the same for the
first hop. Pings use the standard ``/ipfs/ping/1.0.0`` protocol that every libp2p host
answers, timed here with a monotonic clock (py-libp2p reports whole milliseconds, and on
a LAN or loopback that rounds to 0).
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterable

import trio

from .host import MeshHost

log = logging.getLogger("shardmesh.mesh.rtt")

PING_TIMEOUT = 10.0
MAX_PEERS = 32  # records carry at most this many RTTs; measure no more


PING_PROTOCOL = "/ipfs/ping/1.0.0"
ROUND_TRIPS = 3  # the best of a few: one stray scheduling delay should not count


async def ping_ms(mesh: MeshHost, peer_id, timeout: float = PING_TIMEOUT) -> float | None:
    """The best of a few ping round trips in ms, or None if the peer did not answer.

    Opening the stream (protocol negotiation) is not timed. Everything runs shielded
    with its own deadline: a cancelled stream write would break the connection that
    inference sessions share (see wire.FrameStream.write).
    """
    from libp2p.host.ping import perform_ping_roundtrip

    from .host import close_quietly, reset_quietly

    with trio.CancelScope(shield=True):
        stream = None
        try:
            with trio.fail_after(timeout):
                stream = await mesh.open_stream(peer_id, PING_PROTOCOL)
                best = float("inf")
                for _ in range(ROUND_TRIPS):
                    t0 = time.perf_counter()
                    await perform_ping_roundtrip(stream)
                    best = min(best, (time.perf_counter() - t0) * 1000)
            await close_quietly(stream)
            return best
        except Exception as exc:  # TooSlowError included: a silent peer has no RTT
            log.debug("ping %s failed: %r", peer_id, exc)
            if stream is not None:
                await reset_quietly(stream)
            return None


PROBE_TIMEOUT = 3.0  # s a peer gets to answer one ping when a chain asks whether it is alive


async def answers_ping(mesh: MeshHost, peer: str, timeout: float = PROBE_TIMEOUT) -> bool:
    """Does ``peer`` (base58) answer a ping within ``timeout`` s? A frozen process
    (SIGSTOP, a stuck event loop) or a vanished one does not. The gateway's chains use
    it to find which hop went silent (chain_client.RemoteChain._silent_hop)."""
    from libp2p.peer.id import ID

    if peer == mesh.peer_id_str:
        return True  # ourselves: we are plainly not frozen
    try:
        peer_id = ID.from_base58(peer)
    except Exception:
        return False
    return await ping_ms(mesh, peer_id, timeout) is not None


async def publish_rtts(mesh: MeshHost, serving_peers: Callable[[], Iterable[str]], publish, every: float = 15.0) -> None:
    """Forever: ping the connected peers among ``serving_peers()`` and ``publish(rtt)``."""
    while True:
        connected = {p.to_base58(): p for p in mesh.connected_peers()}
        rtt: dict[str, float] = {}
        for peer in list(serving_peers())[: MAX_PEERS * 2]:
            if peer in connected and len(rtt) < MAX_PEERS:
                ms = await ping_ms(mesh, connected[peer])
                if ms is not None:
                    rtt[peer] = round(ms, 3)
        if rtt:
            publish(rtt)
        await trio.sleep(every if rtt else min(every, 2.0))  # nobody yet: look again soon
