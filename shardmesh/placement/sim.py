"""Sim: thousands of nodes joining, moving and leaving, to see where placement leads.

The question placement must answer at scale: with many heterogeneous nodes coming and
going, does the swarm keep every block served, and how close does its bottleneck stay to
what its hardware could give? This simulator runs the *same* select and rebalance code
that nodes run (:func:`select.best_start`, :func:`rebalance.move_target`) on a swarm of
simulated nodes, and measures.

The model, one run:

* **Nodes.** Each has a capacity in blocks (log-uniform from 2 blocks to 1.5x the model,
  so about one in ten holds the whole model, the median a fifth of it) and a per-block
  throughput (lognormal, median 100 tokens/s, spread 0.7, whole numbers: integer sums
  are exact, so runs do not depend on the order of float additions).
* **Churn.** ``nodes`` join during the first five minutes; after that newcomers arrive as
  a Poisson process and every node stays an exponential lifetime of mean
  ``1 / churn`` hours, so the swarm stays near ``nodes``. A share of departures are
  crashes: a gracefully leaving node drops its record (it announced ``draining``), a
  crashed one stops serving at once but its record lingers for the record TTL,
  misleading the others until it expires.
* **Fleets** (off by default). Some operators start many identical machines at once
  and stop them together. With ``fleet_size`` > 1, ``fleet_share`` of the nodes come in
  such fleets: members that start within the gossip delay of each other see the same
  swarm and pick the same window, and a fleet that stops leaves one deep dip at once.
* **Gossip.** Every record change (joining, online, draining) reaches the others
  ``gossip_s`` later; all nodes share that one slightly stale view.
* **Joining.** A node picks its span with select on that view, announces it
  (``joining``) and serves after loading its weights (30 s + 2 s per block).
* **Rebalancing** (policy "ours"). Each online node checks at random intervals
  (:func:`rebalance.check_interval`); a node that moves announces its new span as
  joining, stops serving the old one, and serves again once loaded. The baseline policy
  is the same without these checks: select on join, never move.

Both policies see the very same nodes, arrivals and departures (drawn once from the
seed), so their difference is the policy alone. Every minute of simulated time a sample
records the swarm as clients see it, from online, live servers only: coverage (fraction
of blocks with a server), bottleneck (the smallest per-block throughput) and the ideal
bound, every live node's capacity spread evenly over the blocks:
``sum_i throughput_i * min(capacity_i, L) / L``.

What it shows (figures in rebalance.py): with many independent nodes, joining where the
swarm is weakest is nearly all that matters. The bottleneck stays within a few percent
of the ideal, and what is lost is mostly the minutes newcomers spend loading (with
instant loading both policies reach ~0.98), so rebalancing finds nothing worth a move.
It pays where churn is lumpy: small swarms, and fleets that come and go together.

Pure: no clock, no printing, no files; the same config gives the same result.
"""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass

from .rebalance import MARGIN, BlockSums, check_interval, move_target
from .select import best_start, window_size

BOOTSTRAP_S = 300.0  # the first `nodes` nodes arrive in this window


