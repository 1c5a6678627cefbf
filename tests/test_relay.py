"""Circuit relay v2 (mesh/relay_service.py, relay_client.py, relay_dial.py; docs/PROTOCOL.md
section 9) between real libp2p hosts on 127.0.0.1: a node reserves on a relay, a third
dials it through the relay and runs an ordinary protocol over the circuit; hostile
peers written from the protocol get refusals, and the relay keeps serving."""

from __future__ import annotations

import struct

import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from shardmesh.mesh.host import HostError, is_relayed, running_host
from shardmesh.mesh.relay_client import CircuitAcceptor, circuit_address, reserve
from shardmesh.mesh.relay_dial import RelayRefused
from shardmesh.mesh.relay_service import RelayLimits, RelayService
from shardmesh.mesh.relay_wire import HOP, STOP, HopMessage, Peer, Status, read_message, write_message

LOCAL = "/ip4/127.0.0.1/tcp/0"
ECHO = "/test/echo/1.0.0"


async def echo(stream) -> None:
    """Echo until the other side closes."""
    try:
        while data := await stream.read(65536):
            await stream.write(data)
    except Exception:
        pass
    await stream.close()


async def round_trip(host, peer: str, size: int) -> bytes:
    stream = await host.open_stream(ID.from_base58(peer), ECHO)
    payload = bytes(range(256)) * (size // 256)
    await stream.write(payload)
    got = b""
    with trio.fail_after(20):
        while len(got) < len(payload):
            chunk = await stream.read(65536)
            if not chunk:
                break
            got += chunk
    await stream.close()
    return got if got == payload else b"mismatch"


async def hop_request(host, relay: str, message: HopMessage | bytes) -> HopMessage | None:
    """One raw hop request; the relay's answer, or None if it reset the stream."""
    stream = await host.host.new_stream(ID.from_base58(relay), [HOP])
    if isinstance(message, bytes):
        await stream.write(message)
    else:
        await write_message(stream, message)
    try:
        return await read_message(stream, HopMessage, timeout=12)
    except Exception:
        return None


def test_a_node_nobody_can_dial_is_reached_through_a_relay() -> None:
    async def main() -> None:
        async with running_host(create_new_key_pair(), [LOCAL]) as relay, \
                running_host(create_new_key_pair(), [LOCAL]) as private, \
                running_host(create_new_key_pair(), [LOCAL]) as dialler, trio.open_nursery() as nursery:
            service = RelayService(relay, lambda: [str(a) for a in relay.addrs()], RelayLimits(circuit_bytes=1 << 20))
            relay.set_handler(HOP, service.handle)
            relay_addr = str(relay.addrs()[0])

            # The private node reserves; only its relay may open circuits to it.
            private.set_handler(ECHO, echo)
            private.set_handler(STOP, CircuitAcceptor(private, lambda: {relay.peer_id_str}).handle)
            await private.connect(relay_addr)
            expires = await reserve(private, relay.peer_id_str)
            assert expires > trio.current_time() and service.holds_reservation(private.peer_id_str)

            # The dialler knows only the circuit address (as a record would give it).
            circuit = circuit_address(relay_addr, private.peer_id_str)
            await dialler.connect(circuit)
            conns = dialler.host.get_network().get_connections(private.peer_id)
            assert conns and all(is_relayed(c.muxed_conn) for c in conns)
            assert await round_trip(dialler, private.peer_id_str, 100_000) != b"mismatch"
            assert service.relayed_bytes > 200_000  # it really went through the relay

            # The circuit's byte budget (1 MiB) ends it, and frees its slot at once.
            try:
                await round_trip(dialler, private.peer_id_str, 2_000_000)
            except Exception:
                pass
            with trio.fail_after(10):
                while service.books.circuits:
                    await trio.sleep(0.05)
            assert service.books.circuits_of == {}
            with trio.fail_after(20):
                while dialler.is_connected(private.peer_id_str):
                    await trio.sleep(0.1)
            # Ending the spent circuit left the target's own connection to the relay (and
            # so its reservation) alone: no read was cut halfway through a window update.
            assert relay.is_connected(private.peer_id_str) and service.holds_reservation(private.peer_id_str)
            await dialler.connect(circuit)  # a new circuit is fine
            assert await round_trip(dialler, private.peer_id_str, 10_000) != b"mismatch"
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_hostile_peers_get_refusals_and_the_relay_keeps_serving() -> None:
    async def main() -> None:
        async with running_host(create_new_key_pair(), [LOCAL]) as relay, \
                running_host(create_new_key_pair(), [LOCAL]) as private, \
                running_host(create_new_key_pair(), [LOCAL]) as hostile:
            limits = RelayLimits(reservations=2, reservations_per_ip=8)
            service = RelayService(relay, lambda: [str(a) for a in relay.addrs()], limits)
            relay.set_handler(HOP, service.handle)
            relay_addr = str(relay.addrs()[0])
            await hostile.connect(relay_addr)
            await private.connect(relay_addr)
            private.set_handler(STOP, CircuitAcceptor(private, lambda: {relay.peer_id_str}).handle)

            # A reservation is for the asker, whatever peer id the message names.
            victim = ID.from_base58(private.peer_id_str)
            answer = await hop_request(hostile, relay.peer_id_str, HopMessage(type=HopMessage.RESERVE, peer=Peer(id=victim.to_bytes())))
            assert answer is not None and answer.status == Status.OK
            assert service.holds_reservation(hostile.peer_id_str) and not service.holds_reservation(private.peer_id_str)

            # Junk, a length over the bound, a cut-off message: reset; nothing changes.
            assert await hop_request(hostile, relay.peer_id_str, b"\xff\xff\xff\xff") is None
            assert await hop_request(hostile, relay.peer_id_str, b"\x80\x40" + b"x" * 100) is None  # 8192 > 4096
            assert await hop_request(hostile, relay.peer_id_str, struct.pack("B", 50) + b"\x08") is None  # 50 bytes promised
            answer = await hop_request(hostile, relay.peer_id_str, HopMessage(type=HopMessage.STATUS))
            assert answer is not None and answer.status == Status.UNEXPECTED_MESSAGE

            # A circuit needs the target's reservation; a malformed peer id is refused.
            answer = await hop_request(hostile, relay.peer_id_str, HopMessage(type=HopMessage.CONNECT, peer=Peer(id=victim.to_bytes())))
            assert answer is not None and answer.status == Status.NO_RESERVATION
            answer = await hop_request(hostile, relay.peer_id_str, HopMessage(type=HopMessage.CONNECT, peer=Peer(id=b"\x00junk")))
            assert answer is not None and answer.status == Status.MALFORMED_MESSAGE

            # A circuit to a node that did not reserve there is refused by that node too.
            stranger = CircuitAcceptor(private, lambda: set())
            assert not stranger.relays()

            # The table is bounded: two reservations in all, a third peer is refused.
            await reserve(private, relay.peer_id_str)
            async with running_host(create_new_key_pair(), [LOCAL]) as third:
                await third.connect(relay_addr)
                try:
                    await reserve(third, relay.peer_id_str)
                    raise AssertionError("a third reservation was taken")
                except RelayRefused as exc:
                    assert "RESERVATION_REFUSED" in str(exc)
            # ... and the relay still serves: renewals, and a circuit to the private node.
            await reserve(private, relay.peer_id_str)
            private.set_handler(ECHO, echo)
            await hostile.connect(circuit_address(relay_addr, private.peer_id_str))
            assert await round_trip(hostile, private.peer_id_str, 10_000) != b"mismatch"

    trio.run(main)


def test_a_circuit_from_a_relay_we_did_not_reserve_on_is_refused() -> None:
    async def main() -> None:
        async with running_host(create_new_key_pair(), [LOCAL]) as relay, \
                running_host(create_new_key_pair(), [LOCAL]) as private, \
                running_host(create_new_key_pair(), [LOCAL]) as dialler:
            service = RelayService(relay, lambda: [str(a) for a in relay.addrs()])
            relay.set_handler(HOP, service.handle)
            relay_addr = str(relay.addrs()[0])
            private.set_handler(STOP, CircuitAcceptor(private, lambda: set()).handle)  # trusts no relay
            await private.connect(relay_addr)
            await reserve(private, relay.peer_id_str)
            try:
                await dialler.connect(circuit_address(relay_addr, private.peer_id_str))
                raise AssertionError("the circuit was taken")
            except HostError as exc:
                assert "CONNECTION_FAILED" in str(exc), exc
            assert service.books.circuits == 0

    trio.run(main)
