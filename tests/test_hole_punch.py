"""Hole punching (mesh/hole_punch.py), py-libp2p's DCUtR wrapped, between real libp2p
hosts on 127.0.0.1: its requests are served only over relayed connections and once per
peer per interval (so nobody can make a node dial a list of addresses at will), and
the plain dial it would try first is skipped. The punching itself, through real NATs,
is in test_emulated_internet.py."""

from __future__ import annotations

import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.host.exceptions import StreamFailure
from libp2p.network.stream.exceptions import StreamReset
from libp2p.peer.id import ID
from libp2p.stream_muxer.exceptions import MuxedStreamError
from libp2p.relay.circuit_v2.pb.dcutr_pb2 import HolePunch

from shardmesh.mesh.hole_punch import PROTOCOL, HolePunching
from shardmesh.mesh.host import is_relayed, running_host
from shardmesh.mesh.relay_client import CircuitAcceptor, circuit_address, reserve
from shardmesh.mesh.relay_service import RelayService
from shardmesh.mesh.relay_wire import HOP, STOP, RelayWireError, read_message, write_message

LOCAL = "/ip4/127.0.0.1/tcp/0"


async def ask_to_punch(asker, target: str) -> HolePunch | None:
    """A hole-punch CONNECT naming an address nobody should dial; the target's answer,
    or None if it refused (reset the stream, before or after the protocol was agreed)."""
    stream = None
    try:
        stream = await asker.host.new_stream(ID.from_base58(target), [PROTOCOL])
        await write_message(stream, HolePunch(type=HolePunch.CONNECT, ObsAddrs=[b"\x04\x0a\x09\x09\x09\x06\x00\x01"]))
        return await read_message(stream, HolePunch, timeout=10)
    except (RelayWireError, StreamFailure, StreamReset, MuxedStreamError):  # reset while agreeing, writing or reading
        return None
    finally:
        if stream is not None:
            try:
                await stream.reset()
            except (StreamReset, MuxedStreamError):
                pass


def test_hole_punch_requests_only_over_relays_and_rate_limited() -> None:
    async def main() -> None:
        async with running_host(create_new_key_pair(), [LOCAL]) as relay, \
                running_host(create_new_key_pair(), [LOCAL]) as home, \
                running_host(create_new_key_pair(), [LOCAL]) as direct, \
                running_host(create_new_key_pair(), [LOCAL]) as via_relay, trio.open_nursery() as nursery:
            relay.set_handler(HOP, RelayService(relay, lambda: [str(a) for a in relay.addrs()]).handle)
            relay_addr = str(relay.addrs()[0])
            home.set_handler(STOP, CircuitAcceptor(home, lambda: {relay.peer_id_str}).handle)
            punching = HolePunching(home)
            await nursery.start(punching.run)
            await home.connect(relay_addr)
            await reserve(home, relay.peer_id_str)

            # Over a direct connection: refused (reset), whatever it lists.
            await direct.connect(str(home.addrs()[0]))
            assert await ask_to_punch(direct, home.peer_id_str) is None

            # Over a relayed one: answered with the node's own addresses, once.
            await via_relay.connect(circuit_address(relay_addr, home.peer_id_str))
            conns = via_relay.host.get_network().get_connections(home.peer_id)
            assert conns and all(is_relayed(c.muxed_conn) for c in conns)
            answer = await ask_to_punch(via_relay, home.peer_id_str)
            assert answer is not None and answer.type == HolePunch.CONNECT
            assert await ask_to_punch(via_relay, home.peer_id_str) is None  # again at once: refused
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_the_plain_dial_before_punching_is_skipped() -> None:
    """py-libp2p's DCUtR first dials the peer's known addresses (behind a NAT, its LAN
    ones, which wait out a 10 s timeout); ours goes straight to punching."""
    async def main() -> None:
        async with running_host(create_new_key_pair(), [LOCAL]) as node, running_host(create_new_key_pair(), [LOCAL]) as other:
            punching = HolePunching(node)
            dials: list = []

            async def record(peer_id, addr) -> None:
                dials.append(addr)

            punching.dcutr._dial_peer = record
            node.host.get_peerstore().add_addrs(other.peer_id, list(other.addrs()), 60)
            assert await punching.dcutr._try_unilateral_upgrade(other.peer_id) is False
            assert dials == []

    trio.run(main)
