"""Dial-back (mesh/dialback.py, docs/PROTOCOL.md section 8) between real libp2p hosts on
127.0.0.1: a peer dials our port back from a throwaway identity and says whether it got
through; a hostile asker gets refusals or a reset, and the server keeps serving."""

from __future__ import annotations

import socket
import struct

import cbor2
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from shardmesh.mesh.addresses import port_of
from shardmesh.mesh.dialback import (
    MAX_MESSAGE, PRIVATE, PROTOCOL, PUBLIC, UNKNOWN, UNNAMED, DialBackServer, ask, dial_with_fresh_identity,
    reached_addresses, seen_at, verdict,
)  # fmt: skip
from shardmesh.mesh.host import running_host

LOCAL = "/ip4/127.0.0.1/tcp/0"


A = "/ip4/198.18.1.1/tcp/4001"


def test_verdict() -> None:
    assert verdict([[A], [], None], 3) == PUBLIC
    assert verdict([[], []], 3) == PRIVATE
    assert verdict([[], None, None], 3) == UNKNOWN  # one "no" among three asked: their firewall?
    assert verdict([[]], 1) == PRIVATE  # the only peer there is tried and failed
    assert verdict([None], 1) == UNKNOWN
    assert verdict([], 0) == UNKNOWN
    assert verdict([[UNNAMED]], 1) == PUBLIC  # an older peer reached us without saying where


def test_where_peers_reached_us() -> None:
    """The answer's ports at its IP, only ports we asked about; the address most peers
    agree on first (a lying peer's address cannot come first alone)."""
    assert reached_addresses({"reached": [4001, 4002], "ip": "198.18.1.1"}, [4001]) == [A]
    assert reached_addresses({"reached": [4001], "ip": "2001:db8::1"}, [4001]) == ["/ip6/2001:db8::1/tcp/4001"]
    assert reached_addresses({"reached": [4001]}, [4001]) == [UNNAMED]
    assert reached_addresses({"reached": [4001], "ip": "not an ip"}, [4001]) == [UNNAMED]
    assert reached_addresses({"reached": [True, "4001"], "ip": "198.18.1.1"}, [4001]) == []
    assert reached_addresses({"refused": "no"}, [4001]) is None
    liar = "/ip4/203.0.113.9/tcp/4001"
    assert seen_at([[liar], [A], [A, UNNAMED], None, []]) == [A, liar]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def raw_request(asker, server_id, data: bytes) -> dict | None:
    """Send ``data`` as is on a dial-back stream; the answer, or None if it was reset."""
    stream = await asker.host.new_stream(server_id, [PROTOCOL])
    await stream.write(data)
    try:
        head = await stream.read(2)
        if len(head) < 2:
            return None
        (n,) = struct.unpack(">H", head)
        return cbor2.loads(await stream.read(n))
    except Exception:
        return None


def framed(message) -> bytes:
    body = cbor2.dumps(message)
    return struct.pack(">H", len(body)) + body


def test_a_peer_dials_us_back_and_a_hostile_asker_changes_nothing() -> None:
    async def main() -> None:
        async with running_host(create_new_key_pair(), [LOCAL]) as server, \
                running_host(create_new_key_pair(), [LOCAL]) as asker, \
                running_host(create_new_key_pair(), [LOCAL]) as hostile:
            dials: list[str] = []

            async def dial(address: str) -> bool:
                dials.append(address)
                return await dial_with_fresh_identity(address, None)

            clock = [0.0]
            service = DialBackServer(dial, clock=lambda: clock[0])
            server.set_handler(PROTOCOL, service.handle)
            server_addr = str(server.addrs()[0])  # with /p2p/<id>
            await asker.connect(server_addr)
            await hostile.connect(server_addr)
            server_id = ID.from_base58(server.peer_id_str)

            listening = port_of(str(asker.addrs()[0]))
            assert await ask(asker, server.peer_id_str, [listening]) == [f"/ip4/127.0.0.1/tcp/{listening}"]
            assert dials == [f"/ip4/127.0.0.1/tcp/{listening}/p2p/{asker.peer_id_str}"]
            # At once again: refused (one request per asker per interval), nothing dialled.
            assert await ask(asker, server.peer_id_str, [listening]) is None
            assert len(dials) == 1
            clock[0] += 60
            assert await ask(asker, server.peer_id_str, [free_port()]) == []  # nobody listens there

            # The hostile peer: oversized frames and junk are reset, bad ports refused;
            # no address of its choosing is ever dialled.
            assert await raw_request(hostile, server_id, struct.pack(">H", MAX_MESSAGE + 1) + b"x" * 300) is None
            assert await raw_request(hostile, server_id, struct.pack(">H", 4) + b"\xff\xff\xff\xff") is None
            for ports in ([], [0], [70000], [True], [1, 2, 3, 4, 5], "4001", None):
                answer = await raw_request(hostile, server_id, framed({"ports": ports}))
                assert answer is not None and "refused" in answer, (ports, answer)
            answer = await raw_request(hostile, server_id, framed({"ports": [4001], "ip": "10.9.9.9"}))
            assert answer == {"reached": [], "ip": "127.0.0.1"}
            assert dials[-1] == f"/ip4/127.0.0.1/tcp/4001/p2p/{hostile.peer_id_str}"  # its own IP, not 10.9.9.9
            assert not any("10.9.9.9" in d for d in dials)

            clock[0] += 60  # the server still serves
            assert await ask(asker, server.peer_id_str, [listening]) == [f"/ip4/127.0.0.1/tcp/{listening}"]

    trio.run(main)


def test_the_dial_back_uses_a_new_connection() -> None:
    """The asker is connected already; a dial-back that reused that connection would
    always succeed (py-libp2p's AutoNAT does). A port with the asker's listener gone
    must fail even though the connection stays up."""
    async def main() -> None:
        async with running_host(create_new_key_pair(), [LOCAL]) as server, \
                running_host(create_new_key_pair(), [LOCAL]) as asker:
            await server.connect(str(asker.addrs()[0]))
            assert server.is_connected(asker.peer_id_str)
            gone = free_port()  # the asker does not listen there
            assert not await dial_with_fresh_identity(f"/ip4/127.0.0.1/tcp/{gone}/p2p/{asker.peer_id_str}", None)
            listening = port_of(str(asker.addrs()[0]))
            assert await dial_with_fresh_identity(f"/ip4/127.0.0.1/tcp/{listening}/p2p/{asker.peer_id_str}", None)
            # A listener that is not the asker (the server's own port) does not count.
            other = port_of(str(server.addrs()[0]))
            assert not await dial_with_fresh_identity(f"/ip4/127.0.0.1/tcp/{other}/p2p/{asker.peer_id_str}", None)

    trio.run(main)
