"""The prefix cache through real node processes: a chat's later turns reuse on every hop
what the earlier ones computed, and every answer stays what transformers gives.

Four servers split a 12-layer tiny Llama (0:4, two of 4:8, 8:12) and a fifth,
``--layers none``, serves the API. The gateway remembers which route holds a history's
prefix and takes it again; each hop reports how many tokens it reused (``/metrics``).
Then the middle hop that held the prefix is stopped: the next turn runs on a chain
whose middle hop never saw the chat, and still answers exactly.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from node_process import Node, start_node, stop_node, stop_showing_failures
from reference import Transformers

pytestmark = pytest.mark.slow

N = 8
SPANS = ["0:4", "4:8", "4:8", "8:12"]
SYSTEM = ("You are a patient assistant for a small bakery. Answer questions about bread, cakes, opening hours, "
          "prices and allergies. Keep every answer short, friendly and exact; when you do not know, say so and "
          "suggest calling the shop. Never invent prices. Mention the daily special when it fits.")
QUESTIONS = ["Do you sell rye bread?", "And on Sundays?", "What about gluten?", "Thanks, bye."]


def metric(node: Node, name: str) -> float:
    text = httpx.get(f"{node.url}/metrics", timeout=10).text
    found = re.search(rf"^{name}(?:_total)? ([0-9.e+]+)$", text, re.M)
    assert found is not None, f"{name} missing from {node.url}/metrics"
    return float(found.group(1))


@pytest.fixture(scope="module")
def llama() -> Path:
    from shardmesh.tools.tiny_model import cached_tiny_model

    return cached_tiny_model("llama", layers=12, hidden=64)


@pytest.fixture(scope="module")
def ref(llama: Path) -> Transformers:
    return Transformers(llama)


@pytest.fixture(scope="module")
def swarm(request, llama: Path, tmp_path_factory) -> Iterator[tuple[list[Node], Node]]:
    tmp = tmp_path_factory.mktemp("prefix-keys")
    first = start_node(llama, "--layers", SPANS[0], key_dir=tmp)
    nodes = [first]
    try:
        with ThreadPoolExecutor(3) as pool:
            nodes += list(pool.map(lambda s: start_node(llama, "--layers", s, "--join", first.address, key_dir=tmp), SPANS[1:]))
        # No audits: an audit chain runs over the other middle hop and, reusing and keeping
        # prefixes as any chain does, would leave the chat there before the failover test.
        gateway = start_node(llama, "--layers", "none", "--join", first.address, "--audit-rate", "0", key_dir=tmp)
        nodes.append(gateway)
        deadline = time.monotonic() + 30
        while httpx.get(f"{gateway.url}/health", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "no complete route within 30 s"
            time.sleep(0.2)
        yield nodes[:4], gateway
    finally:
        stop_showing_failures(nodes, bool(request.session.testsfailed))


def chat(gateway: Node, messages: list[dict]) -> str:
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=N, temperature=0)
    return r.choices[0].message.content


def turns(gateway: Node, ref: Transformers, questions: list[str], system: str = SYSTEM) -> list[float]:
    """Asks ``questions`` one after the other as one chat, checking each answer against
    transformers; the history tokens the gateway's chains held at each turn."""
    messages = [{"role": "system", "content": system}]
    held = []
    for question in questions:
        messages.append({"role": "user", "content": question})
        before = metric(gateway, "shardmesh_prompt_tokens_cached")
        answer = chat(gateway, messages)
        assert answer == ref.greedy(ref.chat_ids(messages), N).text, f"turn {len(held) + 1}"
        held.append(metric(gateway, "shardmesh_prompt_tokens_cached") - before)
        messages.append({"role": "assistant", "content": answer})
    return held


def test_serving_nodes_publish_the_prefill_step_they_measured(swarm) -> None:
    from shardmesh.backends.torch.throughput import PREFILL_STEPS

    _, gateway = swarm
    servers = [p for p in httpx.get(f"{gateway.url}/v1/swarm", timeout=10).json()["peers"] if not p["gateway"]]
    assert len(servers) == 4 and all(p["limits"]["prefill_step"] in PREFILL_STEPS for p in servers), servers


def test_one_node_with_the_whole_model_reuses_a_chat_in_process(llama: Path, ref: Transformers, tmp_path) -> None:
    """One hop: the gateway's own blocks, no network (backends/local_chain.py)."""
    node = start_node(llama, "--layers", "all", key_dir=tmp_path)
    try:
        held = turns(node, ref, QUESTIONS[:2])
        assert held[0] == 0 and held[1] >= 64, held
        assert metric(node, "shardmesh_prefix_tokens_reused") >= held[1]
    finally:
        stop_node(node)


def test_every_later_turn_reuses_the_chat_so_far_on_every_hop(swarm, ref: Transformers) -> None:
    servers, gateway = swarm
    reused_before = [metric(s, "shardmesh_prefix_tokens_reused") for s in servers]
    held = turns(gateway, ref, QUESTIONS[:3])
    print(f"history tokens held at each turn: {held}")
    assert held[0] == 0 and all(h >= 64 for h in held[1:]), held
    reused = [metric(s, "shardmesh_prefix_tokens_reused") - r for s, r in zip(servers, reused_before)]
    # Both turns went through the first and last hop, and one of the two middle ones.
    assert reused[0] >= sum(held) and reused[3] >= sum(held), reused
    assert max(reused[1], reused[2]) >= sum(held), reused
    assert metric(servers[0], "shardmesh_prefix_cache_bytes") > 0


def test_chats_that_share_a_system_prompt_run_at_once_and_stay_exact(swarm, ref: Transformers) -> None:
    servers, gateway = swarm
    turns(gateway, ref, ["Hello?"])  # the system prompt is cached now
    before = metric(gateway, "shardmesh_prompt_tokens_cached")
    questions = ["Is there bread?", "Cakes today?", "Open at nine?", "Any nuts?"]
    with ThreadPoolExecutor(len(questions)) as pool:
        list(pool.map(lambda q: turns(gateway, ref, [q]), questions))
    assert metric(gateway, "shardmesh_prompt_tokens_cached") - before >= 64 * len(questions)


def test_a_later_turn_on_a_chain_without_the_prefix_answers_the_same(swarm, ref: Transformers) -> None:
    """The middle hop that holds the chat goes away between turns: the next turn's chain
    has a middle hop (and so a last hop, whose upstream changed) without the prefix."""
    servers, gateway = swarm
    system = SYSTEM + " This chat is about failover."
    messages = [{"role": "system", "content": system}, {"role": "user", "content": QUESTIONS[0]}]
    middle = [metric(s, "shardmesh_prefix_cache_bytes") for s in servers[1:3]]
    answer = chat(gateway, messages)
    assert answer == ref.greedy(ref.chat_ids(messages), N).text
    grew = [metric(s, "shardmesh_prefix_cache_bytes") - b for s, b in zip(servers[1:3], middle)]
    holder = servers[1 + grew.index(max(grew))]
    stop_node(holder)
    messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": QUESTIONS[1]}]
    before = metric(gateway, "shardmesh_prompt_tokens_cached")
    assert chat(gateway, messages) == ref.greedy(ref.chat_ids(messages), N).text
    assert metric(gateway, "shardmesh_prompt_tokens_cached") == before  # the whole history was computed again
    assert turns(gateway, ref, [QUESTIONS[0], QUESTIONS[1]], system)[1] >= 64  # and the new chain holds it now
