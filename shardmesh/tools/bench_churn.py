"""``shardmesh bench --churn N``: what N fresh identities publishing records cost a node.

A real serving node (``--layers all``, its gateway on for ``/v1/swarm``) on loopback,
and :data:`ORIGINS` flooding peers (:mod:`.record_flood`), each on its own connection,
that together relay N valid records from N fresh identities at ``rate`` records/s.
The records live 30 s, as the node's own do, so over a long enough flood identities
arrive and expire: a churn. Every few seconds, and at the end, the bench prints the
node's resident memory and the size of its view; the view is capped
(:mod:`..mesh.view_room`), and the memory must stay flat with it.
"""

from __future__ import annotations

import tempfile
import time
from functools import partial
from pathlib import Path

import httpx
import psutil
import trio

from .node_processes import NodeProcess, start_node, stop_all, wait_gateway
from .record_flood import flood

ORIGINS = 4  # flooding connections: enough to fill the view past one origin's share
MB = 1_000_000


def spread(i: int) -> list[str]:
    """A different host for every record (unroutable 198.18.0.0/15), so that only the
    view's own caps, not the per-host one, bound what the node keeps."""
    return [f"/ip4/198.18.{i // 250 % 256}.{i % 250 + 1}/tcp/4001"]


def view_size(url: str) -> int:
    with httpx.Client(base_url=url, timeout=30) as client:
        return len(client.get("/v1/swarm").json()["peers"])


def run_churn_bench(path: Path, dtype: str, identities: int, rate: float = 100.0) -> int:
    key_dir = Path(tempfile.mkdtemp(prefix="shardmesh-bench-keys-"))
    nodes: list[NodeProcess] = []
    try:
        node = start_node(path, "all", dtype, key_dir, api=True)
        nodes.append(node)
        wait_gateway(node)
        process = psutil.Process(node.proc.pid)
        model = httpx.get(f"{node.url}/v1/swarm", timeout=30).json()
        rss0 = process.memory_info().rss
        print(f"{identities} identities from {ORIGINS} connections at {rate:g} records/s into one serving node")
        print(f"{'time':>6s} {'sent':>6s} {'view':>6s} {'RSS MB':>8s}")
        print(f"{0:6.1f} {0:6d} {view_size(node.url):6d} {rss0 / MB:8.1f}", flush=True)
        sent = [0] * ORIGINS
        peak = rss0
        t0 = time.monotonic()

        async def report_until_sent() -> None:
            nonlocal peak
            while sum(sent) < identities:
                await trio.sleep(5)
                rss = process.memory_info().rss
                peak = max(peak, rss)
                size = await trio.to_thread.run_sync(view_size, node.url)
                print(f"{time.monotonic() - t0:6.1f} {sum(sent):6d} {size:6d} {rss / MB:8.1f}", flush=True)

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                for i in range(ORIGINS):
                    share = identities // ORIGINS + (1 if i < identities % ORIGINS else 0)
                    nursery.start_soon(partial(
                        flood, node.address, model["model"], model["total_blocks"], share, rate=rate / ORIGINS,
                        on_sent=partial(sent.__setitem__, i), addrs_for=spread))  # fmt: skip
                nursery.start_soon(report_until_sent)

        trio.run(main)
        time.sleep(2)
        rss = process.memory_info().rss
        peak = max(peak, rss)
        print(f"\nnode RSS {rss0 / MB:.1f} MB before, {peak / MB:.1f} MB at most, {rss / MB:.1f} MB after "
              f"(+{(peak - rss0) / MB:.1f} MB at most); view {view_size(node.url)} records; "
              f"node alive: {node.proc.poll() is None}")  # fmt: skip
        return 0
    finally:
        stop_all(nodes)
