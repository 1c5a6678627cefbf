"""Dialling a node through a relay: circuit relay v2's ``CONNECT`` (see :mod:`.relay_wire`).

:meth:`.host.MeshHost.connect` and ``ensure_connected`` come here for an address with
``/p2p-circuit`` in it; py-libp2p's own dialler skips such addresses, and its relay
transport makes a reservation of its own before every dial and breaks with a swarm key.
"""

from __future__ import annotations

import trio
from multiaddr import Multiaddr

from .relay_wire import HOP, HopMessage, Peer, Status, read_message, write_message

__all__ = ["UPGRADE_TIMEOUT", "RelayRefused", "dial_through_relay", "is_circuit", "mark_relayed", "status_name"]

UPGRADE_TIMEOUT = 15.0  # s for Noise and Yamux over a new circuit


def mark_relayed(host, peer_id, muxed_conn, circuit: Multiaddr) -> None:
    """Tag the host's connection over ``muxed_conn`` with its circuit address: py-libp2p
    cannot tell a relayed connection's addresses itself, and its hole punching
    (:mod:`.hole_punch`) looks for ``/p2p-circuit`` in them."""
    from libp2p.connection_types import ConnectionType

    for conn in host.get_network().get_connections(peer_id):
        if muxed_conn is None or getattr(conn, "muxed_conn", None) is muxed_conn:
            try:
                conn.set_transport_info([circuit], ConnectionType.RELAYED)
            except Exception:  # noqa: BLE001 - an older connection class: hole punching just skips it
                pass


def is_circuit(addr: str | Multiaddr) -> bool:
    return "/p2p-circuit" in str(addr)


class RelayRefused(Exception):
    """The relay answered with another status than OK (its name in the message)."""


def status_name(status: int) -> str:
    try:
        return Status.Name(status)
    except ValueError:
        return str(status)


async def dial_through_relay(host, relay_id, target_id, circuit: Multiaddr) -> None:
    """A libp2p connection to ``target_id`` through connected relay ``relay_id`` (py-libp2p
    objects): ``CONNECT``, then Noise and Yamux over the circuit; it joins the host's
    connections like a dialled one."""
    from libp2p.connection_types import ConnectionType
    from libp2p.network.connection.raw_connection import RawConnection

    with trio.fail_after(15):
        stream = await host.new_stream(relay_id, [HOP])
    try:
        await write_message(stream, HopMessage(type=HopMessage.CONNECT, peer=Peer(id=target_id.to_bytes())))
        answer = await read_message(stream, HopMessage)
        if answer.type != HopMessage.STATUS or answer.status != Status.OK:
            raise RelayRefused(status_name(answer.status))
        raw = RawConnection(stream, initiator=True, connection_type=ConnectionType.RELAYED, addresses=[circuit])
        with trio.fail_after(UPGRADE_TIMEOUT):
            conn = await host.upgrade_outbound_connection(raw, target_id)
        mark_relayed(host, target_id, getattr(conn, "muxed_conn", None), circuit)
    except BaseException:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            try:
                await stream.reset()
            except Exception:  # noqa: BLE001 - already gone
                pass
        raise
