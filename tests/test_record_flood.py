"""Issue 17, item 1: a flood of valid records from free identities, sent to a real node.

The node is a real ``shardmesh run`` process (a tiny 4-block Llama, its gateway on).
The attacker (shardmesh/tools/record_flood.py, written from docs/PROTOCOL.md 3 and 4.1)
connects over libp2p and relays :data:`FLOOD` records, each signed by a fresh identity
and published as that identity's own StrictSign gossip message: every one of them is
valid. Half name a "victim" TCP listener that the test runs, the rest name addresses
on 198.18.0.0/15 that lead nowhere.

Before the fix such a flood filled py-libp2p's peer table (1,000 peers), evicted the
node's own key, stopped it publishing, and made it dial the addresses records named.
Now the node must, the test checks each:

* keep serving: the same greedy chat before, during and after the flood;
* keep a bounded view (one origin holds at most a quarter of it) and still admit an
  honest record that reaches it another way;
* still accept a new connection and keep publishing its own record;
* dial no address a record merely names (the victim sees no connection);
* grow its RSS by less than :data:`RSS_BOUND` (printed).
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from node_process import Node, greedy_chat, memory_bytes, start_node, stop_node

from shardmesh.mesh.host import running_host
from shardmesh.mesh.swarm_map import fetch_swarm_map
from shardmesh.mesh.view_room import MAX_PER_ORIGIN
from shardmesh.tools.record_flood import flood

pytestmark = pytest.mark.slow

FLOOD = 3000  # identities; each sends one valid record
RATE = 400.0  # records/s, under the node's gossip limit per neighbour so that every one counts
RSS_BOUND = 64 << 20  # bytes the node's RSS may grow by across the flood
MESSAGES = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. Tell me more."}]


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    from shardmesh.tools.tiny_model import cached_tiny_model

    model: Path = cached_tiny_model("llama", layers=4, hidden=64)
    node = start_node(model)
    try:
        yield node
    finally:
        stop_node(node)
        print(f"---- node output ----\n{node.output()[-3000:]}")


def swarm_json(node: Node) -> dict[str, Any]:
    with urllib.request.urlopen(f"{node.url}/v1/swarm", timeout=30) as response:
        return json.load(response)


class Victim:
    """A TCP listener that counts the connections made to it."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=512)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()


def own_seq(node: Node) -> int:
    swarm = swarm_json(node)
    return next(p["seq"] for p in swarm["peers"] if p["peer"] == swarm["local_peer"])


async def connect_and_fetch_map(node: Node) -> int:
    """A brand-new identity dials the node and reads its swarm map; the records in it."""
    async with running_host(create_new_key_pair(), ["/ip4/127.0.0.1/tcp/0"]) as mesh:
        with trio.fail_after(30):
            peer_id = await mesh.connect(node.address)
            return len((await fetch_swarm_map(mesh, peer_id, 20)).records)


def test_a_record_flood_neither_kills_nor_grows_nor_steers_the_node(node: Node) -> None:
    expected = greedy_chat(node, MESSAGES)
    swarm = swarm_json(node)
    victim = Victim()
    rss_before = memory_bytes(node.proc.pid)

    during: list[str] = []
    chatting = threading.Thread(target=lambda: during.append(greedy_chat(node, MESSAGES)))

    def addrs_for(i: int) -> list[str]:
        if i % 2:
            return [f"/ip4/127.0.0.1/tcp/{victim.port}"]
        return [f"/ip4/198.18.{i // 250 % 256}.{i % 250 + 1}/tcp/4001"]

    def started_chat(sent: int) -> None:
        if sent == FLOOD // 2:
            chatting.start()

    report = trio.run(lambda: flood(node.address, swarm["model"], swarm["total_blocks"], FLOOD, rate=RATE,
                                    addrs_for=addrs_for, on_sent=started_chat))  # fmt: skip
    chatting.join(timeout=120)
    time.sleep(1.0)
    rss_after = memory_bytes(node.proc.pid)
    print(f"flood: {FLOOD} records in {report.seconds:.1f} s; node RSS {rss_before / 2**20:.1f} -> "
          f"{rss_after / 2**20:.1f} MB; victim saw {victim.connections} connections")  # fmt: skip

    assert node.proc.poll() is None, "the node died"
    assert during == [expected], "the chat during the flood differed or failed"
    view = swarm_json(node)["peers"]
    flooded = set(report.peers) & {p["peer"] for p in view}
    print(f"view: {len(view)} records, {len(flooded)} of them from the flood")
    assert 0 < len(flooded) <= MAX_PER_ORIGIN

    # An honest record that comes another way (its own connection) still finds a place.
    honest = trio.run(lambda: flood(node.address, swarm["model"], swarm["total_blocks"], 1))
    assert honest.peers[0] in {p["peer"] for p in swarm_json(node)["peers"]}

    # New connections are accepted and our own record is still signed and published.
    assert trio.run(connect_and_fetch_map, node) >= 1
    seq = own_seq(node)
    deadline = time.monotonic() + 30
    while own_seq(node) == seq and time.monotonic() < deadline:
        time.sleep(0.5)
    assert own_seq(node) > seq, "the node stopped publishing its record"
    assert "PeerStoreError" not in node.output()

    assert victim.connections == 0, "the node dialled an address that records merely named"
    assert rss_after - rss_before < RSS_BOUND
    assert greedy_chat(node, MESSAGES) == expected
