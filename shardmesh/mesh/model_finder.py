"""Which models a swarm serves, as the peers we are connected to show it.

A node serves one model, and records travel on that model's own gossip topic, so
nothing in one model's swarm lists the others. A gateway for whatever the swarm serves
(``node/open_gateway.py``) asks every peer it is connected to for
its swarm map (``/shardmesh/swarm/1.0.0``, :mod:`.swarm_map`) and merges them here:
each map's records are verified signatures, so a peer can hide models but not invent
servers, and one model counts as served only where its online records cover every
block. :func:`served_models` is the pure merge; :func:`find_served_models` asks.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Iterable

import trio

from ..placement.spans import ONLINE, coverage
from .host import MeshHost
from .records import NodeRecord, server_view
from .swarm_map import SwarmMap, SwarmMapError, fetch_swarm_map

__all__ = ["MAX_ASKED", "ServedModel", "find_served_models", "served_models"]

log = logging.getLogger("shardmesh.mesh.model_finder")

MAX_ASKED = 8  # peers asked in one round, a random sample: a map can be megabytes


@dataclass(frozen=True)
class ServedModel:
    """One model of the swarm: its identity (``name@hash``), its blocks, the peers
    serving it, and whether its online servers hold every block."""

    model: str
    total_blocks: int
    servers: frozenset[str]
    complete: bool

    @property
    def name(self) -> str:
        """What to fetch its files by: the hub id or folder name before the ``@``."""
        return self.model.rsplit("@", 1)[0]


def served_models(maps: Iterable[SwarmMap]) -> dict[str, ServedModel]:
    """Every model the maps show, by identity. A model's block count is the one most of
    its records give (a map's header alone is its sender's word); its records are the
    newest per peer over every map."""
    records: dict[str, dict[str, NodeRecord]] = {}
    for swarm in maps:
        for record in swarm.records:
            if record.model != swarm.model:
                continue  # a map lists one model's records; anything else is not believed
            kept = records.setdefault(record.model, {}).get(record.peer)
            if kept is None or record.seq > kept.seq:
                records[record.model][record.peer] = record
    out = {}
    for model, by_peer in records.items():
        totals = [r.total_blocks for r in by_peer.values()]
        total = max(set(totals), key=totals.count)
        servers = [r for r in by_peer.values() if r.total_blocks == total and r.serves_blocks]
        counts = coverage([server_view(r) for r in servers], total)
        online = frozenset(r.peer for r in servers if r.state == ONLINE)
        out[model] = ServedModel(model, total, online, bool(counts) and min(counts) > 0)
    return out


async def find_served_models(mesh: MeshHost, peers: Iterable[str], timeout: float = 5.0) -> dict[str, ServedModel]:
    """:func:`served_models` over the maps of ``peers`` (a random :data:`MAX_ASKED` of
    them), asked at once; a peer that does not answer in ``timeout`` s is left out."""
    maps: list[SwarmMap] = []

    async def ask(peer: str) -> None:
        from libp2p.peer.id import ID

        try:
            maps.append(await fetch_swarm_map(mesh, ID.from_base58(peer), timeout))
        except (SwarmMapError, OSError, ValueError, trio.TooSlowError) as exc:
            log.debug("no swarm map from %s: %s", peer, exc)

    async with trio.open_nursery() as nursery:
        peers = list(peers)
        for peer in random.sample(peers, min(len(peers), MAX_ASKED)):
            nursery.start_soon(ask, peer)
    return served_models(maps)
