"""Tests for shardmesh.placement.routing: the cheapest chain, its costs, and back-off.

Unless a test says otherwise the gateway is "G" (not a server), every RTT is the
default 2 ms and each hop adds 0.5 ms, so a route's cost can be worked out by hand.
A reference Dijkstra that enumerates every edge checks the fast search on random swarms.
"""

from __future__ import annotations

import heapq
import random

import pytest

from shardmesh.placement.routing import CACHE_PENALTY_MS, RELAY_PENALTY_MS, FailureBackoff, Hop, find_route, route_cost
from shardmesh.placement.spans import ServerView, valid_span


def sv(peer: str, start: int, end: int, throughput: float = 100.0, **kw) -> ServerView:
    return ServerView(peer, start, end, throughput, **kw)


def route(swarm, total=12, **kw):
    return find_route(swarm, total, origin=kw.pop("origin", "G"), **kw)


def cost(hops, swarm, **kw):
    return route_cost(hops, swarm, origin=kw.pop("origin", "G"), **kw)


# ---------------------------------------------------------------- basic chains


def test_full_chain_in_order() -> None:
    swarm = [sv("C", 8, 12), sv("A", 0, 4), sv("B", 4, 8)]
    hops = route(swarm)
    assert hops == [Hop("A", 0, 4), Hop("B", 4, 8), Hop("C", 8, 12)]
    # 3 hops × (2 ms RTT + 0.5 ms overhead + 4 blocks × 10 ms) + 2 ms back to G
    assert cost(hops, swarm) == pytest.approx(3 * 42.5 + 2)


def test_gap_means_no_route() -> None:
    assert route([sv("A", 0, 4), sv("C", 8, 12)]) is None
    assert route([sv("A", 0, 11)]) is None
    assert route([]) is None
    assert route([sv("A", 0, 12)], total=0) is None


def test_bad_spans_and_dead_throughput_are_skipped() -> None:
    broken = [sv("a", -1, 12), sv("b", 0, 13), sv("c", 6, 6), sv("d", 0, 12, 0.0),
              sv("e", 0, 12, -5.0), sv("f", 0, 12, float("nan"))]
    assert route(broken) is None
    assert route([*broken, sv("z", 0, 12)]) == [Hop("z", 0, 12)]


# ---------------------------------------------------------------- overlaps


def test_overlap_uses_the_fast_server_as_far_as_it_goes() -> None:
    swarm = [sv("A", 0, 8, 200.0), sv("B", 4, 12, 100.0), sv("C", 0, 12, 10.0)]
    hops = route(swarm)
    assert hops == [Hop("A", 0, 8), Hop("B", 8, 12)]
    # A: 2 + 0.5 + 8 × 5 ms; B: 2 + 0.5 + 4 × 10 ms; back: 2
    assert cost(hops, swarm) == pytest.approx(87.0)
    assert cost([Hop("A", 0, 4), Hop("B", 4, 12)], swarm) == pytest.approx(107.0)
    assert cost([Hop("C", 0, 12)], swarm) == pytest.approx(1204.5)


def test_overlap_hands_over_early_when_the_second_is_faster() -> None:
    swarm = [sv("A", 0, 8, 100.0), sv("B", 4, 12, 200.0), sv("C", 0, 12, 10.0)]
    assert route(swarm) == [Hop("A", 0, 4), Hop("B", 4, 12)]


def test_one_fast_server_beats_two_hops() -> None:
    swarm = [sv("A", 0, 8, 200.0), sv("B", 4, 12, 100.0), sv("C", 0, 12, 1000.0)]
    hops = route(swarm)
    assert hops == [Hop("C", 0, 12)]
    assert cost(hops, swarm) == pytest.approx(16.5)


def test_a_peer_may_return_later_in_the_chain_but_never_twice_in_a_row() -> None:
    # A holds everything but B is ten times faster on the middle blocks: A, B, A wins.
    swarm = [sv("A", 0, 12, 100.0), sv("B", 4, 8, 1000.0)]
    hops = route(swarm)
    assert hops == [Hop("A", 0, 4), Hop("B", 4, 8), Hop("A", 8, 12)]
    assert cost(hops, swarm) == pytest.approx(93.5)
    for x, y in zip(hops, hops[1:]):
        assert x.peer != y.peer


def test_same_peer_twice_later_view_wins() -> None:
    old, new = sv("A", 0, 6), sv("A", 0, 12)
    assert route([old, new]) == [Hop("A", 0, 12)]
    assert route([new, old]) is None  # A now holds 0:6 only, and A:A is one hop anyway


# ---------------------------------------------------------------- who may serve


