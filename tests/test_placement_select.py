"""Tests for shardmesh.placement.select: where a joining node goes.

Swarms of 12 blocks, throughputs chosen so that the right window can be worked out by
hand; a brute-force scan of every window checks the one-pass search on random lists.
"""

from __future__ import annotations

import random

import pytest

from shardmesh.placement.select import best_start, choose_span, planned, planned_blocks
from shardmesh.placement.spans import ServerView


def sv(peer: str, start: int, end: int, throughput: float = 100.0, **kw) -> ServerView:
    return ServerView(peer, start, end, throughput, **kw)


# ---------------------------------------------------------------- gaps first


def test_gap_is_filled_before_any_weak_block() -> None:
    # Blocks 4..7 have no server; 0..3 are far weaker than 8..11 but still covered.
    swarm = [sv("a", 0, 4, 1.0), sv("b", 8, 12, 1000.0)]
    assert choose_span(swarm, 12, 4) == (4, 8)


def test_window_covering_most_gap_blocks_wins() -> None:
    # Gaps at 4..5 (two blocks) and 9..11 (three).
    swarm = [sv("a", 0, 4), sv("b", 6, 9)]
    assert choose_span(swarm, 12, 3) == (9, 12)  # all three of the second gap
    assert choose_span(swarm, 12, 2) == (4, 6)  # two either way: the lowest start
    # Three gap blocks is the most 6 blocks can cover ((4,10), (5,11), (6,12)); all hold
    # b's three blocks too, so the lowest start wins.
    assert choose_span(swarm, 12, 6) == (4, 10)


def test_empty_swarm_starts_at_zero() -> None:
    assert choose_span([], 12, 5) == (0, 5)
    assert choose_span([], 12, 50) == (0, 12)  # room for more than the model: all of it


# ---------------------------------------------------------------- weakest window


def test_weakest_block_first_then_weakest_window() -> None:
    # Block throughputs: 100 100 100 95 200 200 300 ... The window with the smallest sum,
    # (0, 3) at 300, misses block 3, the weakest; of the windows holding block 3,
    # (1, 4) is the thinnest (295).
    swarm = [sv("a", 0, 3, 100.0), sv("e", 3, 4, 95.0), sv("f", 4, 6, 200.0), sv("g", 6, 12, 300.0)]
    assert planned_blocks(swarm, 12)[1][:7] == [100.0, 100.0, 100.0, 95.0, 200.0, 200.0, 300.0]
    assert choose_span(swarm, 12, 3) == (1, 4)
    assert choose_span(swarm, 12, 1) == (3, 4)


def test_broken_throughput_holds_blocks_but_adds_nothing() -> None:
    swarm = [sv("a", 0, 12, 100.0), sv("nan", 0, 6, float("nan")), sv("neg", 6, 12, -50.0)]
    assert planned_blocks(swarm, 12) == ([2] * 12, [100.0] * 12)
    assert choose_span([*swarm, sv("zero", 0, 6, 0.0), sv("b", 6, 12, 1.0)], 12, 6) == (0, 6)


def test_ties_go_to_the_lowest_start() -> None:
    swarm = [sv("a", 0, 12), sv("b", 0, 6)]  # 200 x 6, then 100 x 6
    assert choose_span(swarm, 12, 3) == (6, 9)
    assert choose_span(swarm, 12, 6) == (6, 12)


def test_float_noise_does_not_break_ties() -> None:
    # 0.1 + 0.2 != 0.3 in floats: equal windows must still go to the lowest start.
    swarm = [sv("a", 0, 6, 0.1), sv("b", 0, 6, 0.2), sv("c", 6, 12, 0.3)]
    assert choose_span(swarm, 12, 6) == (0, 6)


# ---------------------------------------------------------------- what counts


def test_without_leaves_own_record_out() -> None:
    # With "me" counted, blocks 6..11 are the weak ones; without me, both halves hold
    # 50 and the lowest start wins.
    swarm = [sv("me", 0, 6, 100.0), sv("b", 0, 12, 50.0)]
    assert choose_span(swarm, 12, 6) == (6, 12)
    assert choose_span(swarm, 12, 6, without="me") == (0, 6)


def test_joining_counts_as_planned_draining_does_not() -> None:
    swarm = [sv("a", 0, 6), sv("b", 6, 12, state="joining")]
    assert [s.peer for s in planned(swarm)] == ["a", "b"]
    assert choose_span(swarm, 12, 6) == (0, 6)  # no gap: b is on its way
    swarm = [sv("a", 0, 6), sv("b", 6, 12, state="draining")]
    assert [s.peer for s in planned(swarm)] == ["a"]
    assert choose_span(swarm, 12, 6) == (6, 12)  # b's blocks are a gap already


def test_one_view_per_peer_the_later_wins() -> None:
    swarm = [sv("a", 0, 6), sv("b", 6, 12), sv("a", 6, 12)]  # a moved
    assert planned(swarm) == [sv("a", 6, 12), sv("b", 6, 12)]
    assert choose_span(swarm, 12, 6) == (0, 6)


def test_bad_spans_ignored() -> None:
    swarm = [sv("neg", -2, 6), sv("long", 6, 13), sv("ok", 0, 6)]
    assert choose_span(swarm, 12, 6) == (6, 12)


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError):
        choose_span([], 12, 0)
    with pytest.raises(ValueError):
        best_start([0, 0], [0.0, 0.0], 3)
    with pytest.raises(ValueError):
        best_start([0], [0.0, 0.0], 1)


# ---------------------------------------------------------------- against brute force


def _brute(counts: list[int], tput: list[int], n: int) -> int:
    def key(s: int):
        window = range(s, s + n)
        return (-sum(counts[b] == 0 for b in window), min(tput[b] for b in window),
                sum(tput[b] for b in window), s)
    return min(range(len(tput) - n + 1), key=key)


def test_matches_brute_force_on_random_lists() -> None:
    rng = random.Random(5)
    for _ in range(2000):
        total = rng.randint(1, 16)
        counts = [rng.choice([0, 0, 1, 2, 3]) for _ in range(total)]
        # Integers: the brute force compares exactly, and many ties arise.
        tput = [0 if c == 0 else rng.choice([0, 5, 10, 10, 20, 30]) for c in counts]
        n = rng.randint(1, total)
        assert best_start(counts, tput, n) == _brute(counts, tput, n), (counts, tput, n)
