"""Tests for shardmesh.placement.rebalance: when a serving node moves, and that it settles.

Hand-made swarms of 12 blocks for each rule (hysteresis, gaps, safety, planned vs
online), then random swarms: plan_move against a plain reading of the documented rule,
and moves applied one after another until nobody wants to move.
"""

from __future__ import annotations

import random

import pytest

from shardmesh.placement.rebalance import MARGIN, BlockSums, check_interval, move_target, plan_move
from shardmesh.placement.spans import ServerView, valid_span


def sv(peer: str, start: int, end: int, throughput: float = 100.0, **kw) -> ServerView:
    return ServerView(peer, start, end, throughput, **kw)


def moves(swarm, me, capacity=6, total=12, **kw):
    return plan_move(swarm, total, me, capacity, **kw)


# ---------------------------------------------------------------- hysteresis


def test_balanced_swarm_stays() -> None:
    swarm = [sv("a", 0, 6), sv("b", 6, 12), sv("c", 0, 6), sv("d", 6, 12)]
    assert [moves(swarm, p) for p in "abcd"] == [None] * 4


def test_moving_would_only_swap_the_imbalance() -> None:
    # 200 | 100: c moving to the right half would make it 100 | 200, no better.
    swarm = [sv("a", 0, 6), sv("b", 6, 12), sv("c", 0, 6)]
    assert moves(swarm, "c") is None


def test_margin_is_the_hysteresis() -> None:
    # c (throughput 19) sits on the left half; without it the left keeps a's 100. It
    # moves only when the right half is weaker than 100 by more than the margin.
    def swarm(right: float):
        return [sv("a", 0, 6, 100.0), sv("b", 6, 12, right), sv("c", 0, 6, 19.0)]

    assert MARGIN == pytest.approx(0.1)
    assert moves(swarm(91.0), "c") is None  # 91 >= 0.9 * 100
    assert moves(swarm(90.0), "c") is None  # not *more* than the margin
    assert moves(swarm(89.0), "c") == (6, 12)
    assert moves(swarm(99.0), "c", margin=0.0) == (6, 12)
    assert moves(swarm(99.0), "c", margin=0.05) is None
    with pytest.raises(ValueError):
        moves(swarm(50.0), "c", margin=1.0)


def test_big_swarm_moves_on_imbalance_not_on_its_own_weight() -> None:
    # 100 nodes of 10 on each half, the right half 20 % thinner: one node cannot lift
    # the bottleneck by 20 %, but the imbalance is clear, so a left node moves.
    swarm = [sv(f"l{i}", 0, 6, 10.0) for i in range(100)]
    swarm += [sv(f"r{i}", 6, 12, 10.0) for i in range(80)]
    assert moves(swarm, "l7") == (6, 12)
    assert moves(swarm, "r7") is None
    # 5 % thinner: within the margin, nobody moves.
    swarm = swarm[:100] + [sv(f"r{i}", 6, 12, 10.0) for i in range(95)]
    assert moves(swarm, "l7") is None


# ---------------------------------------------------------------- gaps


def test_moves_into_gap_left_by_departed_node() -> None:
    swarm = [sv("a", 0, 6), sv("b", 6, 12), sv("c", 0, 6), sv("d", 0, 6)]
    gone = [s for s in swarm if s.peer != "b"]
    assert moves(gone, "d") == (6, 12)
    # d announces the move (joining): the gap is planned for, c stays.
    moved = [sv("a", 0, 6), sv("c", 0, 6), sv("d", 6, 12, state="joining")]
    assert moves(moved, "c") is None
    assert moves(moved, "d") is None  # a joining node does not move again


def test_lopsided_swarm_rebalances() -> None:
    # 300 | 100 without a gap: c or d moving makes it 200 | 200.
    swarm = [sv("a", 0, 6), sv("b", 6, 12), sv("c", 0, 6), sv("d", 0, 6)]
    assert moves(swarm, "c") == (6, 12)
    assert moves(swarm, "b") is None