def test_exclude() -> None:
    swarm = [sv("A", 0, 12, 200.0), sv("B", 0, 12, 100.0)]
    assert route(swarm) == [Hop("A", 0, 12)]
    assert route(swarm, exclude={"A"}) == [Hop("B", 0, 12)]
    assert route(swarm, exclude=["A", "B"]) is None


def test_joining_and_draining_are_not_routed_to() -> None:
    swarm = [sv("A", 0, 12, 900.0, state="draining"), sv("B", 0, 12, 900.0, state="joining")]
    assert route(swarm) is None
    assert route([*swarm, sv("C", 0, 12, 10.0)]) == [Hop("C", 0, 12)]


# ---------------------------------------------------------------- ties


def test_equal_cost_is_settled_by_peer_id() -> None:
    swarm = [sv("b", 0, 12), sv("a", 0, 12), sv("c", 0, 12)]
    assert route(swarm) == [Hop("a", 0, 12)]
    assert route(swarm[::-1]) == [Hop("a", 0, 12)]


def test_equal_cost_hand_over_point_is_stable() -> None:
    # Any hand-over at 4..8 costs the same; the search keeps the earliest one.
    swarm = [sv("A", 0, 8), sv("B", 4, 12)]
    assert route(swarm) == [Hop("A", 0, 4), Hop("B", 4, 12)]
    assert route(swarm[::-1]) == [Hop("A", 0, 4), Hop("B", 4, 12)]


# ---------------------------------------------------------------- load and cache


def test_load_inflates_compute() -> None:
    swarm = [sv("A", 0, 12, 150.0, load=1.0), sv("B", 0, 12, 100.0, load=0.0)]
    assert route(swarm) == [Hop("B", 0, 12)]  # A is effectively 75 tokens/s
    assert cost([Hop("A", 0, 12)], swarm) == pytest.approx(2 + 0.5 + 12 * 2000 / 150 + 2)


def test_cache_penalty_prefers_a_server_with_room() -> None:
    swarm = [sv("A", 0, 12, 200.0, cache_tokens_free=100),
             sv("B", 0, 12, 100.0, cache_tokens_free=10_000)]
    assert route(swarm, tokens_needed=100) == [Hop("A", 0, 12)]  # exactly enough room
    assert route(swarm, tokens_needed=500) == [Hop("B", 0, 12)]
    assert cost([Hop("A", 0, 12)], swarm, tokens_needed=500) == pytest.approx(
        2 + 0.5 + 60 + 2 + CACHE_PENALTY_MS)


def test_cache_penalty_still_routes_when_everyone_is_full() -> None:
    swarm = [sv("A", 0, 6, cache_tokens_free=0), sv("B", 6, 12, cache_tokens_free=0)]
    assert route(swarm, tokens_needed=1) == [Hop("A", 0, 6), Hop("B", 6, 12)]


def test_cache_penalty_is_per_hop_not_per_block() -> None:
    # A full server used for one long hop beats splitting onto a slow one with room.
    swarm = [sv("A", 0, 12, 100.0, cache_tokens_free=0), sv("B", 0, 12, 1.0, cache_tokens_free=99)]
    assert route(swarm, tokens_needed=50) == [Hop("A", 0, 12)]


# ---------------------------------------------------------------- RTT


def test_rtt_from_the_gateway_matters() -> None:
    # A would win the tie by id, but it is far from the gateway (its own measurement).
    swarm = [sv("A", 0, 12, rtt_ms={"G": 80.0}), sv("B", 0, 12, rtt_ms={"G": 5.0})]
    hops = route(swarm)
    assert hops == [Hop("B", 0, 12)]
    assert cost(hops, swarm) == pytest.approx(5 + 0.5 + 120 + 5)
    assert cost([Hop("A", 0, 12)], swarm) == pytest.approx(80 + 0.5 + 120 + 80)


def test_rtt_between_hops_matters() -> None:
    swarm = [sv("X", 0, 6, rtt_ms={"Y": 50.0, "Z": 1.0}), sv("Y", 6, 12), sv("Z", 6, 12)]
    assert route(swarm) == [Hop("X", 0, 6), Hop("Z", 6, 12)]


def test_rtt_sender_measurement_wins_then_receiver_then_default() -> None:
    swarm = [sv("X", 0, 6, rtt_ms={"Y": 1.0}), sv("Y", 6, 12, rtt_ms={"X": 90.0}),
             sv("Z", 6, 12, rtt_ms={"X": 3.0})]
    hops = route(swarm)
    assert hops == [Hop("X", 0, 6), Hop("Y", 6, 12)]
    assert cost(hops, swarm) == pytest.approx(2 + 0.5 + 60 + 1 + 0.5 + 60 + 2)
    assert cost([Hop("X", 0, 6), Hop("Z", 6, 12)], swarm) == pytest.approx(128.0)


