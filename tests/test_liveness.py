"""Issue 18, item 1 (first part): a dead server leaves routing in seconds, not when its
record expires (mesh/liveness.py).

Real node processes: M serves blocks [0, 2) and the API; B and C both serve [2, 4). B
is killed (SIGKILL). M's connection to B drops, M dials B again, fails, and from then
on B is ``unreachable`` in M's ``/v1/swarm`` (with since when) and out of the coverage
count, long before B's 30 s record would expire; chats go through C at once.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from node_process import Node, start_node, stop_node, wait_for_route

from shardmesh.mesh.records import RECORD_TTL
from shardmesh.tools.tiny_model import cached_tiny_model

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Tell me about foxes."}]


@pytest.fixture
def swarm(tmp_path: Path) -> Iterator[list[Node]]:
    model = cached_tiny_model("llama", layers=4, hidden=64)
    m = start_node(model, "--layers", "0:2", key_dir=tmp_path)
    nodes = [m]
    try:
        for _ in range(2):
            nodes.append(start_node(model, "--layers", "2:4", "--api", "off", "--join", m.address, api=False, key_dir=tmp_path))
        wait_for_route(m)
        yield nodes
    finally:
        for node in nodes:
            stop_node(node)
        for node in nodes:
            print(f"---- node output ({' '.join(node.proc.args[-6:])}) ----\n{node.output()[-2500:]}")


def peer_entry(m: Node, peer: str) -> dict | None:
    return next((p for p in httpx.get(f"{m.url}/v1/swarm", timeout=10).json()["peers"] if p["peer"] == peer), None)


def test_a_killed_server_is_unreachable_and_out_of_routing_within_seconds(swarm: list[Node]) -> None:
    m, b, c = swarm
    model = httpx.get(f"{m.url}/v1/models", timeout=10).json()["data"][0]["id"]
    body = {"model": model, "messages": MESSAGES, "max_tokens": 6, "temperature": 0}
    expected = httpx.post(f"{m.url}/v1/chat/completions", json=body, timeout=60).json()["choices"][0]["message"]["content"]
    deadline = time.monotonic() + 30
    while not all(peer_entry(m, n.peer_id) for n in (b, c)):  # M sees both servers of [2, 4)
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert peer_entry(m, b.peer_id)["unreachable"] is False

    os.kill(b.proc.pid, signal.SIGKILL)
    killed = time.monotonic()
    while True:
        entry = peer_entry(m, b.peer_id)
        if entry is None or entry["unreachable"]:
            break
        assert time.monotonic() - killed < RECORD_TTL, "B was never found unreachable"
        time.sleep(0.1)
    took = time.monotonic() - killed
    print(f"B unreachable in M's view {took:.1f} s after the kill (its record lives {RECORD_TTL:.0f} s)")
    assert entry is not None, "B's record expired before B was found unreachable"
    assert entry["unreachable_for"] >= 0
    assert httpx.get(f"{m.url}/v1/swarm", timeout=10).json()["coverage"] == [1, 1, 1, 1]  # C alone now
    reply = httpx.post(f"{m.url}/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == expected
    assert took < RECORD_TTL / 2


def test_a_mark_goes_when_the_peer_publishes_a_record_signed_after_it() -> None:
    from shardmesh.mesh.liveness import Liveness

    liveness = Liveness()
    liveness.mark("b", now=1000.0)
    liveness.mark("b", now=1005.0)  # the first time it was found so is what counts
    assert liveness.since("b") == 1000.0 and liveness.unreachable() == {"b"}
    liveness.record_signed("b", seq_ms=999_000)  # signed before the mark: a late copy
    assert liveness.since("b") == 1000.0
    liveness.record_signed("b", seq_ms=1_000_500)  # signed after it: alive again
    assert liveness.since("b") is None and liveness.unreachable() == frozenset()


def test_a_frozen_server_is_found_by_ping_and_used_again_once_it_answers(swarm: list[Node]) -> None:
    """Item 1's idle ping: B is frozen (SIGSTOP) while nothing runs through it, so its
    connection stays up and no dial fails. M's pings find it all the same, long before
    its record would expire; once B runs again it answers and the mark goes."""
    from shardmesh.mesh.liveness import MISSES, PING_EVERY

    m, b, c = swarm
    deadline = time.monotonic() + 30
    while not all(peer_entry(m, n.peer_id) for n in (b, c)):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    os.kill(b.proc.pid, signal.SIGSTOP)
    frozen = time.monotonic()
    try:
        while True:
            entry = peer_entry(m, b.peer_id)
            if entry is None or entry["unreachable"]:
                break
            assert time.monotonic() - frozen < RECORD_TTL + 10, "B was never found unreachable"
            time.sleep(0.1)
        took = time.monotonic() - frozen
        print(f"frozen B unreachable in M's view {took:.1f} s after SIGSTOP "
              f"(pings every {PING_EVERY:g} s, {MISSES} missed; its record lives {RECORD_TTL:.0f} s)")  # fmt: skip
        assert entry is not None, "B's record expired before any ping found it frozen"
        assert httpx.get(f"{m.url}/v1/swarm", timeout=10).json()["coverage"] == [1, 1, 1, 1]  # C alone
    finally:
        os.kill(b.proc.pid, signal.SIGCONT)
    resumed = time.monotonic()
    while (entry := peer_entry(m, b.peer_id)) is None or entry["unreachable"]:
        assert time.monotonic() - resumed < 30, "B answers again but is still marked"
        time.sleep(0.1)
    print(f"B back in M's view {time.monotonic() - resumed:.1f} s after SIGCONT")
    assert httpx.get(f"{m.url}/v1/swarm", timeout=10).json()["coverage"] == [1, 1, 2, 2]


def test_pings_mark_after_misses_in_a_row_and_clear_on_an_answer() -> None:
    import trio.testing

    from shardmesh.mesh.liveness import MISSES, PING_EVERY, Liveness, ping_connected

    liveness = Liveness()
    silent: set[str] = set()
    seen: list[tuple[int, frozenset[str]]] = []

    async def answers(peer: str) -> bool:
        await trio.sleep(0.5)
        return peer not in silent

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ping_connected, lambda: ["a", "b"], answers, liveness, trio.current_time)
            for round_ in range(8):
                silent.clear()
                if round_ in (1, 3, 4):  # b misses once, then twice in a row; a never
                    silent.add("b")
                await trio.sleep(PING_EVERY + 0.5)
                seen.append((round_, liveness.unreachable()))
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    marked = [round_ for round_, peers in seen if "b" in peers]
    assert MISSES == 2 and marked == [4], seen  # one miss is forgiven; two mark; the next answer clears
    assert all("a" not in peers for _, peers in seen)


def test_a_suspicion_travels_as_a_hint_and_others_confirm_it(swarm: list[Node], tmp_path: Path) -> None:
    """M names the killed B in its record's ``suspects`` (mesh/hints.py), and a gateway G
    that joined M finds B unreachable too, by its own check: here G has its own
    connection to B (the DHT made it), whose drop it saw first; a G without one checks on
    M's hint (test_hints.py). Either way B leaves G's routing long before its record expires."""
    m, b, c = swarm
    model = cached_tiny_model("llama", layers=4, hidden=64)
    g = start_node(model, "--layers", "none", "--join", m.address, key_dir=tmp_path)
    try:
        deadline = time.monotonic() + 30
        while not all(peer_entry(g, n.peer_id) for n in (m, b, c)):
            assert time.monotonic() < deadline, "G does not see the swarm"
            time.sleep(0.2)
        os.kill(b.proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        named = marked = None
        while named is None or marked is None:
            assert time.monotonic() - killed < RECORD_TTL, f"named after {named}, marked by G after {marked}"
            if named is None and b.peer_id in (peer_entry(g, m.peer_id) or {}).get("suspects", []):
                named = time.monotonic() - killed
            entry = peer_entry(g, b.peer_id)
            assert entry is not None, "B's record expired in G's view before G marked it"
            if marked is None and entry["unreachable"]:
                marked = time.monotonic() - killed
            time.sleep(0.1)
        print(f"M's record named B {named:.1f} s after the kill; G found B unreachable after {marked:.1f} s")
        assert httpx.get(f"{g.url}/v1/swarm", timeout=10).json()["coverage"] == [1, 1, 1, 1]
    finally:
        stop_node(g)
        print(f"---- G's output ----\n{g.output()[-2500:]}")
