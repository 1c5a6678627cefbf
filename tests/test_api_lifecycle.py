"""A gateway node's life: it stops cleanly on SIGTERM and survives a full KV cache.

Each test starts a node of its own, since each ends or starves it.
"""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import openai
import pytest
from api_helpers import MESSAGES, assert_error, post
from node_process import start_node, stop_node

pytest_plugins = ["api_fixtures"]
pytestmark = pytest.mark.slow


def test_sigterm_stops_the_node_cleanly(model_path: Path) -> None:
    node = start_node(model_path)
    assert httpx.get(f"{node.url}/health", timeout=10).status_code == 200
    node.proc.send_signal(signal.SIGTERM)
    assert node.proc.wait(timeout=20) == 0, node.output()
    assert "Traceback" not in node.output()


def test_full_kv_cache_is_503_and_the_node_recovers(model_path: Path) -> None:
    """A real node with no KV cache budget cannot admit a session: 503, not a crash."""
    node = start_node(model_path, "--kv-cache-gb", "0")
    try:
        client = openai.OpenAI(base_url=f"{node.url}/v1", api_key="unused", max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        body = {"model": model, "messages": MESSAGES, "max_tokens": 4}
        for stream in (False, True):
            error = assert_error(post(node, "/v1/chat/completions", {**body, "stream": stream}), 503)
            assert "busy" in error["message"]
        assert httpx.get(f"{node.url}/health", timeout=10).status_code == 200
    finally:
        stop_node(node)