@dataclass(frozen=True)
class SimConfig:
    """One simulated run; times in simulated seconds."""

    nodes: int = 1000  # the swarm's size: the first wave, and the steady state
    blocks: int = 80
    duration_s: float = 2 * 3600.0
    churn_per_hour: float = 1.0  # departures per node per hour (newcomers replace them)
    crash_share: float = 0.3  # departures that are crashes, not graceful leaves
    record_ttl_s: float = 45.0  # how long a crashed node's record lingers
    gossip_s: float = 2.0  # how long a record change takes to reach the other nodes
    fleet_size: int = 1  # > 1: some nodes come as fleets of identical machines (draw_arrivals)
    fleet_share: float = 0.5  # the share of nodes that belong to fleets, when fleet_size > 1
    fleet_spread_s: float = 5.0  # a fleet's machines start within this many seconds
    load_s: float = 30.0  # time to load a span: load_s + load_s_per_block * blocks
    load_s_per_block: float = 2.0
    check_mean_s: float = 30.0  # mean interval between a node's rebalance checks
    margin: float = MARGIN
    sample_every_s: float = 60.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.blocks < 1:
            raise ValueError("a swarm needs at least one node and one block")
        if not self.duration_s > 0 or not self.sample_every_s > 0 or not self.check_mean_s > 0:
            raise ValueError("duration, sample interval and check interval must be positive")
        if self.duration_s < self.sample_every_s:
            raise ValueError(f"the run must last at least one sample interval ({self.sample_every_s:g} s)")
        if self.load_s < 0 or self.load_s_per_block < 0:
            raise ValueError("load times must be non-negative")
        if self.churn_per_hour < 0 or not 0 <= self.crash_share <= 1 or self.record_ttl_s < 0:
            raise ValueError("churn, crash share and record TTL must be non-negative (crash share <= 1)")
        if self.fleet_size < 1 or not 0 <= self.fleet_share < 1 or self.fleet_spread_s < 0:
            raise ValueError("fleet size must be at least 1, fleet share in [0, 1), spread non-negative")
        if not 0 <= self.gossip_s <= min(self.check_mean_s / 2, self.record_ttl_s):
            # A node's own last change must have reached the view when it next checks
            # (at least half a check interval after it comes online), and before its
            # record can expire.
            raise ValueError("gossip delay must be at most half the check interval and the record TTL")
        if not 0 <= self.margin < 1:
            raise ValueError(f"margin must be in [0, 1), not {self.margin}")


@dataclass(frozen=True)
class Arrival:
    """A node of the run: when it comes, when it goes, how, and what it has."""

    node: int
    join_s: float
    leave_s: float  # may lie past the end of the run
    crash: bool
    capacity: int  # blocks it has room for
    throughput: int  # tokens/s per block
    initial: bool  # part of the first wave (not a churn event)


@dataclass(frozen=True)
class Sample:
    """The swarm at one moment, as clients see it (online, live servers only)."""

    time_s: float
    nodes: int  # live nodes, loading or serving
    coverage: float  # fraction of blocks with at least one server
    bottleneck: float  # smallest per-block throughput, tokens/s
    ideal: float  # every live node's capacity spread evenly over the blocks
    moves: int  # moves so far
    churn: int  # churn events so far (departures, and arrivals after the first wave)

    @property
    def ratio(self) -> float:
        """Bottleneck as a fraction of the ideal bound."""
        return self.bottleneck / self.ideal if self.ideal > 0 else 0.0


@dataclass(frozen=True)
class Steady:
    """Summary of the second half of a run, when the first wave has settled."""

    mean_ratio: float
    min_ratio: float
    min_coverage: float
    moves_per_churn: float


@dataclass(frozen=True)
class PolicyRun:
    name: str
    samples: tuple[Sample, ...]

    def steady(self) -> Steady:
        """Mean and min bottleneck/ideal, min coverage, moves per churn event: second half."""
        end = self.samples[-1]
        half = [s for s in self.samples if s.time_s >= end.time_s / 2]
        first = half[0]
        churn = end.churn - first.churn
        return Steady(
            mean_ratio=sum(s.ratio for s in half) / len(half),
            min_ratio=min(s.ratio for s in half),
            min_coverage=min(s.coverage for s in half),
            moves_per_churn=(end.moves - first.moves) / churn if churn else 0.0,
        )


@dataclass(frozen=True)
class SimResult:
    config: SimConfig
    ours: PolicyRun  # select on join + rebalance with hysteresis
    baseline: PolicyRun  # select on join, never move


