"""A gateway for whatever the swarm serves (node/open_gateway.py): ``--layers none`` and
no ``--model``. Real node processes of one network: a tiny Llama served whole by one
node, a tiny Qwen3 split over two that joined it, and the gateway, which joins the
Llama's node alone. It finds both models (the Qwen3's through the peers it gets
connected to), fetches their files by name from the hub (a local hub cache here,
offline, laid out as huggingface_hub writes it), and answers each as transformers does
on its own weights, through the official ``openai`` client.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

import openai
import pytest
from node_process import start_node, stop_showing_failures

from reference import Transformers
from shardmesh.tools.tiny_model import cached_tiny_model

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Which model are you?"}]
N = 8


def hub_cache(root: Path, repo: str, folder: Path) -> None:
    """``folder`` as the hub cache holds repo ``repo`` at one commit of ``main``."""
    org, name = repo.split("/")
    base = root / f"models--{org}--{name}"
    commit = hashlib.sha1(repo.encode()).hexdigest()
    shutil.copytree(folder, base / "snapshots" / commit)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)


def test_a_gateway_without_a_model_serves_every_model_of_the_swarm(request, tmp_path: Path) -> None:
    repos = {"tinyorg/llama-a": cached_tiny_model("llama", layers=4, hidden=64),
             "tinyorg/qwen3-b": cached_tiny_model("qwen3", layers=4, hidden=64)}  # fmt: skip
    for repo, folder in repos.items():
        hub_cache(tmp_path / "hub", repo, folder)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub")}
    nodes = []
    try:
        llama = start_node("tinyorg/llama-a", "--layers", "all", "--api", "off", api=False, env=env, key_dir=tmp_path)
        nodes.append(llama)
        qwen = start_node("tinyorg/qwen3-b", "--layers", "0:2", "--api", "off", "--join", llama.address, api=False, env=env,
                          key_dir=tmp_path)  # fmt: skip
        nodes.append(qwen)
        nodes.append(start_node("tinyorg/qwen3-b", "--layers", "2:4", "--api", "off", "--join", qwen.address, api=False,
                                env=env, key_dir=tmp_path))  # fmt: skip
        gateway = start_node(None, "--layers", "none", "--join", llama.address, env=env, key_dir=tmp_path)
        nodes.append(gateway)
        with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=60) as client:
            deadline = time.monotonic() + 60
            while sorted(m.id for m in client.models.list().data) != sorted(repos):
                assert time.monotonic() < deadline, gateway.output()
                time.sleep(0.5)
            for repo, folder in repos.items():
                ref = Transformers(folder)
                reply = client.chat.completions.create(model=repo, messages=MESSAGES, max_tokens=N, temperature=0)
                assert reply.choices[0].message.content == ref.greedy(ref.chat_ids(MESSAGES), N).text, repo
        assert "serving tinyorg/llama-a" in gateway.output() and "serving tinyorg/qwen3-b" in gateway.output()
    finally:
        stop_showing_failures(nodes, bool(request.session.testsfailed))


def test_blocks_need_a_model() -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "shardmesh", "run", "--layers", "all", "--no-mdns"], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 2 and "--model is needed to serve blocks" in done.stderr
    done = subprocess.run([sys.executable, "-m", "shardmesh", "run", "--layers", "none", "--no-mdns", "--allow-peers", "x"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and "--allow-peers is not supported yet" in done.stderr  # never a private swarm ignored
