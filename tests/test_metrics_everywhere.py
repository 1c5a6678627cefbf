"""Metrics on every node (node/node_metrics.py, api/metrics.py): a serving node with no API
serves its stage, KV cache and swarm figures at ``--metrics``, the gateway its requests'
latencies; every metric either exposes is documented in the README, and the Grafana
dashboard in docs/ uses only metrics that exist.

Real node processes: G serves blocks [0, 2) and the API, S serves [2, 4) with
``--api off --metrics 127.0.0.1:0``, so every answer crosses S.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from node_process import Node, start_node, stop_showing_failures, wait_for_route

from shardmesh.tools.tiny_model import cached_tiny_model

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TYPE = re.compile(r"^# TYPE (shardmesh_\w+) (\w+)$", re.M)


def value(text: str, sample: str) -> float:
    """The value of one sample line (``name{labels}`` as written)."""
    found = re.search(rf"^{re.escape(sample)} ([0-9.e+-]+)$", text, re.M)
    assert found is not None, f"{sample} missing:\n{text}"
    return float(found.group(1))


@pytest.fixture(scope="module")
def swarm(request, tmp_path_factory) -> Iterator[tuple[Node, Node, str]]:
    model = cached_tiny_model("llama", layers=4, hidden=64)
    keys = tmp_path_factory.mktemp("metrics-keys")
    gateway = start_node(model, "--layers", "0:2", key_dir=keys)
    nodes = [gateway]
    try:
        server = start_node(model, "--layers", "2:4", "--api", "off", "--metrics", "127.0.0.1:0", "--join", gateway.address,
                            api=False, key_dir=keys)  # fmt: skip
        nodes.append(server)
        wait_for_route(gateway)
        deadline = time.monotonic() + 30
        while not (found := re.search(r"metrics at (http://\S+/metrics)", server.output())):
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.1)
        with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=60) as client:
            model_id = client.models.list().data[0].id
            for seed in range(3):
                client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Hello there"}],
                                               max_tokens=6, temperature=1.0, seed=seed)  # fmt: skip
        yield gateway, server, found.group(1)
    finally:
        stop_showing_failures(nodes, bool(request.session.testsfailed))


def test_a_serving_node_without_an_api_serves_its_own_figures(swarm) -> None:
    _, _, url = swarm
    text = httpx.get(url, timeout=10).text
    assert value(text, "shardmesh_stage_step_seconds_count") >= 3  # three answers crossed it, in steps
    assert value(text, "shardmesh_stage_batch_size_count") == value(text, "shardmesh_stage_step_seconds_count")
    assert value(text, "shardmesh_stage_tokens_total") >= value(text, "shardmesh_stage_batch_size_sum")
    assert value(text, 'shardmesh_kv_cache_bytes{state="free"}') > 0
    assert value(text, 'shardmesh_kv_cache_bytes{state="used"}') >= 0 and value(text, "shardmesh_sessions") >= 0
    assert value(text, "shardmesh_kv_cache_tokens_free") > 0
    assert value(text, "shardmesh_served_blocks") == 2 and value(text, "shardmesh_rebalance_moves_total") == 0
    assert value(text, "shardmesh_swarm_records") == 2
    assert value(text, 'shardmesh_peer_connections{connection="direct"}') >= 1
    assert value(text, "shardmesh_block_coverage_min") == 1 and value(text, "shardmesh_bottleneck_throughput") > 0


def test_the_gateway_times_its_requests(swarm) -> None:
    gateway, _, _ = swarm
    text = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    assert value(text, "shardmesh_request_seconds_count") == 3
    assert value(text, "shardmesh_time_per_output_token_seconds_count") >= 1
    assert value(text, "shardmesh_requests_running") == 0 and value(text, "shardmesh_requests_waiting") == 0
    assert value(text, "shardmesh_failovers_total") == 0 and value(text, "shardmesh_stage_tokens_total") > 0


def test_every_metric_is_documented_and_the_dashboard_uses_only_real_ones(swarm) -> None:
    gateway, _, url = swarm
    exposed = dict(TYPE.findall(httpx.get(url, timeout=10).text) + TYPE.findall(httpx.get(f"{gateway.url}/metrics", timeout=10).text))
    readme = (ROOT / "README.md").read_text()
    undocumented = [n for n in exposed if not n.endswith("_created")  # prometheus_client's own start times
                    and f"`{n}_total" not in readme and f"`{n}`" not in readme and f"`{n}{{" not in readme]  # fmt: skip
    assert not undocumented, f"metrics missing from README.md: {undocumented}"
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    used = {re.sub(r"_(bucket|sum|count|total)$", "", name)
            for panel in dashboard["panels"] for target in panel["targets"] for name in re.findall(r"shardmesh_\w+", target["expr"])}
    bases = {re.sub(r"_total$", "", name) for name in exposed}  # counters' TYPE lines name them either way
    assert used and not used - bases, f"the dashboard uses metrics no node exposes: {sorted(used - bases)}"


def test_buckets_count_each_observation_under_its_bound() -> None:
    from shardmesh.backends.batch_stats import Buckets

    b = Buckets((1, 2, 4))
    for x in (0.5, 1, 3, 9):
        b.observe(x)
    assert b.cumulative() == [("1", 2), ("2", 2), ("4", 3), ("+Inf", 4)] and b.total == 13.5
