"""Where the gateway's chains come from: this node's own blocks, or a route of peers.

:class:`NodeChains` is the one :class:`~shardmesh.contract.ChainOpener` the generation
loop sees. When this node holds the whole model the chain stays in the process (no
network in the way); otherwise the mesh's chain client routes each new session over
the swarm's servers, avoiding peers that failed recently.
"""

from __future__ import annotations

import time
from typing import Callable

from ..contract import Chain, SamplingParams
from ..mesh.mesh_chains import MeshChains
from ..mesh.registry import Registry
from ..placement.routing import FailureBackoff, Hop, find_route
from .span_keeper import SpanKeeper


def route_finder(registry: Registry, backoff: FailureBackoff, me: str, total_blocks: int) -> Callable[[int], list[Hop] | None]:
    """The routing policy: the cheapest chain over the servers in the swarm view,
    skipping peers in back-off, with room for ``tokens_needed`` in every KV cache."""

    def find(tokens_needed: int) -> list[Hop] | None:
        exclude = backoff.excluded(time.monotonic())
        return find_route(registry.servers(), total_blocks, origin=me, exclude=exclude, tokens_needed=tokens_needed)

    return find


class NodeChains:
    """The gateway's chain opener: local blocks when they cover the model, else the mesh."""

    def __init__(self, keeper: SpanKeeper, mesh_chains: MeshChains, total_blocks: int) -> None:
        self.keeper = keeper
        self.mesh_chains = mesh_chains
        self.total_blocks = total_blocks

    def _whole_model_here(self):
        held = self.keeper.held
        if held is not None and (held.start, held.end) == (0, self.total_blocks) and self.keeper.server.accepting:
            return held.blocks.local_chains
        return None

    def available(self) -> bool:
        return self._whole_model_here() is not None or self.mesh_chains.available()

    def chain(self, session_id: str, sampling: SamplingParams, prompt_ids: list[int], generated: list[int]) -> Chain:
        opener = self._whole_model_here() or self.mesh_chains
        return opener.chain(session_id, sampling, prompt_ids, generated)
