"""The gateway's chain opener over the swarm.

Each chain :class:`MeshChains` makes is a :class:`~shardmesh.mesh.chain_client.RemoteChain`
that picks its route only when it opens (the swarm may have changed since the request
came) and reports the peers that failed or served it, so that routing can avoid or
trust them. The chains of one gateway share what they measure of step times
(:mod:`.deadlines`) and the probe that finds a silent hop when a token is lost.
"""

from __future__ import annotations

from typing import Any, Callable

import trio

from ..contract import SamplingParams
from ..placement.prefix_routes import PrefixRoutes
from ..placement.routing import Hop
from .chain_client import Probe, RemoteChain, RouteFinder
from .deadlines import StepTimes
from .gateway_ticket import TicketIssuer
from .link_offers import Links
from .result_trunks import ChainTrunks

__all__ = ["MeshChains"]


def _ignore(_: Any) -> None:
    return None


class MeshChains:
    """The gateway's chain opener over the mesh: routes each new session afresh."""

    def __init__(
        self,
        *,
        nursery: trio.Nursery,
        open_stream: Callable[[str], Any],
        find_route: RouteFinder,
        model_id: str,
        gateway: str,
        on_failure: Callable[[str], None] = _ignore,
        on_success: Callable[[list[Hop]], None] = _ignore,
        links: Links | None = None,
        probe: Probe | None = None,
        issuer: TicketIssuer | None = None,
        trunks: ChainTrunks | None = None,
        prefixes: PrefixRoutes | None = None,
        prefill_steps: Callable[[str], int | None] = lambda peer: None,
    ) -> None:
        self.nursery = nursery
        self.prefill_steps = prefill_steps  # peer -> the prefill step its record publishes
        self.links = links
        self.probe = probe  # who is silent when a token is lost (RemoteChain._silent_hop)
        self.open_stream = open_stream
        self.find_route = find_route  # (tokens needed, peers to avoid) -> a route, or None
        self.model_id = model_id
        self.gateway = gateway
        self.issuer = issuer
        self.trunks = trunks  # steps and tokens of its chains, many sessions a frame
        self.prefixes = prefixes  # None: no prefix cache; else which routes hold which prefixes
        self.on_failure = on_failure
        self.on_success = on_success
        self.step_times = StepTimes()  # shared by its chains: their bounds follow what they measured

    def available(self) -> bool:
        return self.find_route(0) is not None

    def chain(
        self, session_id: str, sampling: SamplingParams, prompt_ids: list[int], generated: list[int],
        avoid: frozenset[str] = frozenset(), *, route: list[Hop] | None = None,
    ) -> RemoteChain:
        """A chain routed when it opens, or over ``route`` if one is given."""
        return RemoteChain(
            nursery=self.nursery,
            open_stream=self.open_stream,
            session_id=session_id,
            model_id=self.model_id,
            gateway=self.gateway,
            sampling=sampling.to_dict(),
            prompt_ids=prompt_ids,
            generated=generated,
            links=self.links,
            route=route,
            find_route=None if route is not None else self.find_route,
            avoid=avoid,
            on_failure=self.on_failure,
            on_success=self.on_success,
            step_times=self.step_times,
            probe=self.probe,
            issuer=self.issuer,
            trunks=self.trunks,
            prefixes=self.prefixes,
            prefill_steps=self.prefill_steps,
        )
