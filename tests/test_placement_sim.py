"""Tests for shardmesh.placement.sim and ``shardmesh sim``: deterministic, consistent, and
rebalancing earns its keep.

Sizes are kept small (a few hundred nodes, one simulated hour) so the file runs in a
few seconds; ``shardmesh sim`` runs the full 1,000-node case.
"""

from __future__ import annotations

import argparse

import pytest

from shardmesh.tools import sim as sim_cli
from shardmesh.placement.rebalance import BlockSums
from shardmesh.placement.sim import SimConfig, _Swarm, draw_arrivals, simulate
from shardmesh.placement.spans import ServerView

SMALL = SimConfig(nodes=120, blocks=24, duration_s=1800.0, churn_per_hour=2.0)


def test_same_seed_same_result_other_seed_other_result() -> None:
    first = simulate(SMALL)
    assert simulate(SMALL) == first
    other = simulate(SimConfig(**{**SMALL.__dict__, "seed": 1}))
    assert other.ours.samples != first.ours.samples
    assert draw_arrivals(SMALL) != draw_arrivals(SimConfig(**{**SMALL.__dict__, "seed": 1}))


def test_both_policies_see_the_same_churn() -> None:
    result = simulate(SMALL)
    assert [(s.time_s, s.nodes, s.ideal, s.churn) for s in result.ours.samples] == \
           [(s.time_s, s.nodes, s.ideal, s.churn) for s in result.baseline.samples]
    assert result.baseline.samples[-1].moves == 0
    assert len(result.ours.samples) == 30  # one a minute


def test_swarm_size_holds_steady_under_churn() -> None:
    result = simulate(SimConfig(nodes=300, blocks=24, duration_s=3600.0, churn_per_hour=2.0))
    sizes = [s.nodes for s in result.ours.samples[10:]]
    assert 240 < min(sizes) and max(sizes) < 360
    churn = result.ours.samples[-1].churn
    assert 1000 < churn < 1500  # ~300 nodes x 2/h leaving, as many arriving


def test_fleets_arrive_together_and_leave_together() -> None:
    arrivals = draw_arrivals(SimConfig(nodes=200, blocks=24, duration_s=3600.0, fleet_size=10))
    groups: dict[tuple, list] = {}
    for a in arrivals:
        groups.setdefault((a.leave_s, a.capacity, a.throughput), []).append(a)
    sizes = sorted(len(g) for g in groups.values())
    assert sizes[-1] == 10 and sizes[0] == 1
    fleets = [g for g in groups.values() if len(g) == 10]
    assert sum(len(g) for g in fleets) > 0.3 * len(arrivals)
    assert all(max(a.join_s for a in g) - min(a.join_s for a in g) <= 5.0 for g in fleets)


def _records(swarm: _Swarm) -> list[ServerView]:
    return [ServerView(str(i), *swarm.span[i], float(a.throughput),
                       state="online" if swarm.online[i] else "joining")
            for i, a in enumerate(swarm.arrivals) if swarm.published[i]]


def test_incremental_sums_match_the_records() -> None:
    # With instant gossip the kept sums must equal sums computed from the records, and
    # what is served must be exactly the live online nodes.
    config = SimConfig(nodes=150, blocks=20, duration_s=1800.0, churn_per_hour=3.0,
                       gossip_s=0.0, fleet_size=5)
    swarm = _Swarm(config, draw_arrivals(config), rebalance=True)
    swarm.run()
    assert swarm.moves > 0
    assert swarm.view == BlockSums.of(_records(swarm), config.blocks)
    serving = [r for r in _records(swarm) if r.state == "online" and swarm.alive[int(r.peer)]]
    assert BlockSums.of(serving, config.blocks).online_t == swarm.serving_t


def test_rebalancing_beats_join_only_where_churn_is_lumpy() -> None:
    # Half the nodes in fleets of 20 identical machines: a fleet starting together lands
    # on one window, and one stopping leaves a deep dip. Joining alone cannot undo that.
    config = SimConfig(nodes=300, blocks=80, duration_s=3600.0, fleet_size=20, seed=3)
    result = simulate(config)
    ours, base = result.ours.steady(), result.baseline.steady()
    assert ours.mean_ratio >= 0.8
    assert ours.mean_ratio > base.mean_ratio + 0.03
    assert ours.min_coverage == 1.0
    assert ours.moves_per_churn < 1.0


def test_small_swarm_rebalancing_pays() -> None:
    config = SimConfig(nodes=40, blocks=40, duration_s=7200.0, seed=4)
    result = simulate(config)
    ours, base = result.ours.steady(), result.baseline.steady()
    assert ours.mean_ratio >= 0.8 and ours.mean_ratio > base.mean_ratio + 0.05


def test_large_independent_swarm_ours_at_least_as_good() -> None:
    # Many independent nodes: joining where the swarm is weakest already keeps it near
    # the bound; rebalancing must not make it worse, nor move for nothing.
    result = simulate(SimConfig(nodes=300, blocks=80, duration_s=3600.0))
    ours, base = result.ours.steady(), result.baseline.steady()
    assert ours.mean_ratio >= 0.85 and ours.mean_ratio >= base.mean_ratio - 0.005
    assert ours.moves_per_churn < 0.1


def test_config_rejects_nonsense() -> None:
    for bad in ({"nodes": 0}, {"blocks": 0}, {"duration_s": 0.0}, {"churn_per_hour": -1.0},
                {"crash_share": 1.5}, {"margin": 1.0}, {"fleet_size": 0}, {"gossip_s": 20.0},
                {"load_s": -1.0}):
        with pytest.raises(ValueError):
            SimConfig(**bad)


# ---------------------------------------------------------------- shardmesh sim


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="shardmesh sim")
    sim_cli.add_arguments(parser)
    code = sim_cli.run(parser.parse_args(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_prints_table_and_summary(capsys) -> None:
    code, out, err = _cli(["--nodes", "80", "--blocks", "20", "--duration", "40", "--rows", "4",
                           "--fleet", "5", "--seed", "2"], capsys)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].startswith("shardmesh sim: 80 nodes, 20 blocks")
    assert "fleets of 5" in lines[0] and "seed 2" in lines[0]
    table = [line for line in lines if line[:6].strip().count(":") == 1 and line.split()[0][0].isdigit()]
    assert [row.split()[0] for row in table] == ["0:10", "0:20", "0:30", "0:40"]
    for row in table:
        cells = row.split()
        assert len(cells) == 9
        assert 0.0 <= float(cells[5]) <= 1.0 and 0.0 <= float(cells[6]) <= 1.0
    for label in ("bottleneck/ideal, mean", "bottleneck/ideal, min", "coverage, min",
                  "moves per churn event"):
        assert sum(label in line for line in lines) == 1
    # Same flags, same report.
    assert _cli(["--nodes", "80", "--blocks", "20", "--duration", "40", "--rows", "4",
                 "--fleet", "5", "--seed", "2"], capsys)[1] == out


def test_cli_rejects_nonsense_in_one_line(capsys) -> None:
    for argv in (["--nodes", "0"], ["--churn", "-1"], ["--rows", "0"], ["--duration", "0.5"],
                 ["--margin", "2"]):
        code, out, err = _cli(argv, capsys)
        assert code == 2 and out == ""
        assert err.startswith("shardmesh sim: ") and err.count("\n") == 1