def test_never_leaves_a_block_no_other_online_server_holds() -> None:
    # Blocks 6..11 have no server. a would fill them, but the only other holder of its
    # own blocks is still joining: moving now would leave 0..5 unserved meanwhile.
    swarm = [sv("a", 0, 6), sv("a2", 0, 6, state="joining")]
    assert moves(swarm, "a") is None
    swarm[1] = sv("a2", 0, 6)  # a2 is online now
    assert moves(swarm, "a") == (6, 12)
    # The sole server of some blocks stays, however weak the rest.
    swarm = [sv("a", 0, 6, 1000.0), sv("b", 6, 12, 1.0)]
    assert moves(swarm, "a") is None


def test_partial_overlap_keeps_sole_blocks() -> None:
    # a is the only server of 0..1; its best window without it still covers them.
    swarm = [sv("a", 0, 6, 100.0), sv("b", 2, 12, 100.0), sv("c", 2, 6, 100.0)]
    assert moves(swarm, "a") is None


def test_does_not_leave_blocks_whose_servers_are_still_loading() -> None:
    # Planned, the left half holds 300 without c and the right 100. But two of the
    # left's servers are joining: online, c's blocks would keep only 100.
    swarm = [sv("a", 0, 6), sv("j1", 0, 6, state="joining"), sv("j2", 0, 6, state="joining"),
             sv("c", 0, 6), sv("b", 6, 12)]
    assert moves(swarm, "c") is None
    swarm[1:3] = [sv("j1", 0, 6), sv("j2", 0, 6)]
    assert moves(swarm, "c") == (6, 12)


def test_only_online_nodes_move() -> None:
    gone = [sv("a", 0, 6), sv("c", 0, 6)]
    assert moves(gone, "c") == (6, 12)
    assert moves([sv("a", 0, 6), sv("c", 0, 6, state="draining")], "c") is None
    assert moves([sv("a", 0, 6), sv("c", 0, 6, state="joining")], "c") is None
    assert moves(gone, "stranger") is None
    assert moves([sv("a", 0, 6), sv("c", 0, 13)], "c") is None
    with pytest.raises(ValueError):
        moves(gone, "c", capacity=0)
    with pytest.raises(ValueError):
        moves(gone, "stranger", capacity=0)


def test_node_without_throughput_only_fills_gaps() -> None:
    swarm = [sv("a", 0, 6), sv("b", 6, 12, 10.0), sv("c", 0, 6, 0.0)]
    assert moves(swarm, "c") is None  # it would not make 6..11 any stronger
    assert moves([sv("a", 0, 6), sv("c", 0, 6, 0.0)], "c") == (6, 12)  # but it covers a gap


def test_capacity_sets_the_new_span_length() -> None:
    gone = [sv("a", 0, 6), sv("c", 0, 6)]
    assert moves(gone, "c", capacity=4) == (6, 10)
    assert moves(gone, "c", capacity=99) == (0, 12)  # room for the whole model


# ---------------------------------------------------------------- random swarms


def _reference(swarm, total, me, capacity, margin):
    """The documented rule, read plainly: brute force over windows, sums from scratch."""
    views = {s.peer: s for s in swarm}
    own = views.get(me)
    if own is None or own.state != "online" or not valid_span(own, total):
        return None
    others = [s for p, s in views.items() if p != me and valid_span(s, total)]
    planned = [s for s in others if s.state in ("online", "joining")]
    online = [s for s in others if s.state == "online"]

    def count(b, group):
        return sum(s.start <= b < s.end for s in group)

    def tput(b, group):
        return sum(s.throughput for s in group if s.start <= b < s.end and s.throughput > 0)

    n = min(capacity, total)

    def key(start):
        w = range(start, start + n)
        return (-sum(count(b, planned) == 0 for b in w), min(tput(b, planned) for b in w),
                sum(tput(b, planned) for b in w), start)

    to = min(range(total - n + 1), key=key)
    mine, target = range(own.start, own.end), range(to, to + n)
    if (to, to + n) == (own.start, own.end):
        return None
    if any(b not in target and count(b, online) == 0 for b in mine):
        return None
    gaps_now = sum(count(b, planned) == 0 and b not in mine for b in range(total))
    if not gaps_now and not own.throughput > 0:
        return None
    if gaps_now:
        gaps_after = sum(count(b, planned) == 0 and b not in target for b in range(total))
        return (to, to + n) if gaps_after < gaps_now else None
    weakest_there = min(tput(b, planned) for b in target)
    weakest_here = min(tput(b, online) for b in mine)
    return (to, to + n) if weakest_there < (1 - margin) * weakest_here else None


