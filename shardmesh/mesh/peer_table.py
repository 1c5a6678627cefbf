"""py-libp2p's peer table, made safe to share with strangers.

py-libp2p keeps every peer it hears of (identify, DHT answers, gossipsub peer exchange)
in one table capped at 1,000 peers. Past the cap it evicts entries without addresses
first, and our own entry, which holds our key pair and no address, is one of them:
the next handshake then fails with ``PeerStoreError: peer ID not found`` and the node
can no longer publish. The eviction also sorts the whole table on every insertion
over the cap, so a flood costs it O(n log n) per entry.

:class:`PinnedPeerStore` keeps py-libp2p's table and changes only the eviction: our
own entry and the peers :attr:`PinnedPeerStore.keep` names (the ones we are connected
to) are never evicted, and one eviction pass trims the table to 90% of its cap, oldest
and expired entries first, so that a flood costs O(1) amortised per entry.

Record addresses never enter this table (the registry dials a record's addresses
only when a route needs its peer; see :meth:`.host.MeshHost.ensure_connected`).
"""

from __future__ import annotations

from typing import Any, Callable

from libp2p.peer.peerstore import PeerStore

MAX_PEERS = 1000  # py-libp2p's own cap
TRIM_TO = 0.9  # an eviction pass leaves this share of the cap, so passes are rare


class PinnedPeerStore(PeerStore):
    """A peerstore that never evicts ``own`` nor any peer ``keep(peer_id)`` is true for."""

    def __init__(self, own: Any, max_peers: int = MAX_PEERS) -> None:
        super().__init__(max_peers=max_peers)
        self.own = own
        self.keep: Callable[[Any], bool] = lambda peer_id: False
        self.evicted = 0  # entries evicted so far (for tests and stats)

    def _pinned(self, peer_id: Any) -> bool:
        return peer_id == self.own or self.keep(peer_id)

    def _enforce_peer_limit(self) -> None:
        if len(self.peer_data_map) <= self.max_peers:
            return
        excess = len(self.peer_data_map) - int(self.max_peers * TRIM_TO)
        # Expired entries first, then the oldest (a dict keeps insertion order).
        expired = [p for p, data in self.peer_data_map.items() if data.is_expired()]
        skip = set(expired)
        for peer_id in [*expired, *(p for p in self.peer_data_map if p not in skip)]:
            if excess <= 0:
                break
            if self._pinned(peer_id):
                continue
            self.peer_record_map.pop(peer_id, None)
            del self.peer_data_map[peer_id]
            self.evicted += 1
            excess -= 1

    def _cleanup_expired_records(self) -> None:
        for peer_id in [p for p, data in self.peer_data_map.items() if data.is_expired() and not self._pinned(p)]:
            self.maybe_delete_peer_record(peer_id)
            del self.peer_data_map[peer_id]
        self._enforce_record_limit()
        self._enforce_peer_limit()
