"""Relaying for nodes nobody can dial: the hop side of circuit relay v2.

A public node (``--relay-service on``, the default) lets nodes behind NATs reserve a
slot, and splices a dialler's stream to such a node's (see :mod:`.relay_wire` for the
protocol). Everything here is bounded, since anyone may ask:

* a reservation is made for the peer whose connection asks (the Noise-proven id, never
  the id a message names), not over a relayed connection, at most
  :attr:`RelayLimits.reservations` in all and :attr:`RelayLimits.reservations_per_ip`
  from one IP (identities are free; addresses less so);
* a circuit needs the target's reservation and its live connection to us (we never
  dial anyone for a stranger); at most :attr:`RelayLimits.circuits_per_peer` per
  source and per target, :attr:`RelayLimits.circuits` in all;
* a circuit carries at most :attr:`RelayLimits.circuit_bytes` and lives at most
  :attr:`RelayLimits.circuit_seconds`: enough for a chain's signalling and, where no
  direct path exists, its inference traffic; then it is closed and its slot freed at
  once, whichever direction was waiting. The answers carry no ``limit`` field:
  libp2p peers treat a connection with one as fit for signalling only (js-libp2p
  opens no other protocol on it), and these circuits are meant to carry chains.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import trio

from .host import MeshHost, close_quietly, is_relayed, remote_ip, reset_quietly
from .relay_wire import STOP, HopMessage, Peer, RelayWireError, Reservation, Status, StopMessage, peer_id_from, read_message, write_message

log = logging.getLogger("shardmesh.mesh.relay")

__all__ = ["RelayLimits", "RelayService"]

CHUNK = 64 * 1024  # bytes moved per read
WRITE_TIMEOUT = 30.0  # s one write to a stalled end may take before the circuit ends
END_GRACE = 5.0  # s the ends get to close their sides of an ended circuit before its reads are cut


class _Countdown:
    """``done`` is set after ``tick`` was called ``n`` times."""

    def __init__(self, n: int) -> None:
        self.left = n
        self.done = trio.Event()

    def tick(self) -> None:
        self.left -= 1
        if self.left <= 0:
            self.done.set()


@dataclass(frozen=True)
class RelayLimits:
    reservations: int = 64
    reservations_per_ip: int = 4
    reservation_seconds: int = 900
    circuits: int = 64
    circuits_per_peer: int = 8
    circuit_bytes: int = 256 << 20  # both directions together
    circuit_seconds: int = 1800


@dataclass
class _Books:
    """Who holds what on this relay."""

    reservations: dict[str, tuple[float, str]] = field(default_factory=dict)  # peer -> (expires, ip)
    circuits_of: dict[str, int] = field(default_factory=dict)  # peer (either end) -> open circuits
    circuits: int = 0

    def live_reservation(self, peer: str, now: float) -> bool:
        held = self.reservations.get(peer)
        return held is not None and held[0] > now

    def drop_expired(self, now: float) -> None:
        for peer in [p for p, (expires, _) in self.reservations.items() if expires <= now]:
            del self.reservations[peer]

    def open(self, *peers: str) -> None:
        self.circuits += 1
        for p in peers:
            self.circuits_of[p] = self.circuits_of.get(p, 0) + 1

    def close(self, *peers: str) -> None:
        self.circuits -= 1
        for p in peers:
            left = self.circuits_of.get(p, 1) - 1
            if left:
                self.circuits_of[p] = left
            else:
                self.circuits_of.pop(p, None)


class RelayService:
    """``mesh.set_handler(HOP, service.handle)``; ``addrs()`` names where we are reached
    (what a reservation tells its holder); new reservations are taken only while
    ``open_for()`` (a node that peers cannot dial is no use as a relay)."""

    def __init__(self, mesh: MeshHost, addrs: Callable[[], list[str]], limits: RelayLimits = RelayLimits(),
                 open_for: Callable[[], bool] = lambda: True, clock: Callable[[], float] = time.time) -> None:
        self.mesh = mesh
        self.addrs = addrs
        self.open_for = open_for
        self.limits = limits
        self.clock = clock
        self.books = _Books()
        self.relayed_bytes = 0

    def holds_reservation(self, peer: str) -> bool:
        return self.books.live_reservation(peer, self.clock())

    async def handle(self, stream) -> None:
        try:
            message = await read_message(stream, HopMessage)
        except RelayWireError as exc:
            log.debug("hop request refused: %s", exc)
            await reset_quietly(stream)
            return
        if message.type == HopMessage.RESERVE:
            await self._reserve(stream)
        elif message.type == HopMessage.CONNECT:
            await self._connect(stream, message)
        else:
            await self._answer(stream, Status.UNEXPECTED_MESSAGE)

    async def _answer(self, stream, status: int, **fields) -> None:
        await write_message(stream, HopMessage(type=HopMessage.STATUS, status=status, **fields))
        if status != Status.OK:
            await close_quietly(stream)  # a reset could overtake the answer

    async def _reserve(self, stream) -> None:
        peer = stream.muxed_conn.peer_id.to_base58()
        ip = remote_ip(stream)
        now = self.clock()
        books, limits = self.books, self.limits
        books.drop_expired(now)
        for gone in [p for p in books.reservations if p != peer and not self.mesh.is_connected(p)]:
            del books.reservations[gone]  # a reservation lasts only while its holder stays connected
        renewal = peer in books.reservations
        from_ip = sum(1 for p, (_, at) in books.reservations.items() if at == ip and p != peer)
        if is_relayed(stream) or ip is None:
            await self._answer(stream, Status.PERMISSION_DENIED)  # a relay of relays helps nobody
            return
        if not renewal and (len(books.reservations) >= limits.reservations or from_ip >= limits.reservations_per_ip
                            or not self.open_for()):
            await self._answer(stream, Status.RESERVATION_REFUSED)
            return
        expires = now + limits.reservation_seconds
        books.reservations[peer] = (expires, ip)
        addrs = [a.encode() for a in self.addrs()[:8]]
        await self._answer(stream, Status.OK, reservation=Reservation(expire=int(expires), addrs=addrs))
        await stream.close()

    async def _connect(self, stream, message: HopMessage) -> None:
        source = stream.muxed_conn.peer_id
        target = peer_id_from(message.peer.id)
        if target is None:
            await self._answer(stream, Status.MALFORMED_MESSAGE)
            return
        src, dst = source.to_base58(), target.to_base58()
        books, limits = self.books, self.limits
        if is_relayed(stream):
            await self._answer(stream, Status.PERMISSION_DENIED)
            return
        if not books.live_reservation(dst, self.clock()) or not self.mesh.is_connected(dst):
            await self._answer(stream, Status.NO_RESERVATION)
            return
        if (books.circuits >= limits.circuits or books.circuits_of.get(src, 0) >= limits.circuits_per_peer
                or books.circuits_of.get(dst, 0) >= limits.circuits_per_peer):
            await self._answer(stream, Status.RESOURCE_LIMIT_EXCEEDED)
            return
        books.open(src, dst)
        try:
            far = await self._stop(target, source)
            if far is None:
                await self._answer(stream, Status.CONNECTION_FAILED)
                return
            await self._answer(stream, Status.OK)
            await self._splice(stream, far)
        finally:
            books.close(src, dst)

    async def _stop(self, target, source):
        """Open the stop protocol to ``target`` on its connection to us; its stream, or
        None if it does not take the circuit."""
        stream = None
        try:
            with trio.fail_after(10):
                stream = await self.mesh.host.new_stream(target, [STOP])
            await write_message(stream, StopMessage(type=StopMessage.CONNECT, peer=Peer(id=source.to_bytes())))
            answer = await read_message(stream, StopMessage)
            if answer.type == StopMessage.STATUS and answer.status == Status.OK:
                return stream
        except Exception as exc:  # noqa: BLE001 - any failure: the circuit cannot open
            log.debug("stop to %s failed: %r", target, exc)
        if stream is not None:
            await reset_quietly(stream)
        return None

    async def _splice(self, a, b) -> None:
        """Copy both ways until either end stops, the byte budget is spent or the
        circuit's time is up; then end it by closing both streams, and reset them.

        A read is never cancelled while the ends may still answer: py-libp2p's read
        writes window updates, and one cut halfway leaves half a frame on a connection
        that carries more than this circuit (the target's own connection to us, its
        reservation with it). Closing our sides makes each end close its own, which
        ends our reads; only an end that stays silent for :data:`END_GRACE` has its
        read cut."""
        budget = [self.limits.circuit_bytes]
        ended, both = trio.Event(), _Countdown(2)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, a, b, budget, ended, both)
            nursery.start_soon(self._pump, b, a, budget, ended, both)
            with trio.move_on_after(self.limits.circuit_seconds):
                await ended.wait()
            await close_quietly(a)
            await close_quietly(b)
            with trio.move_on_after(END_GRACE):
                await both.done.wait()
            nursery.cancel_scope.cancel()
        await reset_quietly(a)
        await reset_quietly(b)

    async def _pump(self, src, dst, budget: list[int], ended: trio.Event, both: _Countdown) -> None:
        try:
            while True:
                data = await src.read(CHUNK)
                if not data:
                    break
                budget[0] -= len(data)
                if budget[0] < 0:
                    break
                self.relayed_bytes += len(data)
                # A write cancelled halfway would leave half a frame on the target's
                # connection, which carries more than this circuit: only a stall ends it.
                with trio.CancelScope(shield=True), trio.move_on_after(WRITE_TIMEOUT) as stalled:
                    await dst.write(data)
                if stalled.cancelled_caught:
                    break
        except Exception as exc:  # noqa: BLE001 - StreamEOF, StreamReset: that end is gone
            log.debug("circuit ended: %r", exc)
        finally:
            ended.set()  # the splice closes both streams, which ends the other direction
            both.tick()