def _random_swarm(rng: random.Random, n: int, total: int, states=("online",) * 6 + ("joining", "draining")):
    swarm = []
    for i in range(n):
        length = rng.randint(1, total)
        start = rng.randint(0, total - length)
        swarm.append(sv(f"p{i}", start, start + length, float(rng.choice([0, 5, 10, 20, 40, 80])),
                        state=rng.choice(states)))
    return swarm


def test_matches_documented_rule_on_random_swarms() -> None:
    rng = random.Random(11)
    moved = 0
    for _ in range(1500):
        total = rng.randint(1, 12)
        swarm = _random_swarm(rng, rng.randint(1, 10), total)
        me = rng.choice(swarm).peer
        capacity = rng.randint(1, total + 2)
        margin = rng.choice([0.0, 0.1, 0.3])
        got = plan_move(swarm, total, me, capacity, margin=margin)
        assert got == _reference(swarm, total, me, capacity, margin), (swarm, me, capacity, margin)
        moved += got is not None
    assert moved > 100  # the comparison saw real moves, not just "stay"


def _potential(swarm, total):
    """What each move must raise: fewer planned gaps, then the sorted planned throughputs."""
    sums = BlockSums.of(swarm, total)
    return (-sums.planned_n.count(0), sorted(sums.planned_t))


def test_moves_one_after_another_reach_a_fixed_point() -> None:
    rng = random.Random(3)
    total_moves = 0
    for trial in range(60):
        total = rng.randint(4, 16)
        swarm = {s.peer: s for s in _random_swarm(rng, rng.randint(2, 12), total,
                                                   states=("online",) * 5 + ("joining",))}
        capacity = {p: s.end - s.start for p, s in swarm.items()}
        margin = rng.choice([0.0, 0.05, MARGIN])
        before = _potential(swarm.values(), total)
        for _ in range(500):  # passes; a fixed point comes long before
            order = sorted(swarm)
            rng.shuffle(order)
            changed = False
            for p in order:
                to = plan_move(swarm.values(), total, p, capacity[p], margin=margin)
                if to is None:
                    continue
                # The mover loads instantly here: the fixed point is about the rule.
                swarm[p] = sv(p, *to, swarm[p].throughput)
                after = _potential(swarm.values(), total)
                assert after > before, f"trial {trial}: a move that does not help"
                before, changed = after, True
                total_moves += 1
            if not changed:
                break
        else:
            pytest.fail(f"trial {trial}: still moving after 500 passes")
        assert all(plan_move(swarm.values(), total, p, capacity[p], margin=margin) is None for p in swarm)
    assert total_moves > 30  # the swarms did have something to settle


def test_core_takes_sums_the_simulator_keeps() -> None:
    swarm = [sv("a", 0, 6), sv("b", 6, 12), sv("c", 0, 6), sv("d", 0, 6)]
    sums = BlockSums.of(swarm, 12)
    assert sums.planned_n == [3] * 6 + [1] * 6 and sums.online_t == [300.0] * 6 + [100.0] * 6
    assert move_target(sums, 0, 6, 100.0, 6) == (6, 12)
    assert move_target(sums, 6, 12, 100.0, 6) is None


# ---------------------------------------------------------------- check interval


def test_check_interval_is_random_around_the_mean() -> None:
    rng = random.Random(1)
    xs = [check_interval(rng) for _ in range(2000)]
    assert all(15.0 <= x <= 45.0 for x in xs)
    assert 29.0 < sum(xs) / len(xs) < 31.0
    assert len(set(xs)) == len(xs)
    assert [check_interval(random.Random(7), 10.0) for _ in range(2)] == [check_interval(random.Random(7), 10.0)] * 2
    assert all(5.0 <= check_interval(rng, 10.0) <= 15.0 for _ in range(100))
