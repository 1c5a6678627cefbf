"""Places in the swarm view (mesh/view_room.py) and py-libp2p's peer table, pinned
(mesh/peer_table.py): the bookkeeping that keeps a flood of free identities from
growing a node's tables or pushing out the peers that matter.

The view tests use real signed records through a real SwarmView; the peer-table tests
use py-libp2p's own PeerData entries and real peer ids.
"""

from __future__ import annotations

import dataclasses
import time

from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from multiaddr import Multiaddr

from shardmesh.mesh.peer_table import PinnedPeerStore
from shardmesh.mesh.records import NodeRecord, sign_record, verify_record
from shardmesh.mesh.swarm_view import SwarmView
from shardmesh.mesh.view_room import ViewRoom, host_of

MODEL = "tiny@0123456789ab"


def signed(host: str = "10.0.0.1", seq: int = 1) -> tuple[NodeRecord, bytes]:
    key_pair = create_new_key_pair()
    peer = ID.from_pubkey(key_pair.public_key).to_base58()
    record = NodeRecord(
        peer=peer, addrs=(f"/ip4/{host}/tcp/4001/p2p/{peer}",), model=MODEL, start=0, end=0, total_blocks=12,
        state="online", throughput=0.0, cache_tokens_free=0, backend="none", device="none", dtype="none", rtt={},
        version="test", seq=seq, expires=time.time() + 30,
    )  # fmt: skip
    envelope = sign_record(record, key_pair)
    return verify_record(envelope), envelope


def test_host_of_names_the_first_address_host() -> None:
    assert host_of(("/ip4/1.2.3.4/tcp/1/p2p/X", "/ip4/5.6.7.8/tcp/1/p2p/X")) == "ip4/1.2.3.4"
    assert host_of(["/dns4/example.org/tcp/1/p2p/X"]) == "dns4/example.org"
    assert host_of(()) == ""


def test_one_origin_cannot_take_more_than_its_share() -> None:
    view = SwarmView(MODEL, None, room=ViewRoom(max_records=100, max_per_origin=10, max_per_host=100))
    kept = sum(view.merge(*signed(f"10.0.0.{i}"), origin="flooder") for i in range(30))
    assert kept == 10
    assert view.stats.refused_no_room == 20
    # ...while a record from any other origin still finds a place.
    assert view.merge(*signed(), origin="honest")
    assert len(view.records()) == 11


def test_one_origin_cannot_point_many_records_at_one_host() -> None:
    view = SwarmView(MODEL, None, room=ViewRoom(max_records=100, max_per_origin=100, max_per_host=3))
    assert sum(view.merge(*signed("10.9.9.9"), origin="flooder") for _ in range(10)) == 3
    # The cap is per origin: the victim's own host is not used up for anyone else.
    assert view.merge(*signed("10.9.9.9"), origin="honest")
    # A refresh may not move a record onto a full host either.
    other, _ = signed("10.1.1.1")
    room = view.room
    room.take(other.peer, "flooder", "ip4/10.1.1.1")
    assert room.admit(other.peer, "flooder", "ip4/10.9.9.9") == (False, None)
    assert room.admit(other.peer, "flooder", "ip4/10.1.1.1") == (True, None)


def test_a_full_view_evicts_the_largest_origin_oldest_first() -> None:
    view = SwarmView(MODEL, None, room=ViewRoom(max_records=6, max_per_origin=6, max_per_host=100))
    flood = [signed(f"10.0.0.{i}") for i in range(5)]
    for record, envelope in flood:
        assert view.merge(record, envelope, origin="flooder")
    assert view.merge(*signed(), origin="honest-a")  # the sixth place
    # Full: a newcomer from another origin displaces the flooder's oldest record.
    newcomer, envelope = signed()
    assert view.merge(newcomer, envelope, origin="honest-b")
    peers = {r.peer for r in view.records()}
    assert flood[0][0].peer not in peers and newcomer.peer in peers
    assert view.stats.evicted == 1
    # The flooder itself cannot displace anyone once it is the largest origin.
    assert not view.merge(*signed(), origin="flooder")
    assert len(view.records()) == 6


def test_an_origin_no_larger_than_the_newcomers_is_never_robbed() -> None:
    view = SwarmView(MODEL, None, room=ViewRoom(max_records=4, max_per_origin=4, max_per_host=100))
    for origin in ("a", "a", "b", "b"):
        assert view.merge(*signed(), origin=origin)
    # After taking a place, "c" would hold 1; "a" and "b" hold 2: eviction is fair.
    assert view.merge(*signed(), origin="c")
    # Now a:1 or b:1 and c:1 remain beside a 2: "c" again would hold 2, not fewer.
    assert not view.merge(*signed(), origin="c")


def test_pinned_peers_keep_their_place_and_get_one_when_full() -> None:
    pinned: set[str] = set()
    view = SwarmView(MODEL, None, room=ViewRoom(max_records=3, max_per_origin=3, max_per_host=1, pinned=pinned.__contains__))
    first, envelope = signed("10.0.0.1")
    pinned.add(first.peer)
    assert view.merge(first, envelope, origin="x")
    assert view.merge(*signed("10.0.0.2"), origin="x")
    assert view.merge(*signed("10.0.0.3"), origin="x")
    # A pinned newcomer (a peer we are connected to) passes every cap...
    chained, envelope = signed("10.0.0.3")
    pinned.add(chained.peer)
    assert view.merge(chained, envelope, origin="x")
    peers = {r.peer for r in view.records()}
    # ...and the place it took was not another pinned peer's.
    assert first.peer in peers and chained.peer in peers and len(peers) == 3


def test_expired_records_give_their_place_back() -> None:
    view = SwarmView(MODEL, None, room=ViewRoom(max_records=10, max_per_origin=1, max_per_host=10))
    record, envelope = signed()
    assert view.merge(record, envelope, origin="x")
    assert not view.merge(*signed(), origin="x")
    view._records[record.peer] = dataclasses.replace(record, expires=time.time() - 1)
    assert view.purge_expired() == [record.peer]
    assert view.merge(*signed(), origin="x")
    assert len(view.room) == 1


def peer_id() -> ID:
    return ID.from_pubkey(create_new_key_pair().public_key)


def test_the_peer_table_never_evicts_us_or_our_connections() -> None:
    key_pair = create_new_key_pair()
    own = ID.from_pubkey(key_pair.public_key)
    store = PinnedPeerStore(own, max_peers=100)
    store.add_key_pair(own, key_pair)  # no addresses: py-libp2p would evict it first
    connected = peer_id()
    store.add_addrs(connected, [Multiaddr("/ip4/127.0.0.1/tcp/1")], 0)
    store.keep = lambda p: p == connected
    for i in range(1000):
        store.add_addrs(peer_id(), [Multiaddr(f"/ip4/10.0.{i // 250}.{i % 250}/tcp/4001")], 120)
        assert len(store.peer_data_map) <= 100
    assert store.has_peer(own) and store.privkey(own) is not None
    assert store.has_peer(connected)
    # Each pass trims to 90% of the cap: a flood of 1,000 costs about 1,000 / 10 passes.
    assert store.evicted == 1000 + 2 - len(store.peer_data_map)
