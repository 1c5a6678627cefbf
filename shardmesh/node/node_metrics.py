"""Every node's own Prometheus metrics: its stage, its KV cache, its view of the swarm.

A gateway's ``/metrics`` and a serving node's ``--metrics HOST:PORT`` both show these
(``api/metrics.py`` adds the gateway's requests). They are read when scraped, from the
objects that hold them: the blocks this node serves now (:class:`~.span_keeper.SpanKeeper`),
the batches its stages ran (:class:`~shardmesh.backends.batch_stats.BatchStats`) and the
swarm view (:class:`~shardmesh.mesh.registry.Registry`). Names and meanings: README.md,
"Metrics"; a Grafana dashboard over them: ``docs/grafana-dashboard.json``.
"""

from __future__ import annotations

from typing import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from ..backends.batch_stats import BatchStats, Buckets
from ..mesh.hop_server import HopServer
from ..mesh.registry import Registry
from ..mesh.result_trunks import ChainTrunks
from ..placement.spans import block_throughput, coverage
from .span_keeper import SpanKeeper

__all__ = ["NodeCollector", "counted_trunks"]


def _histogram(name: str, documentation: str, buckets: Buckets) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, documentation, buckets=buckets.cumulative(), sum_value=buckets.total)


class NodeCollector:
    """A Prometheus collector of this node's figures (register it once per app)."""

    def __init__(self, keeper: SpanKeeper, registry: Registry, stats: BatchStats, total_blocks: int) -> None:
        self.keeper = keeper
        self.registry = registry
        self.stats = stats
        self.total_blocks = total_blocks

    def collect(self) -> Iterator[Metric]:
        yield from self._stage()
        yield from self._swarm()

    def _stage(self) -> Iterator[Metric]:
        stats, held = self.stats, self.keeper.held
        yield _histogram("shardmesh_stage_step_seconds", "Seconds one batched step of this node's blocks took.", stats.seconds)
        yield _histogram("shardmesh_stage_batch_size", "Sessions' steps computed together in one batched step.", stats.sizes)
        yield CounterMetricFamily("shardmesh_stage_tokens", "Tokens this node's blocks computed, prompts and answers.",
                                  value=stats.tokens)
        stage = held.blocks.stage if held is not None else None
        yield GaugeMetricFamily("shardmesh_sessions", "Sessions open on this node's blocks.",
                                value=len(getattr(stage, "sessions", ())))
        used = getattr(stage, "cache_bytes_used", 0)
        kv = GaugeMetricFamily("shardmesh_kv_cache_bytes", "This node's KV cache budget, used and free.", labels=["state"])
        kv.add_metric(["used"], used)
        kv.add_metric(["free"], max(0, getattr(stage, "cache_budget_bytes", 0) - used))
        yield kv
        yield GaugeMetricFamily("shardmesh_kv_cache_tokens_free", "Tokens of context this node's KV cache still has room for.",
                                value=stage.cache_tokens_free if stage is not None else 0)
        yield GaugeMetricFamily("shardmesh_served_blocks", "Blocks this node serves now.",
                                value=(held.end - held.start) if held is not None else 0)
        yield CounterMetricFamily("shardmesh_rebalance_moves", "Times this node moved to another span of blocks.",
                                  value=self.keeper.moves)

    def _swarm(self) -> Iterator[Metric]:
        records = self.registry.records()
        yield GaugeMetricFamily("shardmesh_swarm_records", "Records (peers) in this node's view of the swarm.", value=len(records))
        kinds = {"direct": 0, "relayed": 0}
        for record in records:
            kind = self.registry.mesh_host.connection_kind(record.peer)
            if kind in kinds:
                kinds[kind] += 1
        peers = GaugeMetricFamily("shardmesh_peer_connections", "Peers of the view this node is connected to, by how.",
                                  labels=["connection"])
        for kind, count in kinds.items():
            peers.add_metric([kind], count)
        yield peers
        servers = self.registry.servers()
        counts = coverage(servers, self.total_blocks)
        yield GaugeMetricFamily("shardmesh_block_coverage_min", "Online servers of the least-served block (0: the model has a gap).",
                                value=min(counts, default=0))
        yield GaugeMetricFamily("shardmesh_bottleneck_throughput",
                                "Tokens/s through the least-served block: the swarm's rate limit (0 with a gap).",
                                value=min(block_throughput(servers, self.total_blocks), default=0.0))


def counted_trunks(server: HopServer, chain_trunks: ChainTrunks | None) -> tuple[int, int, int, int]:
    """For ``/metrics``: steps frames and steps this node's trunks brought in, results
    frames and results its results trunks brought in."""
    results = chain_trunks.results.counts.totals() if chain_trunks is not None else (0, 0)
    return (*server.trunk_counts.totals(), *results)
