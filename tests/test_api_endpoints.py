"""The gateway's small endpoints on a real node: models, health, metrics, the API key, CORS.

Most tests use the shared gateway node (``api_fixtures.py``). A second node, started
with ``--api-key`` and ``--cors-origin``, checks authentication (every route but
``/health`` wants the key) and what a browser on another origin may do.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from api_helpers import MESSAGES, assert_error, post, serve_node
from node_process import Node

pytest_plugins = ["api_fixtures"]
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("node_output_on_failure")]

API_KEY = "test-key-0123456789"
ORIGIN = "http://app.example:3000"  # a web page the keyed node lets call it (--cors-origin)


@pytest.fixture(scope="module")
def keyed_node(request: pytest.FixtureRequest, model_path: Path) -> Iterator[Node]:
    yield from serve_node(request, model_path, "--api-key", API_KEY, "--cors-origin", ORIGIN)


# --------------------------------------------------------------------------- models, health, metrics


def test_models_list_and_get(client: openai.OpenAI, node: Node) -> None:
    models = client.models.list().data
    assert len(models) == 1
    assert models[0].object == "model" and models[0].id
    assert client.models.retrieve(models[0].id).id == models[0].id
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_health(node: Node, model_id: str) -> None:
    r = httpx.get(f"{node.url}/health", timeout=10)
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "model": model_id}


def test_metrics_count_requests_and_tokens(client: openai.OpenAI, node: Node, model_id: str) -> None:
    client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=3, temperature=0)
    r = httpx.get(f"{node.url}/metrics", timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert re.search(r'shardmesh_http_requests_total\{.*route="/v1/chat/completions".*status="200".*\} [1-9]', text)
    assert re.search(r"^shardmesh_generated_tokens_total [1-9]", text, re.M)
    assert re.search(r"^shardmesh_time_to_first_token_seconds_count [1-9]", text, re.M)
    # The node serves the blocks itself: its stage ran the chat's steps in batches.
    from shardmesh.tools.bench_concurrent import stage_counts_from

    counts = stage_counts_from(text)
    assert counts is not None, text
    steps, batches = counts
    assert steps >= batches >= 1, (steps, batches)


# --------------------------------------------------------------------------- api key


def test_api_key_required(keyed_node: Node) -> None:
    base = f"{keyed_node.url}/v1"
    good = openai.OpenAI(base_url=base, api_key=API_KEY, max_retries=0, timeout=60)
    model = good.models.list().data[0].id

    wrong = openai.OpenAI(base_url=base, api_key="wrong-key", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2)

    body = {"model": model, "messages": MESSAGES, "max_tokens": 2}
    assert_error(post(keyed_node, "/v1/chat/completions", body), 401, "invalid_api_key")
    assert_error(httpx.get(f"{keyed_node.url}/metrics", timeout=10), 401)
    assert_error(httpx.get(f"{base}/models", headers={"Authorization": f"Basic {API_KEY}"}, timeout=10), 401)
    assert httpx.get(f"{keyed_node.url}/health", timeout=10).status_code == 200  # stays open

    r = good.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2, temperature=0)
    assert r.usage.completion_tokens >= 1
    assert httpx.get(f"{keyed_node.url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10).status_code == 200


def preflight(node: Node, origin: str) -> httpx.Response:
    """What a browser asks before a page of ``origin`` POSTs a chat with a key."""
    return httpx.options(f"{node.url}/v1/chat/completions", timeout=10, headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    })


def test_cors_only_for_the_origins_named(keyed_node: Node, node: Node) -> None:
    ok = preflight(keyed_node, ORIGIN)  # no key in a preflight: it must pass before the key check
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in ok.headers["access-control-allow-headers"].lower()
    model = httpx.get(f"{keyed_node.url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10).json()["data"][0]["id"]
    r = httpx.post(f"{keyed_node.url}/v1/chat/completions", timeout=60, json={"model": model, "messages": MESSAGES, "max_tokens": 2},
                   headers={"Origin": ORIGIN, "Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    assert "access-control-allow-origin" not in preflight(keyed_node, "http://elsewhere.example").headers
    # The default: no origin is named, so no page elsewhere may call the gateway.
    refused = preflight(node, ORIGIN)
    assert refused.status_code == 405 and "access-control-allow-origin" not in refused.headers



def test_a_node_without_an_api_serves_its_metrics_alone(model_path: Path, tmp_path: Path) -> None:
    """``--api off --metrics 127.0.0.1:0``: the serving node's stage and link counters,
    behind its API key, and nothing else on that port."""
    from node_process import start_node, stop_node

    node = start_node(model_path, "--layers", "all", "--api", "off", "--metrics", "127.0.0.1:0", "--api-key", API_KEY,
                      api=False, key_dir=tmp_path)
    try:
        deadline = time.monotonic() + 30
        while not (found := re.search(r"metrics at (http://\S+/metrics)", node.output())):
            assert time.monotonic() < deadline, node.output()
            time.sleep(0.1)
        url = found.group(1)
        assert httpx.get(url, timeout=10).status_code == 401
        text = httpx.get(url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10).text
        assert "shardmesh_stage_steps_total" in text and "shardmesh_hop_links_total" in text
        assert httpx.get(url.replace("/metrics", "/v1/models"), headers={"Authorization": f"Bearer {API_KEY}"},
                         timeout=10).status_code == 404
    finally:
        stop_node(node)
