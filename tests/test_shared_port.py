"""One port for libp2p and hop links (mesh/shared_port.py), with real libp2p hosts on
127.0.0.1: peers connect over libp2p and links arrive on the same port, in an open and
in a private swarm; strangers sending junk or nothing change neither."""

from __future__ import annotations

import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from shardmesh.mesh.addresses import port_of
from shardmesh.mesh.host import running_host
from shardmesh.mesh.link import LINK_MAGIC, dial
from shardmesh.mesh.link_offers import LinkListener
from shardmesh.mesh.shared_port import share_port
from shardmesh.mesh.swarm_key import write_new_swarm_key

LOCAL = "/ip4/127.0.0.1/tcp/0"


async def link_round_trip(listener: LinkListener, message: bytes) -> bytes:
    offer = listener.offer()
    a = await dial("127.0.0.1", offer.fields)
    b = await listener.take(offer)
    await a.write(message)
    got = await b.read(len(message))
    await a.reset()
    await b.reset()
    return got


def check(swarm_key=None) -> None:
    async def main() -> None:
        async with running_host(create_new_key_pair(), [LOCAL], swarm_key) as node, trio.open_nursery() as nursery:
            port = port_of(str(node.addrs()[0]))
            listener = LinkListener.on_shared_port(port)
            assert share_port(node.host, listener.adopt) == 1
            nursery.start_soon(listener.run)
            await trio.sleep(0)

            # A link, then a libp2p peer, on the one port.
            assert await link_round_trip(listener, b"over the link") == b"over the link"
            async with running_host(create_new_key_pair(), [LOCAL], swarm_key) as peer:
                await peer.connect(str(node.addrs()[0]))
                assert peer.is_connected(node.peer_id_str)

            # Strangers: half the magic then junk, junk at once, nothing at all; the
            # magic with a wrong token. None of them gets anywhere.
            strangers = []
            for data in (LINK_MAGIC[:7] + b"junk" * 8, b"\x13junk", b"", LINK_MAGIC + b"\0" * 16):
                s = await trio.open_tcp_stream("127.0.0.1", port)
                if data:
                    await s.send_all(data)
                strangers.append(s)
            for s in strangers[:2] + strangers[3:]:
                with trio.fail_after(15):
                    try:
                        while await s.receive_some(100):
                            pass  # whatever libp2p answers, then the close
                    except trio.BrokenResourceError:
                        pass  # closed with our junk still unread there: the kernel resets, which is a close too
            # ... and both still work, with the silent stranger still waiting.
            assert await link_round_trip(listener, b"still") == b"still"
            async with running_host(create_new_key_pair(), [LOCAL], swarm_key) as peer:
                await peer.connect(str(node.addrs()[0]))
                assert peer.is_connected(node.peer_id_str)
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_links_and_libp2p_share_one_port() -> None:
    check()


def test_links_and_libp2p_share_one_port_in_a_private_swarm(tmp_path) -> None:
    check(write_new_swarm_key(tmp_path / "swarm.key"))
