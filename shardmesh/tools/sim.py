"""``shardmesh sim``: run the placement simulator and print how both policies fare.

The simulation itself is pure (placement/sim.py); this module only turns flags into a
:class:`SimConfig` and the result into a table: a few rows over time, then the steady
state (second half of the run) side by side for "ours" (select on join + rebalance) and
the join-only baseline.
"""

from __future__ import annotations

import argparse
import sys

from ..placement.rebalance import MARGIN
from ..placement.sim import PolicyRun, Sample, SimConfig, SimResult, simulate

HELP = "simulate placement on a large swarm with churn: rebalancing vs join-only"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``shardmesh sim``."""
    d = SimConfig()
    parser.add_argument("--nodes", type=int, default=d.nodes, help=f"swarm size (default {d.nodes})")
    parser.add_argument("--blocks", type=int, default=d.blocks, help=f"blocks in the model (default {d.blocks})")
    parser.add_argument("--duration", type=float, default=d.duration_s / 60, metavar="MINUTES",
                        help=f"simulated time (default {d.duration_s / 60:g})")
    parser.add_argument("--churn", type=float, default=d.churn_per_hour, metavar="PER_HOUR",
                        help="departures per node per hour, each replaced by a newcomer on average "
                             f"(default {d.churn_per_hour:g}: nodes stay an hour on average)")
    parser.add_argument("--crash-share", type=float, default=d.crash_share, metavar="FRACTION",
                        help="departures that are crashes, noticed only when the record expires "
                             f"(default {d.crash_share:g})")
    parser.add_argument("--fleet", type=int, default=d.fleet_size, metavar="N",
                        help="some nodes come as fleets of N identical machines that start and stop "
                             f"together (default {d.fleet_size}: every node on its own)")
    parser.add_argument("--fleet-share", type=float, default=d.fleet_share, metavar="FRACTION",
                        help="share of the nodes that belong to fleets, with --fleet N > 1 "
                             f"(default {d.fleet_share:g})")
    parser.add_argument("--margin", type=float, default=MARGIN,
                        help=f"rebalancing hysteresis (default {MARGIN:g})")
    parser.add_argument("--load-s", type=float, default=d.load_s, metavar="S",
                        help=f"seconds to load a span, before the per-block time (default {d.load_s:g})")
    parser.add_argument("--load-s-per-block", type=float, default=d.load_s_per_block, metavar="S",
                        help=f"seconds to load each block of a span (default {d.load_s_per_block:g})")
    parser.add_argument("--seed", type=int, default=d.seed, help=f"random seed (default {d.seed})")
    parser.add_argument("--rows", type=int, default=10, help="rows of the table over time (default 10)")


def config_from(args: argparse.Namespace) -> SimConfig:
    """ValueError for values that make no sense (no nodes, a negative churn, ...)."""
    return SimConfig(
        nodes=args.nodes, blocks=args.blocks, duration_s=args.duration * 60,
        churn_per_hour=args.churn, crash_share=args.crash_share, margin=args.margin,
        load_s=args.load_s, load_s_per_block=args.load_s_per_block, seed=args.seed,
        fleet_size=args.fleet, fleet_share=args.fleet_share,
    )


def _clock(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60}:{minutes % 60:02d}"


def _rows(samples: tuple[Sample, ...], count: int) -> list[int]:
    """Indices of ``count`` samples spread evenly over the run, the last one included."""
    n = len(samples)
    return sorted({max(0, round((k + 1) * n / count) - 1) for k in range(min(count, n))})


def render(result: SimResult, rows: int = 10) -> str:
    """The report: a header, the table over time and the steady-state summary."""
    c = result.config
    ours, base = result.ours, result.baseline
    fleets = (f", {c.fleet_share:.0%} of nodes in fleets of {c.fleet_size}" if c.fleet_size > 1 else "")
    lines = [
        f"shardmesh sim: {c.nodes} nodes, {c.blocks} blocks, {c.duration_s / 3600:g} h simulated, "
        f"churn {c.churn_per_hour:g}/node/h ({c.crash_share:.0%} crashes){fleets}, margin {c.margin:g}, seed {c.seed}",
        "",
        "                   ideal     coverage      bottleneck/ideal     moves   churn",
        "  time   nodes    tok/s    ours   base       ours    base        ours  events",
    ]
    for i in _rows(ours.samples, rows):
        o, b = ours.samples[i], base.samples[i]
        lines.append(
            f"{_clock(o.time_s):>6} {o.nodes:>7} {o.ideal:>8.0f}   {o.coverage:>5.3f}  {b.coverage:>5.3f}"
            f"      {o.ratio:>5.3f}   {b.ratio:>5.3f}   {o.moves:>9}  {o.churn:>6}"
        )
    so, sb = ours.steady(), base.steady()
    half = ours.samples[-1].time_s / 2
    churn = ours.samples[-1].churn - next(s.churn for s in ours.samples if s.time_s >= half)
    lines += [
        "",
        f"steady state (from {_clock(half)} on, {churn} churn events)   ours   baseline",
        f"  bottleneck/ideal, mean                     {so.mean_ratio:>6.3f}   {sb.mean_ratio:>6.3f}",
        f"  bottleneck/ideal, min                      {so.min_ratio:>6.3f}   {sb.min_ratio:>6.3f}",
        f"  coverage, min                              {so.min_coverage:>6.3f}   {sb.min_coverage:>6.3f}",
        f"  moves per churn event                      {so.moves_per_churn:>6.3f}   {sb.moves_per_churn:>6.3f}",
        f"  moves in the whole run                     {_moves(ours):>6}   {_moves(base):>6}",
    ]
    if not _moves(ours):
        lines.append(f"  (no node ever found a block more than {c.margin:.0%} weaker than its own: "
                     "ours did what join-only does)")
    return "\n".join(lines)


def _moves(run: PolicyRun) -> int:
    return run.samples[-1].moves


def run(args: argparse.Namespace) -> int:
    """``shardmesh sim``: 0 on success, 2 for flags that make no sense."""
    try:
        config = config_from(args)
        if args.rows < 1:
            raise ValueError("--rows must be at least 1")
    except ValueError as exc:
        print(f"shardmesh sim: {exc}", file=sys.stderr)
        return 2
    print(render(simulate(config), args.rows))
    return 0
