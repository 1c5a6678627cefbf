"""Which chain holds a history's prefix, as one gateway remembers it, and whether a new
session should take that chain.

Every hop of a chain keeps the keys and values of its finished sessions' prefixes
(docs/ARCHITECTURE.md, "Prefix cache"), but only for sessions that come the same way:
the same gateway, the same upstream peer, the same blocks. So a gateway remembers, for
each named block of the histories it sent (the names of
:func:`shardmesh.contract.prefixes.prefix_names`), the route that last computed it.
A new session looks up the longest prefix of its history with a remembered route and
prefers that route while it is still served and not much slower than the cheapest
one: a chain that holds most of the prompt may cost up to :data:`PREFIX_WORTH` times
more per token (:func:`worth_taking`), since it skips most of the prefill.

Pure: names in, routes out. Whether the hops really still hold the prefix is theirs
to say when the session opens (their ``ok`` carries ``cached``); a wrong guess costs
only the prefill it would have cost anyway.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from .routing import Hop
from .spans import ONLINE, ServerView

PREFIX_ROUTE_NAMES = 16384  # block names remembered, least recently used forgotten first
PREFIX_WORTH = 1.0  # how much dearer per token a chain holding a whole prompt may be


@dataclass(frozen=True)
class HeldPrefix:
    """A remembered route whose hops hold the first ``blocks`` named blocks of a history
    of ``of_blocks`` named blocks."""

    route: tuple[Hop, ...]
    blocks: int
    of_blocks: int

    @property
    def share(self) -> float:
        return self.blocks / self.of_blocks if self.of_blocks else 0.0


class PrefixRoutes:
    """Block name -> the route that last computed it, a bounded LRU table."""

    def __init__(self, capacity: int = PREFIX_ROUTE_NAMES) -> None:
        self.capacity = capacity
        self._routes: OrderedDict[bytes, tuple[Hop, ...]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._routes)

    def remember(self, names: Sequence[bytes], route: Iterable[Hop]) -> None:
        """``route`` computed (and its hops keep) every block that ``names`` names."""
        hops = tuple(route)
        for name in names:
            self._routes[name] = hops
            self._routes.move_to_end(name)
        while len(self._routes) > self.capacity:
            self._routes.popitem(last=False)

    def held(self, names: Sequence[bytes]) -> HeldPrefix | None:
        """The route remembered for the longest start of ``names``, or None."""
        for blocks in range(len(names), 0, -1):
            route = self._routes.get(names[blocks - 1])
            if route is not None:
                self._routes.move_to_end(names[blocks - 1])
                return HeldPrefix(route, blocks, len(names))
        return None


def still_served(route: Sequence[Hop], servers: Iterable[ServerView], exclude: Collection[str] = ()) -> bool:
    """Whether every hop of ``route`` is still on an online server that covers its blocks
    and is not excluded."""
    views = {s.peer: s for s in servers}
    for hop in route:
        s = views.get(hop.peer)
        if s is None or s.state != ONLINE or hop.peer in exclude or not s.start <= hop.start < hop.end <= s.end:
            return False
    return True


def worth_taking(held_ms: float, best_ms: float, share: float) -> bool:
    """Take the chain that holds ``share`` (0 to 1) of the history, at ``held_ms`` per
    token, over the cheapest at ``best_ms``? Yes while it costs at most ``1 + share *
    PREFIX_WORTH`` times as much: its load (in its cost) is weighed against the prefill
    it saves."""
    return held_ms <= best_ms * (1.0 + PREFIX_WORTH * max(0.0, min(1.0, share)))