def test_gateway_record_supplies_rtts_without_serving() -> None:
    swarm = [sv("G", 0, 1, state="joining", rtt_ms={"A": 30.0, "B": 1.0}),
             sv("A", 0, 12), sv("B", 0, 12)]
    assert route(swarm) == [Hop("B", 0, 12)]


def test_gateway_serving_itself_pays_no_rtt() -> None:
    swarm = [sv("A", 0, 12), sv("G", 0, 12)]
    hops = route(swarm)
    assert hops == [Hop("G", 0, 12)]
    assert cost(hops, swarm) == pytest.approx(0.5 + 120)


def test_broken_rtt_figures_fall_back() -> None:
    swarm = [sv("A", 0, 12, rtt_ms={"G": -100.0}), sv("B", 0, 12, rtt_ms={"G": float("nan")})]
    hops = route(swarm)
    assert hops == [Hop("A", 0, 12)]  # both at the default: tie by id, no lie rewarded
    assert cost(hops, swarm) == pytest.approx(2 + 0.5 + 120 + 2)


# ---------------------------------------------------------------- against a reference


def test_a_direct_path_beats_a_relayed_one() -> None:
    """A server behind a NAT (reached through a relay) costs more to enter, unless its
    RTT was measured; it is still used when nothing else serves its blocks."""
    swarm = [sv("A", 0, 6), sv("Home", 6, 12, throughput=200.0, relayed=True), sv("B", 6, 12)]
    assert route(swarm) == [Hop("A", 0, 6), Hop("B", 6, 12)]  # Home computes faster, but the relay
    assert cost(route(swarm), swarm) < cost([Hop("A", 0, 6), Hop("Home", 6, 12)], swarm)
    alone = [sv("A", 0, 6), sv("Home", 6, 12, relayed=True)]
    assert route(alone) == [Hop("A", 0, 6), Hop("Home", 6, 12)]
    assert cost(route(alone), alone) == pytest.approx(2 * 62.5 + RELAY_PENALTY_MS + 2)
    measured = [sv("A", 0, 6, rtt_ms={"Home": 1.0}), sv("Home", 6, 12, throughput=200.0, relayed=True), sv("B", 6, 12)]
    assert route(measured) == [Hop("A", 0, 6), Hop("Home", 6, 12)]  # a measured RTT is what it is


def _reference_cost(servers, total, origin, tokens_needed, default_rtt, overhead):
    """Plain Dijkstra over (boundary, last peer) that enumerates every edge [a, b)."""
    views = {s.peer: s for s in servers}
    usable = [s for s in views.values()
              if s.state == "online" and valid_span(s, total) and s.throughput > 0]

    def rtt(p, q):
        if p == q:
            return 0.0
        if p in views and q in views[p].rtt_ms:
            return views[p].rtt_ms[q]
        if q in views and p in views[q].rtt_ms:
            return views[q].rtt_ms[p]
        return default_rtt + (RELAY_PENALTY_MS if q in views and views[q].relayed else 0.0)

    start = object()
    heap = [(0.0, 0, 0, start)]
    seen = set()
    tiebreak = 1
    while heap:
        c, a, _, last = heapq.heappop(heap)
        if a == total + 1:
            return c
        if (a, last) in seen:
            continue
        seen.add((a, last))
        prev = origin if last is start else last
        if a == total:
            heapq.heappush(heap, (c + rtt(prev, origin), total + 1, tiebreak, None))
            tiebreak += 1
            continue
        for s in usable:
            if s.peer == last or not s.start <= a < s.end:
                continue
            enter = rtt(prev, s.peer) + overhead
            enter += CACHE_PENALTY_MS if s.cache_tokens_free < tokens_needed else 0.0
            for b in range(a + 1, s.end + 1):
                step = (b - a) * 1000.0 * (1 + s.load) / s.throughput
                heapq.heappush(heap, (c + enter + step, b, tiebreak, s.peer))
                tiebreak += 1
    return None


