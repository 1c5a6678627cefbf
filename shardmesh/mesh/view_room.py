"""Who gets a place in the swarm view when strangers can make identities for free.

Every record in the view is valid and signed, but a valid record costs an attacker one
fresh key: thousands of them fit in a few seconds of gossip. The view therefore has a
fixed number of places, and this module decides who holds them. Each record is
counted against two things the attacker cannot multiply as cheaply as identities:

* its **origin**, the peer that brought it to us first (the gossip neighbour that
  forwarded it, the peer whose swarm map we read, or the DHT);
* its **host**, the network host its first address names (``/ip4/1.2.3.4/...``), so
  that records cannot point the swarm at one victim address by the thousand.

The rules, cheapest first:

1. an origin holds at most ``max_per_origin`` places, and at most ``max_per_host``
   for any one host. The host cap counts per origin so that nobody can use up the
   places of a host (a NAT, a relay) for records that reach us by other ways;
2. when the view is full, a newcomer takes the oldest place of the origin holding
   the most places, if that origin holds more than the newcomer's own would after
   taking it; otherwise the newcomer is refused. A flood from one neighbour therefore
   only ever displaces its own records, and records from every other origin keep
   their places;
3. ``pinned`` peers (our own, the peers we are connected to) are never displaced,
   and are admitted past every cap.

A record already in the view keeps its place and its origin when it is refreshed.
Pure bookkeeping: no I/O, no clock.
"""

from __future__ import annotations

from typing import Callable

MAX_RECORDS = 2048  # places in the view: far above the swarms one model's gossip serves
MAX_PER_ORIGIN = 512  # a quarter of the view for what any one neighbour brings
MAX_PER_HOST = 64  # records one origin brings that name one host (a NAT, a relay, a victim)


def host_of(addrs: tuple[str, ...] | list[str]) -> str:
    """The host part of the first address (``/ip4/1.2.3.4/tcp/1/p2p/X`` -> ``ip4/1.2.3.4``); "" if none."""
    if not addrs:
        return ""
    parts = addrs[0].split("/")
    return "/".join(parts[1:3]) if len(parts) >= 3 else ""


class ViewRoom:
    """The places of a view: which peer holds one, for which origin and host."""

    def __init__(
        self,
        *,
        max_records: int = MAX_RECORDS,
        max_per_origin: int = MAX_PER_ORIGIN,
        max_per_host: int = MAX_PER_HOST,
        pinned: Callable[[str], bool] = lambda peer: False,
    ) -> None:
        self.max_records = max_records
        self.max_per_origin = max_per_origin
        self.max_per_host = max_per_host
        self.pinned = pinned
        self._origin: dict[str, str] = {}  # peer -> origin
        self._host: dict[str, str] = {}  # peer -> host
        self._by_origin: dict[str, dict[str, None]] = {}  # origin -> its peers, oldest first
        self._per_host: dict[tuple[str, str], int] = {}  # (origin, host) -> places

    def __len__(self) -> int:
        return len(self._origin)

    def __contains__(self, peer: str) -> bool:
        return peer in self._origin

    def origin_of(self, peer: str) -> str | None:
        return self._origin.get(peer)

    def admit(self, peer: str, origin: str, host: str) -> tuple[bool, str | None]:
        """May ``peer`` hold (or keep) a place? ``(admitted, peer to evict first or None)``.

        Changes nothing: the caller evicts (:meth:`leave`) and then :meth:`take` s.
        """
        if peer in self._origin:  # a refresh; a new host must fit its cap
            key = (self._origin[peer], host)
            fits = host == self._host[peer] or self._per_host.get(key, 0) < self.max_per_host or self.pinned(peer)
            return fits, None
        if self.pinned(peer):
            return True, self._victim(None) if len(self._origin) >= self.max_records else None
        if self._per_host.get((origin, host), 0) >= self.max_per_host:
            return False, None
        own = len(self._by_origin.get(origin, ()))
        if own >= self.max_per_origin:
            return False, None
        if len(self._origin) < self.max_records:
            return True, None
        victim = self._victim(origin)
        return victim is not None, victim

    def _victim(self, arriving_origin: str | None) -> str | None:
        """The oldest unpinned place of the largest origin, if that origin holds more
        than ``arriving_origin`` would after the newcomer joins it."""
        arriving = len(self._by_origin.get(arriving_origin, ())) + 1 if arriving_origin is not None else 0
        for origin, peers in sorted(self._by_origin.items(), key=lambda item: -len(item[1])):
            if len(peers) <= arriving:
                return None
            for peer in peers:
                if not self.pinned(peer):
                    return peer
        return None

    def take(self, peer: str, origin: str, host: str) -> None:
        """Record that ``peer`` holds a place (after :meth:`admit` said yes)."""
        if peer in self._origin:
            self._move_host(peer, host)
            return
        self._origin[peer] = origin
        self._by_origin.setdefault(origin, {})[peer] = None
        self._host[peer] = host
        self._count_host((origin, host), +1)

    def leave(self, peer: str) -> None:
        """``peer`` gives up its place (expired, or evicted)."""
        origin = self._origin.pop(peer, None)
        if origin is None:
            return
        peers = self._by_origin[origin]
        del peers[peer]
        if not peers:
            del self._by_origin[origin]
        self._count_host((origin, self._host.pop(peer)), -1)

    def _move_host(self, peer: str, host: str) -> None:
        old = self._host[peer]
        if old != host:
            origin = self._origin[peer]
            self._count_host((origin, old), -1)
            self._host[peer] = host
            self._count_host((origin, host), +1)

    def _count_host(self, key: tuple[str, str], change: int) -> None:
        left = self._per_host.get(key, 0) + change
        if left:
            self._per_host[key] = left
        else:
            del self._per_host[key]