def draw_arrivals(config: SimConfig) -> list[Arrival]:
    """Every node of the run, in order of arrival: the same for both policies.

    Nodes arrive in groups: a lone node, or (``fleet_size`` > 1) a fleet of identical
    machines that start within ``fleet_spread_s`` of each other and stop together.
    ``fleet_share`` of all nodes belong to fleets.
    """
    rng = random.Random(f"shardmesh-sim-churn-{config.seed}")
    mean_life_s = 3600.0 / config.churn_per_hour if config.churn_per_hour > 0 else math.inf
    size = config.fleet_size
    share = config.fleet_share if size > 1 else 0.0
    p_fleet = share / (size * (1 - share) + share)  # a group is a fleet: share of nodes in fleets
    mean_group = p_fleet * size + (1 - p_fleet)
    low, high = math.log(2), math.log(1.5 * config.blocks)
    rows: list[tuple[float, float, bool, int, int, bool]] = []

    def group(start: float, initial: bool) -> None:
        k = size if rng.random() < p_fleet else 1
        capacity = max(1, min(config.blocks, round(math.exp(rng.uniform(low, high)))))
        throughput = max(1, round(rng.lognormvariate(math.log(100.0), 0.7)))
        leave = start + (rng.expovariate(1.0 / mean_life_s) if mean_life_s < math.inf else math.inf)
        crash = rng.random() < config.crash_share
        for _ in range(k):
            join = start + (rng.uniform(0.0, config.fleet_spread_s) if k > 1 else 0.0)
            rows.append((join, max(join, leave), crash, capacity, throughput, initial))

    while len(rows) < config.nodes:  # the first wave
        group(rng.uniform(0.0, BOOTSTRAP_S), True)
    rate = config.nodes / mean_life_s / mean_group  # groups per second that keep the size steady
    t = BOOTSTRAP_S
    while rate > 0:
        t += rng.expovariate(rate)
        if t >= config.duration_s:
            break
        group(t, False)
    rows.sort()
    return [Arrival(i, *row) for i, row in enumerate(rows)]


# Event kinds, in the order they are handled when they fall at the same instant.
_VIEW, _LEAVE, _EXPIRE, _JOIN, _READY, _CHECK, _SAMPLE = range(7)


