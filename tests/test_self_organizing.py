"""A swarm that runs itself: nobody assigns layers, nodes die and leave, answers go on.

Real node processes on 127.0.0.1 and the official ``openai`` client:

- four nodes started with ``--layers auto`` and a memory limit that fits four of the
  twelve blocks: each newcomer fills what the swarm lacks, together they cover the
  model, and greedy output through them equals transformers;
- a node killed with SIGKILL: the swarm (with memory to spare) closes the gap it left by
  itself;
- a node killed in the middle of a streamed answer: the stream completes, token for token
  the uninterrupted greedy output, after a pause;
- a node stopped with SIGTERM in the middle of an answer: it drains, nothing is lost.

Measured times (coverage restored, failover pause) are printed: run with ``-s`` to see them.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest
from node_process import Node, start_node, stop_node
from reference import Transformers

pytestmark = pytest.mark.slow

BLOCKS = 12
CAPACITY = 4  # blocks the memory limit leaves room for
KV_GB = 0.01
REBALANCE = ["--rebalance-interval", "2"]


def client_for(node: Node) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{node.url}/v1", api_key="unused", max_retries=0, timeout=180)


def swarm_view(node: Node) -> dict:
    return httpx.get(f"{node.url}/v1/swarm", timeout=10).json()


def wait_for(check: Callable[[], object], timeout: float, what: str, node: Node) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.25)
    raise AssertionError(f"{what} not within {timeout:.0f} s; view: {swarm_view(node)}")


def spans_of(view: dict) -> dict[str, tuple[int, int]]:
    return {p["peer"]: tuple(p["span"]) for p in view["peers"] if p["state"] == "online" and p["span"][1] > p["span"][0]}


def memory_for(model: Path, capacity: int) -> float:
    """GiB that fit ``capacity`` blocks of ``model`` (any window, embeddings or head
    included) plus the KV budget, and not one block more."""
    from shardmesh.backends.footprint import weight_bytes
    from shardmesh.backends.weights import resolve_local
    from shardmesh.placement.capacity import blocks_that_fit, window_bytes

    import json

    tied = bool(json.loads((model / "config.json").read_text()).get("tie_word_embeddings", False))
    sizes = weight_bytes(resolve_local(str(model)), BLOCKS, tied_embeddings=tied)
    heaviest = max(window_bytes(sizes.blocks, sizes.embeddings, sizes.head, s, s + capacity) for s in range(BLOCKS - capacity + 1))
    budget = heaviest + min(sizes.blocks) // 2
    assert blocks_that_fit(sizes.blocks, sizes.embeddings, sizes.head, budget) == capacity
    return (budget + KV_GB * (1 << 30)) / (1 << 30)


@pytest.fixture(scope="module")
def model() -> Path:
    from shardmesh.tools.tiny_model import cached_tiny_model

    return cached_tiny_model("llama", layers=BLOCKS, hidden=64)


@pytest.fixture(scope="module")
def ref(model: Path) -> Transformers:
    return Transformers(model)


def dump_on_failure(request, nodes: list[Node], failed_before: int) -> None:
    if request.session.testsfailed > failed_before:
        for node in nodes:
            print(f"---- node output ({' '.join(node.proc.args)}) ----\n{node.output()}")


# --------------------------------------------------------------------------- --layers auto


@pytest.fixture(scope="module")
def auto_swarm(request, model: Path, tmp_path_factory) -> Iterator[list[Node]]:
    keys = tmp_path_factory.mktemp("keys")
    limits = ["--layers", "auto", "--memory-gb", f"{memory_for(model, CAPACITY):.9f}", "--kv-cache-gb", str(KV_GB), *REBALANCE]
    nodes: list[Node] = []
    failed_before = request.session.testsfailed
    try:
        gateway = start_node(model, *limits, key_dir=keys)
        nodes.append(gateway)
        covered_after = [sum(1 for c in swarm_view(gateway)["coverage"] if c)]
        for k in range(2, 5):
            nodes.append(start_node(model, *limits, "--api", "off", "--join", gateway.address, api=False, key_dir=keys))
            wait_for(lambda: nodes[-1].peer_id in spans_of(swarm_view(gateway)), 30, f"node {k} online", gateway)
            covered_after.append(sum(1 for c in swarm_view(gateway)["coverage"] if c))
        nodes[0].covered_after = covered_after  # type: ignore[attr-defined]
        yield nodes
    finally:
        for node in nodes:
            stop_node(node)
        dump_on_failure(request, nodes, failed_before)


def test_auto_nodes_fill_the_gaps_and_cover_the_model(auto_swarm: list[Node]) -> None:
    gateway = auto_swarm[0]
    # Each of the first three nodes took blocks nobody had: 4, then 8, then all 12.
    assert gateway.covered_after == [4, 8, 12, 12], gateway.covered_after
    spans = spans_of(swarm_view(gateway))
    assert set(spans) == {n.peer_id for n in auto_swarm}
    assert all(end - start == CAPACITY for start, end in spans.values()), f"the memory limit allows {CAPACITY} blocks: {spans}"
    assert all(swarm_view(gateway)["coverage"])


def test_auto_swarm_answers_like_transformers(auto_swarm: list[Node], ref: Transformers) -> None:
    gateway = auto_swarm[0]
    want = ref.greedy(ref.prompt_ids("Once upon a time"), 12)
    client = client_for(gateway)
    model_id = client.models.list().data[0].id
    got = client.completions.create(model=model_id, prompt="Once upon a time", max_tokens=12, temperature=0)
    assert got.choices[0].text == want.text


def test_the_swarm_closes_the_gap_a_killed_node_leaves(auto_swarm: list[Node], ref: Transformers) -> None:
    gateway = auto_swarm[0]
    spans = spans_of(swarm_view(gateway))
    # A node whose loss leaves some block with no server (not the gateway: we ask it).
    victim = next(
        n for n in auto_swarm[1:]
        if any(all(not s <= b < e for p, (s, e) in spans.items() if p != n.peer_id) for b in range(BLOCKS))
    )
    killed = time.monotonic()
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(timeout=10)

    def restored() -> bool:
        view = swarm_view(gateway)
        return victim.peer_id not in {p["peer"] for p in view["peers"]} and all(view["coverage"])

    wait_for(restored, 150, "full coverage after the kill", gateway)
    took = time.monotonic() - killed
    print(f"full coverage restored {took:.1f} s after SIGKILL (the dead node's record lives 30 s); spans: {spans_of(swarm_view(gateway))}")
    want = ref.greedy(ref.prompt_ids("The capital of France is"), 12)
    client = client_for(gateway)
    got = client.completions.create(model=client.models.list().data[0].id, prompt="The capital of France is", max_tokens=12, temperature=0)
    assert got.choices[0].text == want.text


# --------------------------------------------------------------------------- failover and draining

PROMPT = "In the beginning"
LONG = 400  # tokens: long enough that the stream is still running when a node goes
DRAIN_TIMEOUT = 150


@pytest.fixture(scope="module")
def redundant_swarm(request, model: Path, tmp_path_factory) -> Iterator[list[Node]]:
    """A gateway serving [0, 6) and three servers of [6, 12): any one can go."""
    keys = tmp_path_factory.mktemp("keys")
    nodes: list[Node] = []
    failed_before = request.session.testsfailed
    try:
        gateway = start_node(model, "--layers", "0:6", key_dir=keys, env={"SHARDMESH_DEBUG": "1"})
        nodes.append(gateway)
        for _ in range(3):
            # A long drain deadline: on a loaded CI machine the answer being drained can
            # take far longer than on a quiet one (measured: 400 tokens in 30+ s).
            nodes.append(start_node(model, "--layers", "6:12", "--api", "off", "--join", gateway.address,
                                    "--drain-timeout", str(DRAIN_TIMEOUT), api=False, key_dir=keys))
        wait_for(lambda: len(spans_of(swarm_view(gateway))) == 4, 30, "all four servers online", gateway)
        yield nodes
    finally:
        for node in nodes:
            stop_node(node)
        dump_on_failure(request, nodes, failed_before)


# The answer's own sessions: a request's id, then "-N" for its N-th replacement chain.
# Audit chains (mesh/audited_chains.py) add "-aN" or "-s-aN" and are not the answer's.
ROUTE = re.compile(r"session ([0-9a-f]{32}(?:-\d+)?) via (.+)")


def server_on_route(gateway: Node, since: int, servers: list[Node]) -> Node:
    """The live server of [6, 12) on the newest route the gateway logged since ``since``
    (an earlier route may have tried a server killed by the previous test, whose record
    still lives). Usually one server holds [6, 12); routing may also split it over two."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the thread reading the gateway's output may lag
        for _, hops in reversed(ROUTE.findall(gateway.output(since))):
            for node in servers:
                if node.proc.poll() is None and f"{node.peer_id[-6:]}[" in hops:
                    return node
        time.sleep(0.01)
    raise AssertionError(f"no live server on the routes the gateway logged (SHARDMESH_DEBUG=1):\n{gateway.output(since)}")


