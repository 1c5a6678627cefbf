"""A ``--layers none`` gateway serves a chain without ever importing torch.

A real gateway process joins a real serving node, answers a chat through it with the
official ``openai`` client, and on its way out says whether ``torch`` is in its
``sys.modules``. Its answer must be the serving node's own gateway answer (greedy) and
single-process transformers' answer to the prompt transformers' tokenizer renders, so
the torch-free tokenizer (``api/tokenizer.py``) is checked end to end: the chat
template, the guard against a typed control token, decoding, and each token's bytes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from node_process import READY, STARTUP_TIMEOUT, Node, start_node, stop_node

pytestmark = pytest.mark.slow

# The gateway runs `shardmesh run ...` as `python -m shardmesh` would, with one line
# added at exit: whether torch was ever imported.
GATEWAY = (
    "import atexit, runpy, sys\n"
    "atexit.register(lambda: print('TORCH_LOADED', 'torch' in sys.modules, flush=True))\n"
    "sys.argv = ['shardmesh', *sys.argv[1:]]\n"
    "runpy.run_module('shardmesh', run_name='__main__', alter_sys=True)\n"
)

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Say hello to the swarm, naïve café 世界 😀 <|im_start|>system"},
]


@pytest.fixture(scope="module")
def model_path() -> Path:
    from shardmesh.tools.tiny_model import cached_tiny_model

    return cached_tiny_model("llama", layers=4, hidden=64)


def _start_gateway(model: Path, join: str) -> Node:
    key = Path(tempfile.mkdtemp(prefix="shardmesh-key-")) / "gateway.key"
    cmd = [sys.executable, "-c", GATEWAY, "run", "--model", str(model), "--layers", "none", "--api", "127.0.0.1:0",
           "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns", "--key-file", str(key), "--join", join]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    node = Node(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))

    def pump() -> None:
        for line in node.proc.stdout:  # type: ignore[union-attr]
            node.lines.append(line)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not (m := READY.search(node.output())):
        if node.proc.poll() is not None or time.monotonic() > deadline:
            stop_node(node)
            pytest.fail(f"the gateway did not start:\n{node.output()}")
        time.sleep(0.1)
    node.url = m.group(1)
    while httpx.get(f"{node.url}/health").status_code != 200:  # until it sees a chain
        if time.monotonic() > deadline:
            stop_node(node)
            pytest.fail(f"the gateway found no chain:\n{node.output()}")
        time.sleep(0.2)
    return node


N = 16


def _answer(url: str) -> tuple[str | None, list[tuple[str, bytes]], int]:
    """A greedy chat answer: its text, each token with its bytes, the prompt's length."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=N, temperature=0, logprobs=True)
    choice = reply.choices[0]
    tokens = [(t.token, bytes(t.bytes or [])) for t in choice.logprobs.content]  # type: ignore[union-attr]
    return choice.message.content, tokens, reply.usage.prompt_tokens  # type: ignore[union-attr]


def test_gateway_serves_a_chain_and_never_imports_torch(model_path: Path) -> None:
    from reference import Transformers

    from shardmesh.api.token_bytes import token_bytes

    reference = Transformers(model_path)
    prompt = reference.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=False, sanitize_control_tokens=True)
    expected = reference.greedy(list(prompt), N)
    expected_tokens = [(text, token_bytes(reference.tokenizer, i)) for text, i in zip(expected.tokens, expected.token_ids)]
    server = start_node(model_path, "--layers", "all")
    try:
        gateway = _start_gateway(model_path, server.address)
        try:
            through_gateway = _answer(gateway.url)
            assert through_gateway == (expected.text, expected_tokens, len(prompt))
            assert through_gateway == _answer(server.url)
            # The gateway holds no blocks: it reached the serving node over the mesh.
            swarm = httpx.get(f"{gateway.url}/v1/swarm").json()
            assert [p["span"] for p in swarm["peers"] if p["peer"] == server.peer_id] == [[0, 4]], json.dumps(swarm)
        finally:
            gateway.proc.send_signal(signal.SIGINT)  # drain and stop: the atexit line follows
            try:
                gateway.proc.wait(timeout=30)
            finally:
                stop_node(gateway)
        time.sleep(0.2)  # let the pump read the last lines
        verdicts = re.findall(r"^TORCH_LOADED (\w+)$", gateway.output(), re.M)
        assert verdicts == ["False"], gateway.output()
    finally:
        stop_node(server)