class _Swarm:
    """One policy's run: per-block sums kept up to date as nodes come, move and go.

    Three views of the same nodes. What the registry shows, ``gossip_s`` late: *planned*
    (records that say online or joining, crashed nodes' included until they expire:
    what placement sees) and *online* (records that say online: what the safety rule
    sees). And what clients get, measured: *serving* (live nodes that are online).

    Every node sees the same registry: the true records as they were ``gossip_s`` ago
    (SimConfig insists that a node's own last change has arrived by the time it checks,
    so the records it subtracts as "mine" are really there).
    """

    def __init__(self, config: SimConfig, arrivals: list[Arrival], rebalance: bool) -> None:
        self.c = config
        self.arrivals = arrivals
        self.rebalance = rebalance
        self.rng = random.Random(f"shardmesh-sim-checks-{config.seed}")
        L = config.blocks
        self.view = BlockSums([0] * L, [0] * L, [0] * L, [0] * L)  # type: ignore[arg-type]
        self.serving_n, self.serving_t = [0] * L, [0] * L
        n = len(arrivals)
        self.span = [(0, 0)] * n  # of its record
        self.published = [False] * n  # it has a record in the registry
        self.online = [False] * n  # its record says online (else joining)
        self.alive = [False] * n
        self.epoch = [0] * n  # bumped on every move and departure: stale events are dropped
        self.live, self.ideal_sum, self.moves, self.churn = 0, 0, 0, 0
        self.events: list[tuple] = []
        self.seq = 0
        self.now = 0.0
        self.samples: list[Sample] = []

    def push(self, when: float, kind: int, node: int = -1, change: tuple = ()) -> None:
        self.seq += 1  # ties in time and kind go first-come, first-served
        epoch = self.epoch[node] if node >= 0 else 0
        heapq.heappush(self.events, (when, kind, self.seq, node, epoch, change))

    # -- the registry, as others see it

    def publish(self, node: int, planned: int, online: int, *, delay: float | None = None) -> None:
        """Add (+1) or remove (-1) the node's record from the planned / online sums, late."""
        start, end = self.span[node]
        change = (start, end, self.arrivals[node].throughput, planned, online)
        delay = self.c.gossip_s if delay is None else delay
        if delay > 0:
            self.push(self.now + delay, _VIEW, node, change)
        else:
            self.apply(change)

    def apply(self, change: tuple) -> None:
        start, end, t, planned, online = change
        v = self.view
        pn, pt, on, ot = v.planned_n, v.planned_t, v.online_n, v.online_t
        for b in range(start, end):
            pn[b] += planned
            pt[b] += t * planned
            on[b] += online
            ot[b] += t * online

    def announce(self, node: int, start: int, end: int) -> None:
        """The node's record says joining [start, end); it serves once loaded."""
        self.span[node] = (start, end)
        self.published[node], self.online[node] = True, False
        self.publish(node, +1, 0)
        self.push(self.now + self.c.load_s + self.c.load_s_per_block * (end - start), _READY, node)

    def withdraw(self, node: int, *, delay: float | None = None) -> None:
        if self.published[node]:
            self.publish(node, -1, -1 if self.online[node] else 0, delay=delay)
            self.published[node] = False

    # -- what clients get

    def serve(self, node: int, sign: int) -> None:
        start, end = self.span[node]
        t = self.arrivals[node].throughput * sign
        sn, st = self.serving_n, self.serving_t
        for b in range(start, end):
            sn[b] += sign
            st[b] += t

    # -- events

    def join(self, node: int) -> None:
        a = self.arrivals[node]
        self.alive[node] = True
        self.live += 1
        self.ideal_sum += a.throughput * min(a.capacity, self.c.blocks)
        self.churn += not a.initial
        n = window_size(a.capacity, self.c.blocks)
        start = best_start(self.view.planned_n, self.view.planned_t, n)
        self.announce(node, start, start + n)
        if a.leave_s <= self.c.duration_s:
            self.push(a.leave_s, _LEAVE, node)

    def ready(self, node: int) -> None:
        self.online[node] = True
        self.publish(node, 0, +1)
        self.serve(node, +1)
        if self.rebalance:
            self.push(self.now + check_interval(self.rng, self.c.check_mean_s), _CHECK, node)

    def check(self, node: int) -> None:
        start, end = self.span[node]
        a = self.arrivals[node]
        to = move_target(self.view, start, end, a.throughput, a.capacity, margin=self.c.margin)
        if to is None:
            self.push(self.now + check_interval(self.rng, self.c.check_mean_s), _CHECK, node)
            return
        # As a real node does: announce the new span (joining), drop the old one, load.
        self.moves += 1
        self.serve(node, -1)
        self.withdraw(node)
        self.epoch[node] += 1
        self.announce(node, *to)

    def leave(self, node: int) -> None:
        a = self.arrivals[node]
        if self.online[node]:
            self.serve(node, -1)
        self.alive[node] = False
        self.epoch[node] += 1
        self.live -= 1
        self.ideal_sum -= a.throughput * min(a.capacity, self.c.blocks)
        self.churn += 1
        if a.crash:  # nobody hears of it: the record lingers until it expires
            self.push(self.now + self.c.record_ttl_s, _EXPIRE, node)
        else:  # announces draining, which travels like any other change
            self.withdraw(node)

    def sample(self) -> None:
        L = self.c.blocks
        self.samples.append(Sample(
            time_s=self.now,
            nodes=self.live,
            coverage=(L - self.serving_n.count(0)) / L,
            bottleneck=float(min(self.serving_t)),
            ideal=self.ideal_sum / L,
            moves=self.moves,
            churn=self.churn,
        ))

    def run(self) -> tuple[Sample, ...]:
        for a in self.arrivals:
            self.push(a.join_s, _JOIN, a.node)
        k = 1
        while k * self.c.sample_every_s <= self.c.duration_s + 1e-9:
            self.push(k * self.c.sample_every_s, _SAMPLE)
            k += 1
        handlers = {_JOIN: self.join, _READY: self.ready, _CHECK: self.check}
        events = self.events
        while events:
            self.now, kind, _, node, epoch, change = heapq.heappop(events)
            if self.now > self.c.duration_s:
                break
            if kind == _VIEW:
                self.apply(change)
            elif kind == _SAMPLE:
                self.sample()
            elif kind == _EXPIRE:  # every registry drops it at once: no gossip needed
                self.withdraw(node, delay=0.0)
            elif kind == _LEAVE:
                self.leave(node)
            elif epoch == self.epoch[node]:  # else the node moved or left since
                handlers[kind](node)
        return tuple(self.samples)


def run_policy(config: SimConfig, arrivals: list[Arrival], *, rebalance: bool) -> PolicyRun:
    """Run one policy over ``arrivals``: "ours" with rebalancing, "baseline" without."""
    samples = _Swarm(config, arrivals, rebalance).run()
    return PolicyRun("ours" if rebalance else "baseline", samples)


def simulate(config: SimConfig) -> SimResult:
    """Both policies over the same arrivals and departures."""
    arrivals = draw_arrivals(config)
    return SimResult(config, run_policy(config, arrivals, rebalance=True),
                     run_policy(config, arrivals, rebalance=False))
