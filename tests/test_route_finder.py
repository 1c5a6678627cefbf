"""The gateway's routing policy (node/chains.route_finder): back-off, and the peers one
request has already seen fail (issue 18, item 3: a failed peer is not dialled again for
the same request while another way exists, and is still used when it is the only one)."""

from __future__ import annotations

import time

from shardmesh.node.chains import route_finder
from shardmesh.placement.routing import FailureBackoff
from shardmesh.placement.spans import ServerView


class Servers:
    """What route_finder reads of the registry: its one view of servers."""

    def __init__(self, servers: list[ServerView]) -> None:
        self._servers = servers

    def servers(self) -> list[ServerView]:
        return self._servers


def peers(route) -> list[str]:
    return [hop.peer for hop in route] if route is not None else []


def test_a_peer_the_request_saw_fail_is_avoided_while_another_way_exists() -> None:
    swarm = Servers([ServerView("a", 0, 2, 50.0, cache_tokens_free=4096), ServerView("b", 2, 4, 50.0, cache_tokens_free=4096),
                     ServerView("c", 2, 4, 10.0, cache_tokens_free=4096)])  # fmt: skip
    find = route_finder(swarm, FailureBackoff(), "gateway", 4)
    assert peers(find(16)) == ["a", "b"]  # the faster last hop
    assert peers(find(16, frozenset({"b"}))) == ["a", "c"]  # b failed this request: c instead
    # a is the only server of [0, 2): avoiding it would leave no route, so it is used.
    assert peers(find(16, frozenset({"a", "b"}))) == ["a", "c"]


def test_back_off_still_applies_when_the_avoided_peer_is_the_only_way() -> None:
    swarm = Servers([ServerView("a", 0, 4, 50.0, cache_tokens_free=4096)])
    backoff = FailureBackoff()
    find = route_finder(swarm, backoff, "gateway", 4)
    backoff.failed("a", time.monotonic())
    assert find(16, frozenset({"a"})) is None
