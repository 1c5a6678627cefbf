"""Speculative decoding through chains of real node processes.

The gateways here run with their defaults, so prompt lookup proposes draft tokens and
every hop of the route computes them as extra positions of one step. Greedy answers
must equal single-process transformers token for token: over 1 to 3 hops, with and
without a 10 ms delay line in front of every node (``shardmesh/tools/delay_line.py``),
for a dense and a MoE model (a long prompt among them, prefilled as a pipeline of
chunks), with prompt lookup and with a draft model, and across a failover in the middle of an answer whose drafts
are being accepted. The gateway's ``/metrics`` must show that drafts were accepted.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from node_process import Node, start_doubled_swarm, start_node, stop_node, wait_for_route
from reference import Transformers

from shardmesh.tools.tiny_model import cached_tiny_model

pytestmark = pytest.mark.slow

# Prompts whose answers repeat what came before, as the tiny models' answers soon do.
PROMPTS = ["1 2 3 4 5 1 2 3 4 5 1 2 3", "The fox and the dog. The fox and the dog. The fox", "Tell me a long story."]
TOKENS = 40
ROUTE = re.compile(r"session [0-9a-f]{32}(?:-\d+)? via (.+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LinedSwarm:
    """Nodes that each listen behind a delay line and announce the line's port."""

    def __init__(self, model: Path, key_dir: Path, delay_ms: float) -> None:
        self.model, self.key_dir, self.delay_ms = model, key_dir, delay_ms
        self.nodes: list[Node] = []
        self.lines: list[subprocess.Popen] = []
        self.join: str | None = None

    def start(self, layers: str, *, api: bool = False, extra: tuple[str, ...] = ()) -> Node:
        port, line_port = free_port(), free_port()
        self.lines.append(subprocess.Popen(
            [sys.executable, "-m", "shardmesh.tools.delay_line", "--to", f"127.0.0.1:{port}",
             "--delay-ms", str(self.delay_ms), "--port", str(line_port)], stdout=subprocess.DEVNULL))
        flags = ["--layers", layers, "--announce", f"/ip4/127.0.0.1/tcp/{line_port}", *extra]
        flags += ["--join", self.join] if self.join else []
        flags += [] if api else ["--api", "off"]
        node = start_node(self.model, *flags, api=api, key_dir=self.key_dir, listen=f"/ip4/127.0.0.1/tcp/{port}",
                          env={"SHARDMESH_DEBUG": "1"})
        self.nodes.append(node)
        if self.join is None:
            self.join = f"/ip4/127.0.0.1/tcp/{line_port}/p2p/{node.peer_id}"
        return node

    def stop(self) -> None:
        for node in self.nodes:
            stop_node(node)
        for line in self.lines:
            line.terminate()
            line.wait(timeout=10)


@pytest.fixture
def lined(tmp_path: Path) -> Iterator[callable]:
    swarms: list[LinedSwarm] = []

    def make(model: Path, delay_ms: float) -> LinedSwarm:
        swarms.append(LinedSwarm(model, tmp_path, delay_ms))
        return swarms[-1]

    yield make
    for swarm in swarms:
        swarm.stop()


def speculation_counts(gateway: Node) -> tuple[float, float]:
    """Draft tokens the gateway proposed and those accepted, from its /metrics."""
    text = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    value = lambda name: float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))  # noqa: E731
    return value("shardmesh_draft_tokens_proposed_total"), value("shardmesh_draft_tokens_accepted_total")


def greedy_completions(gateway: Node, prompts: list[str], **extra) -> list[str]:
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=300)
    name = client.models.list().data[0].id
    return [client.completions.create(model=name, prompt=p, max_tokens=TOKENS, temperature=0, **extra).choices[0].text
            for p in prompts]


@pytest.mark.parametrize("arch,delay_ms,spans,drafting", [
    ("llama", 10.0, ["0:2", "2:3", "3:4"], "prompt lookup"),
    ("qwen3_moe", 0.0, ["0:2", "2:4"], "prompt lookup"),
    ("qwen3_moe", 10.0, ["0:4"], "draft model"),
])
def test_greedy_with_speculation_through_hops_equals_transformers(lined, arch: str, delay_ms: float, spans: list[str], drafting: str) -> None:
    model = cached_tiny_model(arch, layers=4, hidden=64)
    reference = Transformers(model)
    swarm = lined(model, delay_ms)
    for span in spans:
        swarm.start(span)
    # The draft model is the target itself: every draft right, the most tokens per trip.
    gateway = swarm.start("none", api=True, extra=("--draft-model", str(model)) if drafting == "draft model" else ())
    wait_for_route(gateway, timeout=60)

    # The last prompt is long enough to be prefilled in chunks through the pipe.
    prompts = [*PROMPTS, " ".join(f"word{i % 97}" for i in range(300))]
    got = greedy_completions(gateway, prompts)
    assert got == [reference.greedy(reference.prompt_ids(p), TOKENS).text for p in prompts]
    proposed, accepted = speculation_counts(gateway)
    assert accepted > 0, f"no draft token was accepted ({proposed:.0f} proposed)"
    # The same answers with speculation off for the request.
    assert greedy_completions(gateway, PROMPTS[:1], extra_body={"speculative": False}) == got[:1]
    assert speculation_counts(gateway)[0] == proposed


