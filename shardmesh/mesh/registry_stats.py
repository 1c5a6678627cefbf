"""The registry's counters: what came in, what went out and what was thrown away.

One instance is shared by the registry's parts (the view, gossip, the DHT), each of
which counts what it sees; ``Registry.stats`` is that instance, read by ``/metrics``
and by tests.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RegistryStats:
    """Counters for /metrics and for tests: what came in and what was thrown away."""

    published: int = 0
    gossip_accepted: int = 0  # records that entered (or refreshed) the view from gossip
    invalid_dropped: int = 0  # gossip messages that failed verification
    dht_puts: int = 0
    dht_put_failures: int = 0
    provides: int = 0
    dht_records_fetched: int = 0
    dht_records_invalid: int = 0
    synced: int = 0  # records that entered the view from a peer's whole map (sync_from)
    expired_purged: int = 0
    refused_no_room: int = 0  # valid records the view had no place for (see view_room)
    evicted: int = 0  # records that gave up their place to a newcomer from another origin
