"""A real node whose KV cache budget holds one session: busy is a 503, never a leak.

The model is a little larger than elsewhere (hidden 512, 8 layers) so that a
generation lasts long enough to overlap other requests.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import openai
import pytest
from node_process import Node, start_node, stop_node
from transformers import AutoConfig

from shardmesh.tools.tiny_model import cached_tiny_model

pytestmark = pytest.mark.slow
SESSION_TOKENS = 300  # the budget: one session's first 256 tokens fit, two do not
MESSAGES = [{"role": "user", "content": "Tell me a long story about the network."}]


def kv_bytes_per_token(path: Path) -> int:
    c = AutoConfig.from_pretrained(path)
    head_dim = c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * 4  # float32


@pytest.fixture(scope="module")
def node() -> Node:
    path = cached_tiny_model("llama", layers=8, hidden=512)
    budget_gb = SESSION_TOKENS * kv_bytes_per_token(path) / (1 << 30)
    node = start_node(path, "--kv-cache-gb", f"{budget_gb:.9f}", "--dtype", "float32")
    yield node
    stop_node(node)


def chat(node: Node, **body) -> httpx.Response:
    model = httpx.get(f"{node.url}/v1/models", timeout=10).json()["data"][0]["id"]
    return httpx.post(f"{node.url}/v1/chat/completions", json={"model": model, "messages": MESSAGES, **body}, timeout=60)


def wait_until_served(node: Node, deadline_s: float = 10.0) -> httpx.Response:
    deadline = time.monotonic() + deadline_s
    while True:
        r = chat(node, max_tokens=4)
        if r.status_code == 200 or time.monotonic() > deadline:
            return r
        time.sleep(0.1)


def test_second_session_is_busy_then_served_after_the_first_leaves(node: Node) -> None:
    model = httpx.get(f"{node.url}/v1/models", timeout=10).json()["data"][0]["id"]
    body = {"model": model, "messages": MESSAGES, "max_tokens": 250, "temperature": 0, "stream": True}
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", f"{node.url}/v1/chat/completions", json=body) as first:
            assert first.status_code == 200
            lines = first.iter_lines()  # keep it: a dropped line iterator closes the response
            next(line for line in lines if line.startswith("data: "))  # the first session is running
            busy = chat(node, max_tokens=250)  # its first 256 tokens do not fit beside the first
            assert busy.status_code == 503, busy.text
            assert "busy" in busy.json()["error"]["message"]
        # Leaving mid-answer (the with-block closed the connection) frees the session.
    served = wait_until_served(node)
    assert served.status_code == 200, served.text
    assert served.json()["choices"][0]["finish_reason"] in ("length", "stop")


def test_no_max_tokens_is_served_within_the_budget(node: Node) -> None:
    """OpenAI's default max_tokens is "the rest of the context": far more than this
    budget holds. The request is still admitted and ends when the cache is full."""
    client = openai.OpenAI(base_url=f"{node.url}/v1", api_key="unused", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(model=model, messages=MESSAGES, temperature=0)
    assert reply.choices[0].finish_reason in ("length", "stop")
    assert 0 < reply.usage.completion_tokens <= 256 - reply.usage.prompt_tokens + 1
    assert wait_until_served(node).status_code == 200  # and nothing leaked


def test_stream_wire_format_of_a_busy_answer(node: Node) -> None:
    """Streaming requests that cannot start get a plain 503 JSON body, not an SSE stream."""
    model = httpx.get(f"{node.url}/v1/models", timeout=10).json()["data"][0]["id"]
    body = {"model": model, "messages": MESSAGES, "max_tokens": 250, "temperature": 0, "stream": True}
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", f"{node.url}/v1/chat/completions", json=body) as first:
            lines = first.iter_lines()  # keep it: a dropped line iterator closes the response
            next(line for line in lines if line.startswith("data: "))
            with client.stream("POST", f"{node.url}/v1/chat/completions", json=body) as second:
                assert second.status_code == 503
                assert second.headers["content-type"].startswith("application/json")
                assert json.loads(second.read())["error"]["message"]
    assert wait_until_served(node).status_code == 200