def streamed_with_a_blow(gateway: Node, servers: list[Node], blow: Callable[[Node], None]) -> tuple[str, Node, float]:
    """Stream a long greedy completion; once it is flowing, ``blow`` a server of
    [6, 12) on its route. The text, that server, and the longest gap between chunks."""
    client = client_for(gateway)
    model_id = client.models.list().data[0].id
    since = len(gateway.lines)
    stream = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=LONG, temperature=0, stream=True)
    text, stamps, victim = [], [], None
    for chunk in stream:
        stamps.append(time.monotonic())
        text.append(chunk.choices[0].text if chunk.choices else "")
        if victim is None and len(stamps) >= 3:
            victim = server_on_route(gateway, since, servers)
            blow(victim)
    assert victim is not None, "the stream ended before a node could be stopped"
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return "".join(text), victim, max(gaps)


def test_sigkill_mid_stream_costs_a_pause_not_an_error(redundant_swarm: list[Node], ref: Transformers) -> None:
    gateway, servers = redundant_swarm[0], redundant_swarm[1:]
    want = ref.greedy(ref.prompt_ids(PROMPT), LONG)
    since = len(gateway.lines)
    text, victim, pause = streamed_with_a_blow(gateway, [s for s in servers if s.proc.poll() is None], lambda n: n.proc.send_signal(signal.SIGKILL))
    assert victim.proc.wait(timeout=10) == -signal.SIGKILL
    assert "replaying on a new one" in gateway.output(since), "the chain must have broken and been replaced"
    assert text == want.text
    print(f"failover pause after SIGKILL: {pause * 1000:.0f} ms (longest gap between streamed chunks)")


def test_sigterm_mid_stream_drains_and_loses_nothing(redundant_swarm: list[Node], ref: Transformers) -> None:
    gateway, servers = redundant_swarm[0], [s for s in redundant_swarm[1:] if s.proc.poll() is None]
    want = ref.greedy(ref.prompt_ids(PROMPT), LONG)
    since = len(gateway.lines)
    text, victim, _ = streamed_with_a_blow(gateway, servers, lambda n: n.proc.send_signal(signal.SIGTERM))
    assert text == want.text
    assert victim.proc.wait(timeout=DRAIN_TIMEOUT + 30) == 0, victim.output()
    assert "drained; stopping" in victim.output(), victim.output()
    assert "replaying" not in gateway.output(since), "a draining node finishes its sessions: no replay needed"
    # The node is gone; the swarm still answers through the one that is left.
    client = client_for(gateway)
    got = client.completions.create(model=client.models.list().data[0].id, prompt=PROMPT, max_tokens=12, temperature=0)
    assert got.choices[0].text == ref.greedy(ref.prompt_ids(PROMPT), 12).text
