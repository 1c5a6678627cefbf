"""The swarm view on its own: merge by seq, our own record, expiry, change events.

No host and no network: records are really signed (and verified, as gossip or the DHT
would hand them in), and time is trio's MockClock, which the view reads as unix time
through its ``clock``, so expiries happen exactly when a test says.
"""

from __future__ import annotations

import dataclasses
import time

import pytest
import trio
import trio.testing
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from shardmesh.mesh.records import NodeRecord, server_view, sign_record, verify_record
from shardmesh.mesh.swarm_view import SwarmView, server_views

MODEL = "tiny@0123456789ab"


class Peer:
    """A key pair and the records it signs."""

    def __init__(self) -> None:
        self.key_pair = create_new_key_pair()
        self.id = ID.from_pubkey(self.key_pair.public_key).to_base58()

    def record(self, seq: int, expires: float, start: int = 0, end: int = 4, **changes) -> tuple[NodeRecord, bytes]:
        """A signed record and its envelope, verified as the view's callers would."""
        record = NodeRecord(
            peer=self.id, addrs=(), model=MODEL, start=start, end=end, total_blocks=12, state="online",
            throughput=10.0, cache_tokens_free=100, backend="torch", device="cpu", dtype="float32", rtt={},
            version="test", seq=seq, expires=expires,
        )  # fmt: skip
        envelope = sign_record(dataclasses.replace(record, **changes), self.key_pair)
        record = verify_record(envelope, now=record.expires - 1)  # verified while still valid
        return record, envelope


def mock_time_view(own: str | None = None) -> tuple[SwarmView, float]:
    """A view whose clock is trio's (mock) clock, shifted to unix time; and the unix time of trio time 0."""
    base = time.time() - trio.current_time()
    return SwarmView(MODEL, own, clock=lambda: base + trio.current_time()), base


def run_mocked(main) -> None:
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


async def changed_by(view: SwarmView, action) -> bool:
    """Does ``action()`` wake a waiter of ``view.wait_changed``? (timeout: one mock second)"""
    woken: list[bool] = []

    async def wait() -> None:
        woken.append(await view.wait_changed(timeout=1))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait)
        await trio.testing.wait_all_tasks_blocked()
        action()
    return woken[0]


def test_highest_seq_wins_per_peer() -> None:
    a, b = Peer(), Peer()
    view = SwarmView(MODEL, None)
    soon = time.time() + 30
    five, six, four = a.record(5, soon), a.record(6, soon, state="draining"), a.record(4, soon)
    assert view.merge(*five)
    assert not view.merge(*five)  # the same seq again: nothing new
    assert not view.merge(*four)  # an older one never replaces a newer one
    assert view.get(a.id).seq == 5
    assert view.merge(*six)
    assert not view.merge(*five)
    assert view.get(a.id).seq == 6 and view.get(a.id).state == "draining"
    b_one = b.record(1, soon, start=4, end=8)
    assert view.merge(*b_one)
    assert [r.peer for r in view.records()] == sorted([a.id, b.id])
    # The envelopes handed on are those of the records kept, exactly as received, in the same order.
    envelope_of = {a.id: six[1], b.id: b_one[1]}
    assert view.signed_records() == [envelope_of[r.peer] for r in view.records()]
    # Another model's record, or one expired already, never gets in.
    c = Peer()
    assert not view.merge(*c.record(1, soon, model="other@ffffffffffff"))
    assert not view.merge(*c.record(1, time.time() - 1))
    assert view.get(c.id) is None


def test_own_record_only_from_set_own() -> None:
    me, other = Peer(), Peer()
    view = SwarmView(MODEL, me.id)
    soon = time.time() + 30
    # Someone hands in "our" record (it is really signed by us: an old one, replayed).
    assert not view.merge(*me.record(10**9, soon, state="draining"))
    assert view.get(me.id) is None and view.own_record() is None
    mine = me.record(1, soon)
    view.set_own(*mine)
    assert view.get(me.id).seq == 1 and view.own_record().state == "online"
    assert not view.merge(*me.record(10**9, soon, state="draining"))
    assert view.get(me.id).seq == 1
    assert view.signed_records() == [mine[1]]
    with pytest.raises(ValueError):
        view.set_own(*other.record(1, soon))
    # An observer (no record of its own) takes every peer's record from outside.
    observer = SwarmView(MODEL, None)
    assert observer.merge(*me.record(2, soon))
    with pytest.raises(ValueError):
        observer.set_own(*me.record(3, soon))


