"""MLX nodes behind the OpenAI API, alone and in a chain with a torch node.

Real node processes on 127.0.0.1 and the official ``openai`` client: an MLX node serving
a whole tiny Llama answers exactly as single-process transformers does, and so does a
swarm whose chain runs blocks 0:6 on torch and 6:12 on MLX (only raw hidden states
cross between them). Skipped, with the reason, where MLX cannot be installed.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import openai
import pytest
from node_process import start_node, stop_node
from reference import Transformers

pytest.importorskip("mlx.core", reason='MLX is not installed here (pip install "shardmesh[mlx]")')
pytest.importorskip("mlx_lm", reason='mlx-lm is not installed here (pip install "shardmesh[mlx]")')

pytestmark = pytest.mark.slow

N = 10
MESSAGES = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. Tell me more."}]


@pytest.fixture(scope="module")
def model_path() -> Path:
    from shardmesh.tools.tiny_model import cached_tiny_model

    return cached_tiny_model("llama", layers=12, hidden=64)


@pytest.fixture(scope="module")
def want(model_path: Path) -> str:
    ref = Transformers(model_path)
    return ref.greedy(ref.chat_ids(MESSAGES), N).text


def chat(url: str, stream: bool) -> str:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    if not stream:
        return client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=N, temperature=0).choices[0].message.content
    chunks = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=N, temperature=0, stream=True)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_mlx_node_answers_like_transformers(model_path: Path, want: str, tmp_path: Path) -> None:
    node = start_node(model_path, "--backend", "mlx", key_dir=tmp_path)
    try:
        assert "with mlx" in node.output()
        assert chat(node.url, stream=False) == want
        assert chat(node.url, stream=True) == want
        view = httpx.get(f"{node.url}/v1/swarm", timeout=10).json()
        assert [p["backend"] for p in view["peers"]] == ["mlx"]
    finally:
        stop_node(node)


def test_chain_of_a_torch_node_and_an_mlx_node(model_path: Path, want: str, tmp_path: Path) -> None:
    nodes = [start_node(model_path, "--layers", "0:6", "--backend", "torch", "--api", "off", api=False, key_dir=tmp_path)]
    try:
        join = ("--join", nodes[0].address)
        nodes.append(start_node(model_path, "--layers", "6:12", "--backend", "mlx", "--api", "off", *join, api=False, key_dir=tmp_path))
        gateway = start_node(model_path, "--layers", "none", *join, key_dir=tmp_path)
        nodes.append(gateway)
        deadline = time.monotonic() + 30
        while httpx.get(f"{gateway.url}/health", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, httpx.get(f"{gateway.url}/v1/swarm", timeout=5).text
            time.sleep(0.2)
        backends = {p["peer"]: p["backend"] for p in httpx.get(f"{gateway.url}/v1/swarm", timeout=5).json()["peers"]}
        assert backends[nodes[0].peer_id] == "torch" and backends[nodes[1].peer_id] == "mlx"
        assert chat(gateway.url, stream=False) == want
        assert chat(gateway.url, stream=True) == want
    finally:
        for node in nodes:
            stop_node(node)


def test_auto_picks_mlx_only_on_apple_silicon(monkeypatch) -> None:
    from shardmesh.node import backend as choose

    monkeypatch.setattr(choose.sys, "platform", "linux")
    assert choose.choose_backend("auto") == "torch"
    monkeypatch.setattr(choose.sys, "platform", "darwin")
    monkeypatch.setattr(choose.platform, "machine", lambda: "arm64")
    assert choose.choose_backend("auto") == "mlx"
    monkeypatch.setattr(choose.platform, "machine", lambda: "x86_64")
    assert choose.choose_backend("auto") == "torch"
    assert choose.choose_backend("mlx") == "mlx" and choose.choose_backend("torch") == "torch"
