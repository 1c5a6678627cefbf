"""The gateway's side of the prefix cache: which route holds a history's prefix, when a
session takes it, and the bounds on what hops and gateways say of prefixes on the wire."""

from __future__ import annotations

from array import array

from shardmesh.contract.prefixes import PREFIX_BLOCK, prefix_names
from shardmesh.mesh.prefix_wire import cache_scope, close_payload, fed_at_close, reported_cached
from shardmesh.node.chains import route_finder
from shardmesh.placement.prefix_routes import HeldPrefix, PrefixRoutes, still_served, worth_taking
from shardmesh.placement.routing import FailureBackoff, Hop
from shardmesh.placement.spans import ServerView

B = PREFIX_BLOCK


class Servers:
    def __init__(self, servers: list[ServerView]) -> None:
        self._servers = servers

    def servers(self) -> list[ServerView]:
        return self._servers


def view(peer: str, start: int, end: int, throughput: float, load: float = 0.0, state: str = "online") -> ServerView:
    return ServerView(peer, start, end, throughput, state=state, load=load, cache_tokens_free=4096)


def test_the_longest_remembered_prefix_wins_and_old_names_are_forgotten() -> None:
    routes = PrefixRoutes(capacity=6)
    chat = prefix_names(list(range(4 * B)))
    first, second = (Hop("a", 0, 4),), (Hop("b", 0, 4),)
    routes.remember(chat[:2], first)
    routes.remember(chat, second)  # the next turn went elsewhere: its route holds all four
    assert routes.held(chat) == HeldPrefix(second, 4, 4)
    assert routes.held(chat[:3] + prefix_names(list(range(3 * B)) + [7] * B)[3:]) == HeldPrefix(second, 3, 4)
    assert routes.held(prefix_names([9] * 2 * B)) is None
    routes.remember(prefix_names([5] * 4 * B), first)
    assert len(routes) == 6 and routes.held(chat[:2]) is None  # the least recently used went first
    assert HeldPrefix(first, 1, 4).share == 0.25 and HeldPrefix(first, 0, 0).share == 0.0


def test_a_held_route_is_taken_while_served_and_worth_its_cost() -> None:
    fast, slow = view("fast", 0, 4, 100.0), view("slow", 0, 4, 70.0)
    swarm = Servers([fast, slow])
    find = route_finder(swarm, FailureBackoff(), "gateway", 4)
    assert [h.peer for h in find(16)] == ["fast"]
    held = HeldPrefix((Hop("slow", 0, 4),), 3, 4)
    assert [h.peer for h in find(16, prefer=held)] == ["slow"]  # 1.4x dearer, but holds 3/4 of the prompt
    assert [h.peer for h in find(16, prefer=HeldPrefix(held.route, 1, 4))] == ["fast"]  # a quarter is not worth 1.4x
    assert [h.peer for h in find(16, frozenset({"slow"}), prefer=held)] == ["fast"]  # it failed this request
    swarm._servers = [fast, view("slow", 0, 4, 70.0, state="draining")]
    assert [h.peer for h in find(16, prefer=held)] == ["fast"]
    swarm._servers = [fast, view("slow", 2, 4, 70.0)]  # it moved: the held hop is not its span any more
    assert [h.peer for h in find(16, prefer=held)] == ["fast"]


def test_still_served_and_worth_taking_are_plain_rules() -> None:
    servers = [view("a", 0, 2, 10.0), view("b", 2, 4, 10.0)]
    route = [Hop("a", 0, 2), Hop("b", 2, 4)]
    assert still_served(route, servers) and not still_served(route, servers, exclude={"b"})
    assert not still_served(route, servers[:1]) and not still_served([Hop("a", 0, 3)], servers)
    assert worth_taking(20.0, 10.0, 1.0) and not worth_taking(20.1, 10.0, 1.0)
    assert worth_taking(10.0, 10.0, 0.0) and not worth_taking(11.0, 10.0, -5.0) and worth_taking(19.0, 10.0, 7.0)


def test_what_a_hop_reports_and_a_close_carries_is_bounded() -> None:
    assert reported_cached({"cached": 128}, 200) == 128
    assert reported_cached({"cached": 10**9}, 200) == 200  # never past what the history holds
    for bad in ({}, {"cached": -1}, {"cached": "64"}, {"cached": 1.5}, {"cached": True}, {"cached": None}):
        assert reported_cached(bad, 200) == 0
    history = [1, 2, 3]
    ids = close_payload(len(history), history + [4, 5])
    assert array("q", ids).tolist() == [4, 5] and close_payload(3, history) == b""
    assert fed_at_close(history, ids, 10) == [1, 2, 3, 4, 5]
    assert fed_at_close(history, ids[:-1], 10) == history  # not whole int64 ids
    assert fed_at_close(history, ids, 4) == history  # past max_length
    assert fed_at_close(history, b"", 10) == history
    assert cache_scope("gw", "up") != cache_scope("gw", "other") != cache_scope("gw2", "other")