def test_failover_in_the_middle_of_an_accepted_run(tmp_path: Path) -> None:
    """M serves [0, 2) and the API, two servers share [2, 3), Y serves [3, 4). While a
    greedy answer streams with drafts being accepted, the server of [2, 3) on its route
    is killed: the answer goes on, exact, on the other one, and drafts are accepted
    again on the new chain."""
    model = cached_tiny_model("llama", layers=4, hidden=64)
    reference = Transformers(model)
    nodes = start_doubled_swarm(model, tmp_path)
    m = nodes[0]
    try:
        prompt = PROMPTS[0]
        expected = reference.greedy(reference.prompt_ids(prompt), 80).text
        client = openai.OpenAI(base_url=f"{m.url}/v1", api_key="unused", max_retries=0, timeout=300)
        name = client.models.list().data[0].id
        since = len(m.lines)
        pieces: list[str] = []
        killed: Node | None = None
        accepted_at_kill = 0.0
        for chunk in client.completions.create(model=name, prompt=prompt, max_tokens=80, temperature=0, stream=True):
            if chunk.choices and chunk.choices[0].text:
                pieces.append(chunk.choices[0].text)
            if killed is None and len(pieces) >= 20 and (accepted := speculation_counts(m)[1]) > 0:
                accepted_at_kill = accepted
                route = ROUTE.findall(m.output(since))[-1]
                killed = next(n for n in nodes[1:3] if f"{n.peer_id[-6:]}[" in route)
                os.kill(killed.proc.pid, signal.SIGKILL)
        assert killed is not None, "no draft was accepted before the answer ended"
        assert "".join(pieces) == expected, "the answer changed across the failover"
        assert "replaying on a new one" in m.output(since)
        assert speculation_counts(m)[1] > accepted_at_kill, "no draft accepted on the new chain"
    finally:
        for node in nodes:
            stop_node(node)


def test_draft_model_and_no_speculation_flags(tmp_path: Path) -> None:
    """``--draft-model`` (here the target itself: every draft kept) and
    ``--no-speculation`` (none proposed) give the same greedy answers."""
    model = cached_tiny_model("llama", layers=4, hidden=64)
    reference = Transformers(model)
    expected = [reference.greedy(reference.prompt_ids(p), TOKENS).text for p in PROMPTS]
    drafting = start_node(model, "--layers", "all", "--draft-model", str(model), key_dir=tmp_path)
    plain = None
    try:
        plain = start_node(model, "--layers", "all", "--no-speculation", key_dir=tmp_path)
        assert greedy_completions(drafting, PROMPTS) == expected
        proposed, accepted = speculation_counts(drafting)
        assert proposed > 0 and accepted == proposed
        assert greedy_completions(plain, PROMPTS) == expected
        assert speculation_counts(plain) == (0, 0)
    finally:
        for node in (drafting, plain):
            if node is not None:
                stop_node(node)


@pytest.mark.parametrize("flags,says", [
    (["--draft-model", "MODEL", "--no-speculation"], "choose one"),
    (["--draft-tokens", "0"], "--draft-tokens wants 1 to 16"),
    (["--draft-tokens", "17"], "--draft-tokens wants 1 to 16"),
    (["--layers", "all", "--api", "127.0.0.1:0", "--listen", "/ip4/127.0.0.1/tcp/0", "--draft-model", "OTHER"],
     "a draft model must share the target's tokenizer"),
])
def test_bad_speculation_flags_are_one_line_errors(flags: list[str], says: str, tmp_path: Path) -> None:
    model = cached_tiny_model("llama", layers=4, hidden=64)
    other = cached_tiny_model("llama", layers=1, hidden=32, vocab_size=1024) if "OTHER" in flags else None
    flags = [str(model) if f == "MODEL" else str(other) if f == "OTHER" else f for f in flags]
    out = subprocess.run([sys.executable, "-m", "shardmesh", "run", "--model", str(model), "--no-mdns",
                          "--key-file", str(tmp_path / "node.key"), *flags],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2 and says in out.stderr, out.stderr
