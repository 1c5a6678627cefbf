"""The wiring: one node's whole life, and the only package that imports several rooms.

``run.py`` starts everything in one nursery (host, registry, hop server, span keeper,
gateway) and drains it on a signal; the other modules are what it needs for that: the
configuration, the model's metadata, the backend choice, loading and running blocks,
the gateway's chain opener and routing policy, its source of draft tokens, the span keeper that joins, moves and
drains, and reachability (published addresses, dial-back, relays). Tensor libraries are imported only inside the functions that load blocks,
so a ``--layers none`` gateway never loads one. See ``docs/ARCHITECTURE.md``.

The names below are this package's public modules; importing the package loads none
of them (``from shardmesh.node import run`` does).
"""

__all__ = [
    "backend", "blocks", "chains", "config", "drafting", "heap", "model", "node_metrics", "open_gateway", "openmp_spin",
    "reachability", "run", "span_keeper", "startup",
]
