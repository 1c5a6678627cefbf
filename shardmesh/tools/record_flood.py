"""A peer that floods a node with valid records from fresh identities, over gossip.

Identities are free: anyone can make thousands of ed25519 keys and sign a valid record
with each. This peer does so, and publishes every record on the model's records topic
the way docs/PROTOCOL.md 4.1 says, as a signed pubsub message from the record's own
peer, relayed by this host. It is written from the spec (cbor2 and libp2p keys, not
shardmesh's record codec), so it tests the node, not the node's own encoder.

``shardmesh bench --churn`` uses it to measure what 3,000 identities cost a node, and
the record-flood test uses it as the attacker. Each record may name any addresses
(``addrs_for``): a flood that points every record at one victim shows whether the
swarm dials whatever a record says.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

import cbor2
import trio

from ..mesh.host import running_host

SIGNING_PREFIX = b"shardmesh-record/1\0"  # docs/PROTOCOL.md 3.1
PUBSUB_SIGNING_PREFIX = b"libp2p-pubsub:"
MESH_WAIT = 10.0  # seconds to wait for the target to take us into its gossip mesh


@dataclass
class FloodReport:
    peers: list[str]  # the identities whose records were sent, in order
    seconds: float


def flood_record(key_pair, model: str, total_blocks: int, addrs: list[str], *, ttl: float = 30.0) -> bytes:
    """A valid signed record for ``key_pair``'s identity: a gateway serving no blocks."""
    from libp2p.peer.id import ID

    peer = ID.from_pubkey(key_pair.public_key).to_base58()
    body = cbor2.dumps({
        "peer": peer, "addrs": [f"{a}/p2p/{peer}" for a in addrs], "model": model, "start": 0, "end": 0,
        "total_blocks": total_blocks, "state": "online", "throughput": 0.0, "cache_tokens_free": 0,
        "backend": "none", "device": "none", "dtype": "none", "rtt": {}, "version": "flood",
        "seq": int(time.time() * 1000), "expires": time.time() + ttl, "api": None,
    })  # fmt: skip
    return cbor2.dumps({"body": body, "sig": key_pair.private_key.sign(SIGNING_PREFIX + body)})


def pubsub_message(key_pair, topic: str, data: bytes):
    """A StrictSign pubsub message from ``key_pair``'s identity carrying ``data``."""
    from libp2p.peer.id import ID
    from libp2p.pubsub.pb import rpc_pb2

    msg = rpc_pb2.Message(
        data=data, topicIDs=[topic], from_id=ID.from_pubkey(key_pair.public_key).to_bytes(), seqno=os.urandom(8)
    )
    msg.signature = key_pair.private_key.sign(PUBSUB_SIGNING_PREFIX + msg.SerializeToString())
    msg.key = key_pair.public_key.serialize()
    return msg


async def flood(
    target: str,
    model: str,
    total_blocks: int,
    count: int,
    *,
    rate: float = 300.0,
    addrs_for: Callable[[int], list[str]] = lambda i: ["/ip4/198.18.0.1/tcp/4001"],
    on_sent: Callable[[int], None] | None = None,
) -> FloodReport:
    """Connect to ``target`` (a multiaddr with ``/p2p/``) and relay ``count`` records from
    fresh identities at ``rate`` per second. The ``i``-th record names ``addrs_for(i)``."""
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.id import ID
    from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
    from libp2p.pubsub.pubsub import Pubsub
    from libp2p.tools.anyio_service import background_trio_service

    topic = f"shardmesh/{model}/records/1"
    async with running_host(create_new_key_pair(), ["/ip4/127.0.0.1/tcp/0"]) as mesh:
        # The node allows 500 messages/s per forwarder and topic; a flood stays under it
        # so that every record is seen, which is the attack. Our own router must not
        # throttle us either (its default is 10 messages/s).
        gossipsub = GossipSub(
            protocols=[PROTOCOL_ID_V11], degree=6, degree_low=4, degree_high=12, heartbeat_interval=1,
            max_messages_per_topic_per_second=10_000.0,
        )
        pubsub = Pubsub(mesh.host, gossipsub)
        async with background_trio_service(pubsub), background_trio_service(gossipsub):
            await pubsub.wait_until_ready()
            subscription = await pubsub.subscribe(topic)
            target_peer = await mesh.connect(target)
            with trio.move_on_after(MESH_WAIT):
                while target_peer not in gossipsub.mesh.get(topic, set()):
                    await trio.sleep(0.1)
            peers: list[str] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_drain, subscription)  # what the swarm publishes: unread
                start = trio.current_time()
                for i in range(count):
                    key_pair = create_new_key_pair()
                    data = flood_record(key_pair, model, total_blocks, addrs_for(i))
                    await pubsub.push_msg(mesh.peer_id, pubsub_message(key_pair, topic, data))
                    peers.append(ID.from_pubkey(key_pair.public_key).to_base58())
                    if on_sent is not None:
                        on_sent(i + 1)
                    await trio.sleep_until(start + (i + 1) / rate)
                seconds = trio.current_time() - start
                await trio.sleep(1.0)  # let the last messages leave before the host stops
                nursery.cancel_scope.cancel()
            return FloodReport(peers=peers, seconds=seconds)


async def _drain(subscription) -> None:
    async for _ in subscription:
        pass
