"""Being reached through relays: reservations, circuits in, circuits out.

A node that peers cannot dial (its record's ``reach`` is ``private``) keeps
reservations on :data:`RELAYS_WANTED` public peers of the swarm (any public node
relays unless its owner turned that off, see :mod:`.relay_service`), and publishes
one circuit address per relay: ``<relay's address>/p2p-circuit/p2p/<us>``.
:class:`Reservations` keeps them: it renews each at half its life, and when a relay's
connection drops it reserves on another at its next check, a second later.

A dialler given a circuit address asks the relay to ``CONNECT`` it
(:func:`.relay_dial.dial_through_relay`), and the relay opens the stop protocol to us
(:class:`CircuitAcceptor`). Both ends then run Noise and Yamux over the spliced
stream, exactly as over TCP, so every protocol works over a relayed connection; only
hop links (which need an IP to dial) do not, and sessions stay on their streams.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import trio
from multiaddr import Multiaddr

from .host import reset_quietly
from .relay_dial import UPGRADE_TIMEOUT, RelayRefused, mark_relayed, status_name
from .relay_wire import HOP, HopMessage, RelayWireError, Status, StopMessage, peer_id_from, read_message, write_message

log = logging.getLogger("shardmesh.mesh.relay")

__all__ = ["CircuitAcceptor", "Reservations", "circuit_address", "reserve"]

RELAYS_WANTED = 2
CHECK_EVERY = 1.0  # s between looks at our relays' connections
RETRY_RELAY = 60.0  # s before asking again a relay that refused or failed


def circuit_address(relay_addr: str, peer: str) -> str:
    """Where ``peer`` is reached through the relay at ``relay_addr`` (ending in ``/p2p/<relay>``)."""
    return f"{relay_addr}/p2p-circuit/p2p/{peer}"


async def reserve(mesh, relay: str) -> float:
    """Reserve (or renew) a slot on connected ``relay``; returns when it expires (Unix
    time). Raises :class:`RelayRefused` or :class:`RelayWireError`."""
    from libp2p.peer.id import ID

    with trio.fail_after(15):
        stream = await mesh.host.new_stream(ID.from_base58(relay), [HOP])
    try:
        await write_message(stream, HopMessage(type=HopMessage.RESERVE))
        answer = await read_message(stream, HopMessage)
    finally:
        await stream.close()
    if answer.type != HopMessage.STATUS or answer.status != Status.OK or not answer.HasField("reservation"):
        raise RelayRefused(status_name(answer.status))
    return float(answer.reservation.expire)


class CircuitAcceptor:
    """The stop protocol: circuits our relays open to us become connections.
    ``mesh.set_handler(STOP, acceptor.handle)``; ``relays()`` names the relays we hold
    reservations on (nobody else may open circuits to us)."""

    def __init__(self, mesh, relays: Callable[[], set[str]]) -> None:
        self.mesh = mesh
        self.relays = relays

    async def handle(self, stream) -> None:
        from libp2p.connection_types import ConnectionType
        from libp2p.network.connection.raw_connection import RawConnection
        relay = stream.muxed_conn.peer_id.to_base58()
        if relay not in self.relays():
            await reset_quietly(stream)
            return
        try:
            message = await read_message(stream, StopMessage)
            if message.type != StopMessage.CONNECT:
                raise RelayWireError("not a CONNECT")
            source = peer_id_from(message.peer.id)
            if source is None:
                raise RelayWireError("not a peer id")
        except RelayWireError as exc:
            log.debug("circuit from %s refused: %s", relay, exc)
            await write_message(stream, StopMessage(type=StopMessage.STATUS, status=Status.MALFORMED_MESSAGE))
            await reset_quietly(stream)
            return
        await write_message(stream, StopMessage(type=StopMessage.STATUS, status=Status.OK))
        address = Multiaddr(f"/p2p/{relay}/p2p-circuit/p2p/{source.to_base58()}")
        raw = RawConnection(stream, initiator=False, connection_type=ConnectionType.RELAYED, addresses=[address])
        with trio.fail_after(UPGRADE_TIMEOUT):
            muxed = await self.mesh.host.upgrade_inbound_connection(raw, address)
        mark_relayed(self.mesh.host, muxed.peer_id, muxed, address)  # the Noise-proven peer
        log.debug("relayed connection from %s via %s", source, relay)


@dataclass
class _Held:
    expires: float
    address: str  # the relay's own address that our circuit address starts with
    renewed: float


class Reservations:
    """Keeps :data:`RELAYS_WANTED` reservations while ``wanted()``; ``candidates()``
    lists public peers as ``(peer, its addresses)``; ``publish`` gets our circuit
    addresses whenever they change."""

    def __init__(self, mesh, candidates: Callable[[], list[tuple[str, list[str]]]], wanted: Callable[[], bool],
                 publish: Callable[[list[str]], None], clock: Callable[[], float] = time.time) -> None:
        self.mesh = mesh
        self.candidates = candidates
        self.wanted = wanted
        self.publish = publish
        self.clock = clock
        self.held: dict[str, _Held] = {}
        self._failed: dict[str, float] = {}  # relay -> when it last refused or failed

    def relays(self) -> set[str]:
        return set(self.held)

    def addresses(self) -> list[str]:
        me = self.mesh.peer_id_str
        return [circuit_address(h.address, me) for _, h in sorted(self.held.items())]

    async def run(self) -> None:
        published: list[str] = []
        while True:
            await self.check()
            now = self.addresses()
            if now != published:
                log.info("relay addresses: %s", ", ".join(now) or "none")
                self.publish(now)
                published = now
            await trio.sleep(CHECK_EVERY)

    async def check(self) -> None:
        """One round: drop lost or expired relays, renew those past half their life,
        reserve on new ones until there are enough."""
        now = self.clock()
        for relay, held in list(self.held.items()):
            if not self.wanted() or held.expires <= now or not self.mesh.is_connected(relay):
                del self.held[relay]
            elif now - held.renewed > (held.expires - held.renewed) / 2:
                await self._reserve(relay, held.address)
        if not self.wanted():
            return
        for relay, addrs in self.candidates():
            if len(self.held) >= RELAYS_WANTED:
                break
            if relay in self.held or now - self._failed.get(relay, -RETRY_RELAY) < RETRY_RELAY or not addrs:
                continue
            await self._reserve(relay, addrs[0])

    async def _reserve(self, relay: str, address: str) -> None:
        try:
            if not self.mesh.is_connected(relay):
                await self.mesh.connect(address)
            expires = await reserve(self.mesh, relay)
        except Exception as exc:  # noqa: BLE001 - refused, unreachable, cut off: try another
            log.info("no reservation on relay %s: %s", relay, exc)
            self.held.pop(relay, None)
            self._failed[relay] = self.clock()
            return
        self.held[relay] = _Held(expires, address, self.clock())
