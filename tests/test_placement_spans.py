"""Tests for shardmesh.placement.spans: coverage, gaps and the bottleneck of a swarm."""

from __future__ import annotations

from shardmesh.placement.spans import ServerView, block_throughput, bottleneck, coverage, gaps, is_complete, valid_span


def sv(peer: str, start: int, end: int, throughput: float = 100.0, **kw) -> ServerView:
    return ServerView(peer, start, end, throughput, **kw)


def test_full_chain() -> None:
    swarm = [sv("a", 0, 4, 10.0), sv("b", 4, 8, 20.0), sv("c", 8, 12, 30.0)]
    assert block_throughput(swarm, 12) == [10.0] * 4 + [20.0] * 4 + [30.0] * 4
    assert coverage(swarm, 12) == [1] * 12
    assert gaps(swarm, 12) == []
    assert is_complete(swarm, 12)
    assert bottleneck(swarm, 12) == 10.0


def test_overlaps_add_up() -> None:
    swarm = [sv("a", 0, 8, 10.0), sv("b", 4, 12, 5.0), sv("c", 0, 12, 1.0)]
    assert block_throughput(swarm, 12) == [11.0] * 4 + [16.0] * 4 + [6.0] * 4
    assert coverage(swarm, 12) == [2] * 4 + [3] * 4 + [2] * 4
    assert bottleneck(swarm, 12) == 6.0


def test_gaps_at_start_middle_and_end() -> None:
    swarm = [sv("a", 2, 4), sv("b", 6, 9), sv("c", 7, 10)]
    assert gaps(swarm, 12) == [(0, 2), (4, 6), (10, 12)]
    assert coverage(swarm, 12) == [0, 0, 1, 1, 0, 0, 1, 2, 2, 1, 0, 0]
    assert not is_complete(swarm, 12)
    assert bottleneck(swarm, 12) == 0.0


def test_empty_swarm_is_one_gap() -> None:
    assert gaps([], 5) == [(0, 5)]
    assert block_throughput([], 3) == [0.0, 0.0, 0.0]
    assert bottleneck([], 5) == 0.0
    assert not is_complete([], 5)


def test_only_online_servers_count() -> None:
    swarm = [
        sv("a", 0, 6, state="joining"),
        sv("b", 6, 12, state="draining"),
        sv("c", 0, 6, 7.0),
    ]
    assert coverage(swarm, 12) == [1] * 6 + [0] * 6
    assert block_throughput(swarm, 12) == [7.0] * 6 + [0.0] * 6
    assert gaps(swarm, 12) == [(6, 12)]
    assert bottleneck(swarm, 12) == 0.0


def test_bad_spans_are_ignored_not_fatal() -> None:
    bad = [sv("neg", -1, 3), sv("long", 2, 13), sv("empty", 5, 5), sv("backwards", 8, 6)]
    assert not any(valid_span(s, 12) for s in bad)
    assert coverage(bad, 12) == [0] * 12
    assert gaps([*bad, sv("ok", 0, 12)], 12) == []
    assert bottleneck([*bad, sv("ok", 0, 12, 3.0)], 12) == 3.0


def test_broken_throughput_adds_nothing() -> None:
    # A negative or NaN figure in someone's record must not drag the others' sum down.
    swarm = [sv("a", 0, 4, 10.0), sv("b", 0, 4, -50.0), sv("c", 0, 4, float("nan"))]
    assert block_throughput(swarm, 4) == [10.0] * 4
    assert coverage(swarm, 4) == [3] * 4  # they still hold the blocks


def test_zero_blocks() -> None:
    assert coverage([sv("a", 0, 1)], 0) == []
    assert gaps([], 0) == []
    assert not is_complete([], 0)
    assert bottleneck([], 0) == 0.0


def test_views_stay_hashable() -> None:
    a = sv("a", 0, 4, rtt_ms={"b": 1.0})
    assert a == sv("a", 0, 4, rtt_ms={"b": 1.0})
    assert a != sv("a", 0, 4, rtt_ms={"b": 2.0})
    assert len({a, sv("a", 0, 4, rtt_ms={"b": 1.0})}) == 1


def test_repair_tells_a_gap_being_filled_from_one_nobody_fills() -> None:
    from shardmesh.placement.spans import JOINING, repair

    served = [ServerView("a", 0, 2, 1.0)]
    assert repair(served + [ServerView("b", 2, 4, 1.0)], 4).gaps == []
    stuck = repair(served, 4)
    assert (stuck.gaps, stuck.unfilled, stuck.under_way, stuck.may_heal) == ([(2, 4)], [(2, 4)], False, True)
    half = repair(served + [ServerView("b", 2, 3, 1.0, state=JOINING)], 4)
    assert half.unfilled == [(3, 4)] and not half.under_way
    filling = repair(served + [ServerView("b", 1, 4, 1.0, state=JOINING)], 4)
    assert filling.unfilled == [] and filling.under_way
    nothing = repair([], 4)
    assert not nothing.served and not nothing.may_heal  # nothing to heal: a 503 at once
    assert repair([ServerView("b", 0, 4, 1.0, state=JOINING)], 4).may_heal  # a first node loading
