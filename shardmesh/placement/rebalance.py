"""Rebalance: when a serving node should move to another span, with hysteresis.

Nodes come and go, so spans chosen at join time (select.py) drift out of balance: a
departure leaves a thin stretch of blocks, or a gap. Every node therefore asks, now and
then (:func:`check_interval`), whether it would be more useful elsewhere. The answer:

* **Target.** Where it would go if it joined now: ``select.best_start`` with its own
  record left out (gaps first, then the weakest window, counting planned servers).
* **Safety.** Never move off a block that no other *online* server holds right now:
  moving takes minutes of loading, and a block whose only other holders are still
  joining would be unservable meanwhile. So a move never opens a gap.
* **Gaps.** If some block is in no planned span, move when the target covers one.
* **Imbalance, with hysteresis.** Otherwise move when the weakest block of the target
  is weaker, by more than ``margin`` (relative), than the weakest block of the node's
  current span, both without the node::

      min over target of planned(others)  <  (1 - margin) * min over my span of online(others)

  i.e. "a block elsewhere needs me clearly more than any block I hold now". The target
  side counts planned servers, so a gap that someone is already loading into is not
  rushed again; the side being left counts only online servers, since servers still
  loading there do not serve yet.

Why not ask for a ``margin`` gain of the swarm's bottleneck itself? Because one node of
a thousand carries a fraction of a percent of any block: its move can raise the
bottleneck by at most its own throughput, so a 20 % gain would never come, and the swarm
would stay as churn left it. The rule above is scale-free, and still safe:

* It cannot oscillate. The target's weakest block lies outside the current span (blocks
  in both are at least the current span's minimum), so the move lifts a block that is
  weaker than every block it lowers. List all per-block planned throughputs in
  increasing order: each move makes that list strictly larger (lexicographically), and
  there are finitely many placements, so moves made one after another always stop.
  Filling a gap ranks above all of this, and never opens one.
* It never lowers the bottleneck clients see, not even while the mover loads: the
  blocks it leaves keep more than the target's weakest block, which is no stronger
  than the swarm's weakest served block.
* The margin decides how flat "balanced" is and how often nodes move: when nobody
  wants to move, the weakest block is within ``margin`` of the weakest block of every
  node's span. Each move costs the mover minutes of not serving while it loads.

MARGIN = 0.1, from ``shardmesh sim`` (bottleneck as a fraction of the ideal, second half
of two simulated hours, mean of 5 seeds; see sim.py for the model):

* 1,000 independent nodes, 80 blocks: joining where the swarm is weakest already keeps
  it at ~0.94, the rest being the minutes newcomers spend loading; no node ever finds a
  10 % imbalance, so nobody moves (0.05 does not do better either).
* 1,000 nodes, half of them in fleets of 20 identical machines that start and stop
  together (so they land on one window and leave one deep dip): 0.904 vs 0.889 without
  rebalancing, 0.03 moves per churn event (0.05: 0.914 for 0.10).
* 30 nodes on 40 blocks: 0.842 vs 0.782, 0.6 moves per churn event (0.05: 0.852 for 1.1;
  0.15: 0.824 for 0.3).

Counts are *planned* (online + joining), so a node already announced as moving into a
gap is counted and a second node does not follow it there. The core,
:func:`move_target`, works on per-block sums (:class:`BlockSums`), so the simulator runs
this same code.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass

from .select import best_start, one_per_peer, planned_blocks, window_size
from .spans import ONLINE, ServerView, block_throughput, coverage, valid_span

MARGIN = 0.1  # how much weaker elsewhere must be before a node moves; see the module docstring


@dataclass
class BlockSums:
    """Per block: planned servers (online + joining) and online ones, counts and throughput.

    What the rules work on. Nodes build it from their view (:meth:`of`); the simulator
    keeps one up to date as its nodes come, move and go.
    """

    planned_n: list[int]
    planned_t: list[float]
    online_n: list[int]
    online_t: list[float]

    @classmethod
    def of(cls, servers: Iterable[ServerView], total_blocks: int) -> BlockSums:
        views = one_per_peer(servers)
        planned_n, planned_t = planned_blocks(views, total_blocks)
        return cls(planned_n, planned_t, coverage(views, total_blocks), block_throughput(views, total_blocks))


def move_target(
    sums: BlockSums,
    start: int,
    end: int,
    my_throughput: float,
    capacity: int,
    *,
    margin: float = MARGIN,
) -> tuple[int, int] | None:
    """The span an online node serving ``[start, end)`` should move to, or None to stay.

    ``sums`` counts the node itself, as online. Cheap when the answer is "stay" (a few
    C-speed slices), which it almost always is.
    """
    if not 0 <= margin < 1:
        raise ValueError(f"margin must be in [0, 1), not {margin}")
    planned_t = sums.planned_t
    total = len(planned_t)
    n = window_size(capacity, total)
    mine = my_throughput if my_throughput > 0 else 0.0  # NaN > 0 is False
    # What my blocks keep if I go: counted online, not planned, so that a node does not
    # leave blocks whose other servers are still loading (and would dip meanwhile).
    here = min(sums.online_t[start:end]) - mine
    gaps_now = sums.planned_n.count(0)
    if not gaps_now and not mine:
        return None  # adds no throughput anywhere: moving cannot even out anything
    if not gaps_now:
        # Quick screen. The target always holds the weakest planned block of the swarm
        # without me (select's second key), so the rule at the end reduces to this.
        weakest = min(min(planned_t[start:end]) - mine, min(planned_t[:start], default=math.inf),
                      min(planned_t[end:], default=math.inf))
        if not weakest < (1 - margin) * here:
            return None
    others_n = list(sums.planned_n)
    others_t = list(planned_t)
    for b in range(start, end):
        others_n[b] -= 1
        others_t[b] -= mine
    to = best_start(others_n, others_t, n)
    if (to, to + n) == (start, end):
        return None
    for b in range(start, end):
        if not to <= b < to + n and sums.online_n[b] <= 1:
            return None  # only I serve it now: leaving would open a gap
    if gaps_now:
        gaps_after = sum(1 for b in range(total) if others_n[b] <= 0 and not to <= b < to + n)
        return (to, to + n) if gaps_after < gaps_now else None
    if min(others_t[to:to + n]) < (1 - margin) * here:
        return to, to + n
    return None


def plan_move(
    servers: Iterable[ServerView], total_blocks: int, me: str, capacity: int, *, margin: float = MARGIN
) -> tuple[int, int] | None:
    """Where ``me`` should move, as ``(start, end)``, or None to stay.

    ``servers`` is the swarm as the registry sees it, ``me``'s current record included.
    Only an online node moves: with no record, or one that is joining (still loading),
    draining or has an impossible span, the answer is None. ``capacity`` (>= 1, else
    ValueError) is how many blocks the node has room for. See the module docstring for
    the rule and why it cannot oscillate.
    """
    views = one_per_peer(servers)
    own = next((s for s in views if s.peer == me), None)
    if own is None or own.state != ONLINE or not valid_span(own, total_blocks):
        window_size(capacity, max(total_blocks, 1))  # still reject a bad capacity
        return None
    return move_target(BlockSums.of(views, total_blocks), own.start, own.end,
                       own.throughput, capacity, margin=margin)


def check_interval(rng: random.Random, mean: float = 30.0) -> float:
    """Seconds before the next rebalance check: uniform in [0.5, 1.5] * mean.

    Random so that nodes which saw the same departure do not all decide at once: the
    first to check moves and announces it (joining), and the others see that.
    """
    return rng.uniform(0.5, 1.5) * mean
