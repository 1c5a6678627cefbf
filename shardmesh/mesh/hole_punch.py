"""Hole punching: a relayed connection upgraded to a direct one (DCUtR).

Two nodes behind NATs first meet through a relay (:mod:`.relay_client`). Then, as
libp2p's DCUtR protocol (``/libp2p/dcutr``) has it, over that relayed connection each
tells the other the addresses it is seen at (its router's public address and its
listening port), they measure the round trip, and both dial at once, from their
listening ports: each router sees the other's packets as answers to its own, and a
TCP simultaneous open makes a direct connection. New streams then take it, and the
relayed one is closed a minute later. Behind a NAT that gives every connection a random
port (a symmetric NAT) the dials miss, and the connection stays relayed.

We run py-libp2p's ``DCUtRProtocol`` (both ends start an attempt for each relayed
connection within seconds, at most three attempts per peer), with these changes:

* before punching it first dials the peer's known addresses, which identify has filled
  with the peer's private LAN addresses, and waits out a 10 s dial timeout on them: we
  skip that step (test_hole_punch.py); and the side that dialled through the relay
  starts at once, not at the next of its 2-second scans;
* it answers a hole-punch request on any connection, and dials whatever addresses the
  request lists: we serve it only over a relayed connection, and at most once per peer
  per :data:`REQUEST_INTERVAL`, so a peer cannot make us dial a list of its choosing at
  will (test_hole_punch.py).
"""

from __future__ import annotations

import logging
import math

import trio

from .host import MeshHost, is_relayed, reset_quietly

log = logging.getLogger("shardmesh.mesh.hole_punch")

__all__ = ["PROTOCOL", "REQUEST_INTERVAL", "HolePunching"]

PROTOCOL = "/libp2p/dcutr"
REQUEST_INTERVAL = 30.0  # s between two hole-punch requests of one peer that we serve


async def _no_unilateral_dial(peer_id) -> bool:
    return False


class HolePunching:
    """Run :meth:`run` in the node's nursery."""

    def __init__(self, mesh: MeshHost) -> None:
        from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol

        self.mesh = mesh
        self.dcutr = DCUtRProtocol(mesh.host)
        self.dcutr._try_unilateral_upgrade = _no_unilateral_dial
        self._last: dict[str, float] = {}

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        from libp2p.tools.anyio_service import background_trio_service

        try:
            async with background_trio_service(self.dcutr), trio.open_nursery() as nursery:
                await self.dcutr.event_started.wait()
                self.mesh.set_handler(PROTOCOL, self.handle)  # ours in front of py-libp2p's
                self.mesh.relayed_dial = lambda peer_id: nursery.start_soon(self._punch, peer_id)
                task_status.started()
                await trio.sleep_forever()
        except Exception as exc:  # noqa: BLE001 - hole punching is an optimisation: the node goes on
            log.warning("hole punching stopped: %s: %s", type(exc).__name__, exc)
        finally:
            self.mesh.relayed_dial = lambda peer_id: None

    async def _punch(self, peer_id) -> None:
        """Right after we dialled ``peer_id`` through a relay (py-libp2p's own scan for
        relayed connections runs every 2 s)."""
        try:
            await self.dcutr.initiate_hole_punch(peer_id)
        except Exception as exc:  # noqa: BLE001 - the relayed connection still works
            log.debug("hole punching to %s: %r", peer_id, exc)

    async def handle(self, stream) -> None:
        peer = stream.muxed_conn.peer_id.to_base58()
        now = trio.current_time()
        if not is_relayed(stream) or now - self._last.get(peer, -math.inf) < REQUEST_INTERVAL:
            await reset_quietly(stream)
            return
        self._last[peer] = now
        if len(self._last) > 4096:  # forget the oldest: bounded
            for old in sorted(self._last, key=self._last.__getitem__)[:1024]:
                del self._last[old]
        await self.dcutr._handle_dcutr_stream(stream)
