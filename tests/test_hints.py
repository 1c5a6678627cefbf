"""Suspicion as a hint (mesh/hints.py): who is checked, how often, and that only our own
check marks a peer. The end-to-end case (a real node naming a killed peer in its record,
a gateway marking it) is in test_liveness.py."""

from __future__ import annotations

import dataclasses

import pytest
import trio
import trio.testing

from shardmesh.mesh.hints import RECHECK, confirm, follow_hints, hinted, own_suspects
from shardmesh.mesh.liveness import Liveness
from shardmesh.mesh.record_checks import MAX_SUSPECTS
from shardmesh.mesh.records import NodeRecord, RecordError, sign_record, verify_record


def record(peer: str, start: int = 0, end: int = 2, suspects: tuple[str, ...] = ()) -> NodeRecord:
    return NodeRecord(peer=peer, addrs=(), model="m@0", start=start, end=end, total_blocks=4, state="online",
                      throughput=1.0, cache_tokens_free=0, backend="torch", device="cpu", dtype="float32", rtt={},
                      version="0", seq=1, expires=0.0, suspects=suspects)  # fmt: skip


def test_own_suspects_are_the_latest_marks_among_serving_peers() -> None:
    liveness = Liveness()
    for i in range(MAX_SUSPECTS + 3):
        liveness.mark(f"p{i}", now=100.0 + i)
    liveness.mark("gone", now=500.0)  # not serving in our view: not worth naming
    own = own_suspects(liveness, [f"p{i}" for i in range(MAX_SUSPECTS + 3)])
    assert own == tuple(f"p{i}" for i in reversed(range(3, MAX_SUSPECTS + 3)))


def test_hinted_suspects_are_checked_once_per_recheck_and_only_if_we_route_to_them() -> None:
    liveness = Liveness()
    view = [
        record("me", 0, 2, suspects=("b",)),  # our own word is not a hint to ourselves
        record("a", 0, 2, suspects=("b", "c", "me", "stranger")),
        record("z", 0, 2, suspects=("b",)),
        record("b", 2, 4),
        record("c", 2, 4),
        record("g", 0, 0, suspects=("c",)),  # a gateway's hint counts as much as anyone's
    ]
    checked: dict[str, float] = {}
    assert hinted(view, "me", liveness, checked, now=50.0) == ["b", "c"]  # not us, not a peer we do not know
    checked.update(b=50.0, c=50.0)
    assert hinted(view, "me", liveness, checked, now=50.0 + RECHECK - 1) == []
    assert hinted(view, "me", liveness, checked, now=50.0 + RECHECK) == ["b", "c"]
    liveness.mark("b", now=60.0)
    assert hinted(view, "me", liveness, {}, now=70.0) == ["c"]  # already marked here: nothing to confirm
    assert hinted([record("me", suspects=("b",)), record("b", 2, 4)], "me", Liveness(), {}, now=0.0) == []


def test_confirm_marks_only_on_our_own_failed_check() -> None:
    liveness = Liveness()

    async def main() -> None:
        async def refused(peer: str) -> None:
            raise OSError("connection refused")

        async def dialled(peer: str) -> None:
            return None

        async def silent(peer: str) -> bool:
            return False

        async def answering(peer: str) -> bool:
            return True

        await confirm("up", lambda p: False, silent, dialled, liveness, lambda: 1.0)  # not connected: dial, it works
        await confirm("frozen", lambda p: True, silent, refused, liveness, lambda: 2.0)  # connected: ping, no answer
        await confirm("dead", lambda p: False, answering, refused, liveness, lambda: 3.0)  # dial refused
        await confirm("busy", lambda p: True, answering, refused, liveness, lambda: 4.0)  # answers its ping

    trio.run(main)
    assert liveness.unreachable() == {"frozen", "dead"}


def test_follow_hints_publishes_own_marks_and_checks_others() -> None:
    liveness = Liveness()
    view = [record("me", 0, 2), record("a", 0, 2, suspects=("b",)), record("b", 2, 4), record("c", 2, 4)]
    published: list[tuple[str, ...]] = []
    checks: list[tuple[float, str]] = []

    async def check(peer: str) -> None:
        checks.append((trio.current_time(), peer))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow_hints, "me", lambda: view, liveness, check, published.append, trio.current_time)
            await trio.sleep(0.5)
            liveness.mark("c", trio.current_time())
            await trio.sleep(RECHECK + 2)
            liveness.clear("c")
            await trio.sleep(2)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert published == [("c",), ()]  # named while marked, withdrawn once cleared
    assert [peer for _, peer in checks] == ["b", "b"] and checks[1][0] - checks[0][0] == pytest.approx(RECHECK, abs=1.01)


def test_a_record_names_at_most_eight_other_suspects() -> None:
    from libp2p.crypto.ed25519 import create_new_key_pair

    from shardmesh.mesh.host import peer_id_of

    key = create_new_key_pair()
    me = peer_id_of(key).to_base58()
    good = dataclasses.replace(record(me, suspects=("12D3KooWsomeone",)), expires=10**10)
    assert verify_record(sign_record(good, key), now=10**10 - 20).suspects == ("12D3KooWsomeone",)
    for bad in (tuple(f"p{i}" for i in range(MAX_SUSPECTS + 1)), (me,), ("x" * 300,)):
        with pytest.raises(RecordError, match="suspects"):
            sign_record(dataclasses.replace(good, suspects=bad), key)
