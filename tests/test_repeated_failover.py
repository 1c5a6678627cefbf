"""Issue 18's acceptance: kill one of two servers of a range mid-stream, ten times in a row.

Real node processes: M serves blocks [0, 2) and the API, two servers share [2, 3), Y
serves [3, 4). Ten times: a greedy answer streams; after a few tokens the server of
[2, 3) on its route is SIGKILLed; the answer must go on, exact, on the other one. A
fresh server of [2, 3) then joins, so the next round starts with two again. The test
prints each round's longest pause between two tokens (the target, benchmarked rather
than asserted: 1 s).
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from node_process import Node, start_doubled_swarm, start_node, stop_node

from shardmesh.tools.tiny_model import cached_tiny_model

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Tell me a long story about foxes and dogs."}]
TOKENS = 40
ROUNDS = 10
KILL_AFTER = 5  # tokens into each answer
ROUTE = re.compile(r"session [0-9a-f]{32}(?:-\d+)? via (.+)")


@pytest.fixture(scope="module")
def model() -> Path:
    return cached_tiny_model("llama", layers=4, hidden=64)


def live_servers(m: Node, span: list[int]) -> set[str]:
    """Peers M would route [2, 3) to: online, serving ``span``, not found unreachable."""
    peers = httpx.get(f"{m.url}/v1/swarm", timeout=10).json()["peers"]
    return {p["peer"] for p in peers if p["span"] == span and p["state"] == "online" and not p.get("unreachable")}


@pytest.fixture
def swarm(model: Path, tmp_path: Path) -> Iterator[list[Node]]:
    nodes = start_doubled_swarm(model, tmp_path)
    try:
        yield nodes
    finally:
        for node in nodes:
            stop_node(node)
        print(f"---- M's output ----\n{nodes[0].output()[-4000:]}")


def test_killing_one_of_two_servers_ten_times_in_a_row(swarm: list[Node], model: Path, tmp_path: Path) -> None:
    m = swarm[0]
    doubled = [swarm[1], swarm[2]]
    client = openai.OpenAI(base_url=f"{m.url}/v1", api_key="unused", max_retries=0, timeout=300)
    name = client.models.list().data[0].id
    expected = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=TOKENS, temperature=0).choices[0].message.content

    pauses: list[float] = []
    for round_ in range(ROUNDS):
        deadline = time.monotonic() + 60
        while len(live_servers(m, [2, 3]) & {n.peer_id for n in doubled}) < 2:
            assert time.monotonic() < deadline, f"round {round_}: M does not see both servers of [2, 3)"
            time.sleep(0.2)
        since = len(m.lines)
        stream = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=TOKENS, temperature=0, stream=True)
        pieces: list[str] = []
        stamps: list[float] = []
        killed: Node | None = None
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
                stamps.append(time.monotonic())
            if len(pieces) == KILL_AFTER and killed is None:
                route = ROUTE.findall(m.output(since))[-1]
                killed = next(n for n in doubled if f"{n.peer_id[-6:]}[" in route)
                os.kill(killed.proc.pid, signal.SIGKILL)
        assert killed is not None, "the answer ended before the kill"
        assert "".join(pieces) == expected, f"round {round_}: the answer changed after the kill"
        pauses.append(max(b - a for a, b in zip(stamps[KILL_AFTER - 1 :], stamps[KILL_AFTER:])))
        print(f"round {round_ + 1}: killed {killed.peer_id[-6:]}, longest pause after the kill {pauses[-1]:.2f} s")
        stop_node(killed)
        doubled.remove(killed)
        doubled.append(start_node(model, "--layers", "2:3", "--api", "off", "--join", m.address, api=False, key_dir=tmp_path))
        swarm.append(doubled[-1])
    print(f"{ROUNDS} kills: every answer exact; longest pause {max(pauses):.2f} s, median {sorted(pauses)[len(pauses) // 2]:.2f} s")
