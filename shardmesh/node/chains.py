"""Where the gateway's chains come from: this node's own blocks, or a route of peers.

:class:`NodeChains` is the one :class:`~shardmesh.contract.ChainOpener` the generation
loop sees. When this node holds the whole model the chain stays in the process (no
network in the way); otherwise the mesh's chain client routes each new session over
the swarm's servers, avoiding peers that failed recently.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Callable, Sequence

import trio

from ..contract import Chain, ChainOpener, SamplingParams
from ..mesh.audit_policy import AuditPolicy
from ..mesh.audited_chains import AuditedChains
from ..mesh.chain_client import RouteFinder
from ..mesh.gateway_ticket import TicketIssuer
from ..mesh.hop_server import HopServer
from ..mesh.host import MeshHost
from ..mesh.link_offers import Links
from ..mesh.mesh_chains import MeshChains
from ..mesh.open_request import PREFILL_STEP
from ..mesh.registry import Registry
from ..mesh.result_trunks import ChainTrunks
from ..mesh.rtt import answers_ping
from ..placement.claims import MeasuredSpeeds, capped_claims
from ..placement.prefix_routes import HeldPrefix, PrefixRoutes, still_served, worth_taking
from ..placement.routing import FailureBackoff, Hop, find_route, route_cost
from .config import NodeConfig
from .span_keeper import SpanKeeper


def route_finder(
    registry: Registry, backoff: FailureBackoff, me: str, total_blocks: int, *,
    banned: Callable[[float], set[str]] = lambda now: set(), speeds: MeasuredSpeeds | None = None,
) -> RouteFinder:
    """The routing policy: the cheapest chain over the servers in the swarm view,
    skipping peers in back-off and those ``banned`` (caught by an audit), with room for
    ``tokens_needed`` in every KV cache. With ``speeds``, what servers claim is held to
    what this gateway measured of them (:mod:`shardmesh.placement.claims`).

    ``avoid`` (peers that failed this request already) are skipped too, except one
    without which no route exists (the one server of a range, back after a stall): the
    request may still use that one once its back-off is over.

    ``prefer``: a route that holds a prefix of the request's history (the gateway
    remembered it, :mod:`shardmesh.placement.prefix_routes`), taken instead while it is
    still served and worth its cost.
    """

    def find(tokens_needed: int, avoid: frozenset[str] = frozenset(), prefer: HeldPrefix | None = None) -> list[Hop] | None:
        servers = registry.servers()
        if speeds is not None:
            servers = capped_claims(servers, speeds.figures())
        now = time.monotonic()
        exclude = backoff.excluded(now) | banned(now)

        def route(without: frozenset[str] | set[str]) -> list[Hop] | None:
            return find_route(servers, total_blocks, origin=me, exclude=exclude | without, tokens_needed=tokens_needed)

        found = route(avoid)
        if found is None and avoid:
            found = route({peer for peer in avoid if route(frozenset({peer})) is not None}) or route(frozenset())
        if found is not None and prefer is not None and still_served(prefer.route, servers, exclude | avoid):
            def cost(r: Sequence[Hop]) -> float:
                return route_cost(r, servers, origin=me, tokens_needed=tokens_needed)

            if worth_taking(cost(prefer.route), cost(found), prefer.share):
                return list(prefer.route)
        return found

    return find


class NodeChains:
    """The gateway's chain opener: local blocks when they cover the model, else the mesh."""

    def __init__(self, keeper: SpanKeeper, mesh_chains: ChainOpener, total_blocks: int) -> None:
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

    def chain(
        self, session_id: str, sampling: SamplingParams, prompt_ids: list[int], generated: list[int],
        avoid: frozenset[str] = frozenset(),
    ) -> Chain:
        opener = self._whole_model_here() or self.mesh_chains
        return opener.chain(session_id, sampling, prompt_ids, generated, avoid)


def connected_online_peers(mesh: MeshHost, registry: Registry) -> list[str]:
    """The peers routing may use that we hold a connection to: online servers other than
    us (a joining node may be busy loading). Liveness pings these."""
    connected = {p.to_base58() for p in mesh.connected_peers()}
    return [r.peer for r in registry.records()
            if r.state == "online" and r.serves_blocks and r.peer in connected and r.peer != mesh.peer_id_str]  # fmt: skip


def audited_mesh_chains(
    mesh: MeshHost, nursery: trio.Nursery, server: HopServer, registry: Registry, model_id: str, total_blocks: int,
    config: NodeConfig, *, links: Links | None = None, trunks: ChainTrunks | None = None,
) -> AuditedChains:
    """A gateway's chains over ``model_id``'s swarm: routed by :func:`route_finder` (peers
    that failed back off, peers an audit caught are banned, claimed speeds capped by
    what it measured), opened through ``server``, each audited (``--audit-rate``)."""
    me = mesh.peer_id_str
    backoff, audits, speeds = FailureBackoff(), AuditPolicy(rate=config.audit_rate), MeasuredSpeeds()
    chains = MeshChains(
        nursery=nursery,
        open_stream=server.open_stream,
        find_route=route_finder(registry, backoff, me, total_blocks, banned=audits.banned, speeds=speeds),
        model_id=model_id,
        gateway=me,
        issuer=TicketIssuer(me, mesh.key_pair),
        on_failure=lambda peer: backoff.failed(peer, time.monotonic()),
        on_success=lambda route: [backoff.succeeded(h.peer) for h in route],
        links=links,
        probe=partial(answers_ping, mesh),
        trunks=trunks,
        prefixes=PrefixRoutes() if config.prefix_cache else None,
        prefill_steps=lambda peer: (record.limits.get(PREFILL_STEP) if (record := registry.get(peer)) else None),
    )
    return AuditedChains(chains, audits, speeds, me, time.monotonic)
