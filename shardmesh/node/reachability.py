"""Being reachable: which addresses the record publishes, dial-back, and relays.

Wired here for :func:`.run.serve_node`: the node answers others' dial-back requests and
asks peers to dial it (its ``reach``, :mod:`..mesh.dialback`); its record carries the
addresses that others can use (:mod:`..mesh.own_addresses`); a public node relays for
nodes behind NATs unless ``--relay-service off`` (:mod:`..mesh.relay_service`), and a
private node keeps reservations on public ones (:mod:`..mesh.relay_client`); relayed
connections are made direct by hole punching where the NATs allow (:mod:`..mesh.hole_punch`).
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import trio

from ..mesh.addresses import port_of, with_peer_id
from ..mesh.dialback import MAX_PORTS, PRIVATE, PUBLIC, PROTOCOL as DIALBACK_PROTOCOL, DialBackServer, dial_with_fresh_identity, watch_reachability
from ..mesh.hole_punch import HolePunching
from ..mesh.host import MeshHost
from ..mesh.own_addresses import OwnAddresses, likely_behind_nat
from ..mesh.registry import Registry
from ..mesh.relay_client import CircuitAcceptor, Reservations
from ..mesh.relay_service import RelayService
from ..mesh.relay_wire import HOP, STOP
from ..mesh.swarm_key import SwarmKey
from .config import NodeConfig, UsageError

__all__ = ["own_addresses", "use_relays", "watch_own_reachability"]


def own_addresses(mesh: MeshHost, config: NodeConfig, publish: Callable[..., object]) -> OwnAddresses:
    """Our addresses as the record will carry them (mesh/own_addresses.py): ``--announce``
    ones as given; a node that looks to be behind a NAT holds its listening ones back
    until peers say whether they can dial them."""
    announced = []
    for address in config.announce:
        pinned = with_peer_id(address, mesh.peer_id_str)
        if pinned is None:
            raise UsageError(f"--announce {address}: names another peer than this node ({mesh.peer_id_str})")
        announced.append(pinned)
    listening = mesh.dialable_addrs()
    hold = likely_behind_nat(listening, config.join)
    return OwnAddresses(mesh.peer_id_str, listening, publish, announced=announced, hold_until_known=hold)


def watch_own_reachability(
    mesh: MeshHost, registry: Registry, own: OwnAddresses, swarm_key: SwarmKey | None, nursery: trio.Nursery
) -> None:
    """Answer others' dial-back requests, and ask peers whether they can dial us: the
    record's ``reach``, and with it the addresses it publishes (mesh/dialback.py)."""
    server = DialBackServer(partial(dial_with_fresh_identity, swarm_key=swarm_key))
    mesh.set_handler(DIALBACK_PROTOCOL, server.handle)
    # Announced ports too: a router may forward another port than the one we listen on.
    ports = sorted({port for addr in [*map(str, mesh.addrs()), *own.announced] if (port := port_of(addr))})[:MAX_PORTS]
    me = mesh.peer_id_str

    def others() -> list[str]:  # swarm members first; any connected peer may still answer
        members = [r.peer for r in registry.records() if r.peer != me]
        return members + [p for p in (c.to_base58() for c in mesh.connected_peers()) if p not in members]

    nursery.start_soon(watch_reachability, mesh, others, ports, own.set_reach)


def use_relays(mesh: MeshHost, registry: Registry, own: OwnAddresses, config: NodeConfig, nursery: trio.Nursery) -> None:
    """Relay for others while public (unless ``--relay-service off``); while private,
    hold reservations on public peers and publish the circuit addresses."""
    if config.relay_service:
        service = RelayService(mesh, own.addrs, open_for=lambda: own.reach == PUBLIC)
        mesh.set_handler(HOP, service.handle)
    me = mesh.peer_id_str

    def public_peers() -> list[tuple[str, list[str]]]:  # connected ones first: no dial needed
        found = [(r.peer, list(r.addrs)) for r in registry.records() if r.reach == PUBLIC and r.peer != me and r.addrs]
        return sorted(found, key=lambda pa: not mesh.is_connected(pa[0]))

    reservations = Reservations(mesh, public_peers, wanted=lambda: own.reach == PRIVATE, publish=own.set_relayed)
    mesh.set_handler(STOP, CircuitAcceptor(mesh, reservations.relays).handle)
    nursery.start_soon(reservations.run)
    nursery.start_soon(HolePunching(mesh).run)  # relayed connections made direct where NATs allow
