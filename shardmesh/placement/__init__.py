"""Placement: the swarm's decisions as pure functions, and a simulator to test them.

Which blocks a joining node serves (``select``), when a serving node moves
(``rebalance``), how many blocks fit its memory (``capacity``), which chain of peers a
request takes (``routing``), which chain holds a history's prefix (``prefix_routes``)
and how much of a server's claimed speed it believes
(``claims``), and what the swarm's coverage and bottleneck are
(``spans``). Lists of :class:`ServerView` in, numbers out: no clock, no I/O, and no
import of anything else in shardmesh, so every rule can be tested alone and the
simulator (``sim``) runs the very code nodes run. See ``docs/ARCHITECTURE.md``,
"Placement".

Light and pure, so this package re-exports its public functions and types.
"""

from .capacity import blocks_that_fit, window_bytes
from .claims import MeasuredSpeeds, capped_claims
from .prefix_routes import HeldPrefix, PrefixRoutes, still_served, worth_taking
from .rebalance import MARGIN, BlockSums, check_interval, move_target, plan_move
from .routing import CACHE_PENALTY_MS, FailureBackoff, Hop, find_route, route_cost
from .select import best_start, choose_span, planned, planned_blocks, window_size
from .sim import SimConfig, SimResult, simulate
from .spans import DRAINING, JOINING, ONLINE, STATES, Repair, ServerView, block_throughput, bottleneck, coverage, gaps, is_complete, repair, valid_span

__all__ = [
    "BlockSums",
    "CACHE_PENALTY_MS",
    "DRAINING",
    "FailureBackoff",
    "HeldPrefix",
    "Hop",
    "JOINING",
    "MARGIN",
    "MeasuredSpeeds",
    "ONLINE",
    "PrefixRoutes",
    "Repair",
    "STATES",
    "ServerView",
    "SimConfig",
    "SimResult",
    "best_start",
    "block_throughput",
    "blocks_that_fit",
    "bottleneck",
    "capped_claims",
    "check_interval",
    "choose_span",
    "coverage",
    "find_route",
    "gaps",
    "is_complete",
    "move_target",
    "plan_move",
    "planned",
    "planned_blocks",
    "repair",
    "route_cost",
    "simulate",
    "still_served",
    "valid_span",
    "window_bytes",
    "window_size",
    "worth_taking",
]