def test_records_are_purged_at_their_expiry() -> None:
    async def main() -> None:
        me, a, b, c = Peer(), Peer(), Peer(), Peer()
        view, base = mock_time_view(own=me.id)
        view.set_own(*me.record(1, base + 1))  # ours: the registry re-signs it, it is never purged
        view.merge(*a.record(1, base + 5))
        view.merge(*b.record(1, base + 10, start=4, end=8))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(view.purge_loop)
            await trio.sleep(4.9)
            assert view.stats.expired_purged == 0 and a.id in view._records
            await trio.sleep(0.2)  # 5.1: a is gone from the table, not just hidden
            assert a.id not in view._records and view.stats.expired_purged == 1
            assert {r.peer for r in view.records()} == {b.id}  # ours has expired too: hidden, kept
            assert view.own_record() is not None
            # A record that expires before the loop's next wake-up cuts its sleep short.
            view.merge(*c.record(1, base + 7))
            await trio.sleep(2.0)  # 7.1
            assert c.id not in view._records and view.stats.expired_purged == 2
            assert b.id in view._records
            await trio.sleep(3.0)  # 10.1
            assert b.id not in view._records and view.stats.expired_purged == 3
            assert view.own_record() is not None and view.signed_records() == []
            nursery.cancel_scope.cancel()

    run_mocked(main)


def test_change_events_only_when_content_changes() -> None:
    async def main() -> None:
        me, a = Peer(), Peer()
        view, base = mock_time_view(own=me.id)
        assert await changed_by(view, lambda: view.set_own(*me.record(1, base + 30)))
        assert not await changed_by(view, lambda: view.set_own(*me.record(2, base + 31)))  # our refresh
        assert await changed_by(view, lambda: view.merge(*a.record(1, base + 30)))  # a peer appears
        # A refresh: new seq, new expiry, new RTTs (they jitter on every measurement).
        assert not await changed_by(view, lambda: view.merge(*a.record(2, base + 32, rtt={me.id: 3.5})))
        assert await changed_by(view, lambda: view.merge(*a.record(3, base + 33, state="draining")))
        assert await changed_by(view, lambda: view.merge(*a.record(4, base + 34, state="draining", cache_tokens_free=7)))
        assert await changed_by(view, lambda: view.set_own(*me.record(3, base + 35, start=4, end=8)))
        # Not merged (an old seq): no change either.
        assert not await changed_by(view, lambda: view.merge(*a.record(1, base + 30, state="online")))
        # A peer leaving is a change: the purge loop wakes waiters when it drops a.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(view.purge_loop)
            with trio.fail_after(40):
                assert await view.wait_changed()
            assert view.get(a.id) is None and trio.current_time() >= 34
            nursery.cancel_scope.cancel()

    run_mocked(main)


def test_servers_are_the_live_records_that_serve_blocks() -> None:
    a, b, gateway, gone = Peer(), Peer(), Peer(), Peer()
    view = SwarmView(MODEL, None)
    soon = time.time() + 30
    view.merge(*a.record(1, soon, start=0, end=6, rtt={b.id: 2.0}))
    view.merge(*b.record(1, soon, start=6, end=12, state="joining"))
    view.merge(*gateway.record(1, soon, start=0, end=0))
    view._records[gone.id] = dataclasses.replace(a.record(1, soon)[0], peer=gone.id, expires=time.time() - 1)
    assert {s.peer for s in view.servers()} == {a.id, b.id}
    assert view.servers() == [server_view(r) for r in view.records() if r.end > r.start]
    assert view.servers() == server_views(view.records())
    assert [r.peer for r in view.peers_serving(7)] == [b.id]
    assert view.peers_serving(12) == []
    assert {r.peer for r in view.records()} == {a.id, b.id, gateway.id}