def _random_swarm(rng: random.Random, n: int, total: int, rtt_links: int):
    peers = [f"p{i:04d}" for i in range(n)]
    swarm = []
    for p in peers:
        length = rng.randint(1, max(1, total // 2))
        start = rng.randint(0, total - length)
        links = rng.sample(peers + ["G"], k=min(rtt_links, n))
        swarm.append(sv(
            p, start, start + length, rng.uniform(20.0, 500.0),
            state=rng.choice(["online"] * 8 + ["joining", "draining"]),
            cache_tokens_free=rng.choice([0, 1000, 10_000]),
            load=rng.choice([0.0, 0.0, 0.3, 0.9]),
            rtt_ms={q: rng.uniform(0.1, 60.0) for q in links if q != p},
            relayed=rng.random() < 0.3,
        ))
    return swarm


def _check_valid(hops, swarm, total):
    views = {s.peer: s for s in swarm}
    assert hops[0].start == 0 and hops[-1].end == total
    for x, y in zip(hops, hops[1:]):
        assert x.end == y.start and x.peer != y.peer
    for h in hops:
        s = views[h.peer]
        assert s.state == "online" and s.start <= h.start < h.end <= s.end


def test_matches_reference_dijkstra_on_random_swarms() -> None:
    rng = random.Random(1234)
    routed = 0
    for _ in range(300):
        total = rng.randint(1, 10)
        swarm = _random_swarm(rng, rng.randint(1, 12), total, rtt_links=rng.randint(0, 6))
        if rng.random() < 0.3:  # sometimes the gateway serves too
            swarm.append(sv("G", 0, rng.randint(1, total), rng.uniform(20.0, 500.0)))
        need = rng.choice([0, 500, 5000])
        got = find_route(swarm, total, origin="G", tokens_needed=need)
        want = _reference_cost(swarm, total, "G", need, 2.0, 0.5)
        if want is None:
            assert got is None
            continue
        routed += 1
        _check_valid(got, swarm, total)
        assert route_cost(got, swarm, origin="G", tokens_needed=need) == pytest.approx(want)
    assert routed > 100  # the comparison did real work


def test_same_inputs_same_route_whatever_the_order() -> None:
    swarm = _random_swarm(random.Random(7), 200, 40, rtt_links=8)
    first = find_route(swarm, 40, origin="G")
    assert first is not None
    shuffled = swarm[:]
    random.Random(8).shuffle(shuffled)
    assert find_route(shuffled, 40, origin="G") == first


def test_thousand_servers_eighty_blocks() -> None:
    rng = random.Random(42)
    swarm = []
    for i in range(1000):
        length = rng.randint(4, 20)
        start = rng.randint(0, 80 - length)
        links = rng.sample(range(1000), 16)
        swarm.append(sv(
            f"peer{i:04d}", start, start + length, rng.uniform(20.0, 500.0),
            state=rng.choice(["online"] * 18 + ["joining", "draining"]),
            cache_tokens_free=rng.choice([0, 4096, 65536]),
            load=rng.random(),
            rtt_ms={f"peer{j:04d}": rng.uniform(0.2, 150.0) for j in links if j != i},
        ))
    hops = find_route(swarm, 80, origin="peer0000", tokens_needed=2048,
                      exclude={f"peer{i:04d}" for i in range(0, 1000, 50)})
    assert hops is not None
    _check_valid(hops, swarm, 80)
    assert not any(h.peer in {f"peer{i:04d}" for i in range(0, 1000, 50)} for h in hops)


# ---------------------------------------------------------------- back-off


def test_backoff_doubles_and_caps() -> None:
    b = FailureBackoff()
    now, waits = 0.0, []
    for _ in range(8):
        b.failed("A", now)
        until = now
        while "A" in b.excluded(until):
            until += 0.5
        waits.append(until - now)
        now = until  # fails again right after its back-off ends
    assert waits == [5.0, 10.0, 20.0, 40.0, 80.0, 120.0, 120.0, 120.0]


def test_backoff_window_edges() -> None:
    b = FailureBackoff()
    b.failed("A", 100.0)
    assert b.excluded(100.0) == {"A"}
    assert b.excluded(104.9) == {"A"}
    assert b.excluded(105.0) == set()


def test_backoff_success_resets() -> None:
    b = FailureBackoff()
    b.failed("A", 0.0)
    b.failed("A", 10.0)  # second in a row: 10 s
    assert b.excluded(19.0) == {"A"}
    b.succeeded("A")
    assert b.excluded(19.0) == set()
    b.failed("A", 30.0)
    assert b.excluded(34.0) == {"A"} and b.excluded(35.0) == set()
    b.succeeded("never-failed")  # harmless


def test_backoff_same_outage_counts_once() -> None:
    # Ten sessions through a dead peer report it within a second: still one failure.
    b = FailureBackoff()
    for i in range(10):
        b.failed("A", i * 0.1)
    assert b.excluded(4.9) == {"A"} and b.excluded(5.0) == set()
    b.failed("A", 6.0)
    assert b.excluded(15.9) == {"A"} and b.excluded(16.0) == set()


def test_backoff_is_per_peer_and_survives_long_streaks() -> None:
    b = FailureBackoff(base_s=1.0, cap_s=30.0)
    now = 0.0
    for _ in range(2000):  # 2**1999 seconds would overflow a float
        b.failed("A", now)
        now += 31.0
    b.failed("A", now)
    b.failed("B", now)
    assert b.excluded(now + 0.5) == {"A", "B"}
    assert b.excluded(now + 1.0) == {"A"}
    assert b.excluded(now + 29.9) == {"A"}
    assert b.excluded(now + 30.0) == set()
