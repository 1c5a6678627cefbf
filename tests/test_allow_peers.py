"""A private swarm by peer id (``--allow-peers FILE``, mesh/allow_list.py), with real nodes.

M (blocks [0, 2), the API) and B ([2, 4)) are given a file naming both of them. E, a
valid node serving [2, 4) as B does but not on the list, joins M. E must never be routed
to: M closes its connection, keeps its record out of the view, and every chat goes
through B. A stranger's connection is closed before it can ask M anything.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from node_process import Node, start_node, stop_node, wait_for_route

from shardmesh.mesh.allow_list import AllowList, AllowListError, read_allow_list
from shardmesh.mesh.host import HostError, peer_id_of, running_host
from shardmesh.mesh.identity import load_or_create_identity
from shardmesh.mesh.swarm_map import SwarmMapError, fetch_swarm_map
from shardmesh.tools.tiny_model import cached_tiny_model

MESSAGES = [{"role": "user", "content": "Tell me about foxes."}]


def identity(path: Path) -> str:
    return peer_id_of(load_or_create_identity(path)).to_base58()


def test_the_allow_list_file_is_checked_line_by_line(tmp_path: Path) -> None:
    a, b = identity(tmp_path / "a.key"), identity(tmp_path / "b.key")
    good = tmp_path / "good.txt"
    good.write_text(f"# the swarm\n{a}\n\n{b}  # the other one\n")
    assert read_allow_list(good) == {a, b}
    assert AllowList({a}, me=b).allows(b) and not AllowList({a}, me=b).allows("12D3KooWsomebodyElse")
    bad = tmp_path / "bad.txt"
    bad.write_text(f"{a}\nnot-a-peer-id\n")
    with pytest.raises(AllowListError, match="line 2"):
        read_allow_list(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nobody\n")
    with pytest.raises(AllowListError, match="no peer ids"):
        read_allow_list(empty)
    with pytest.raises(AllowListError, match="cannot read"):
        read_allow_list(tmp_path / "missing.txt")


@pytest.fixture(scope="module")
def private_swarm(tmp_path_factory) -> Iterator[tuple[Node, Node, Node]]:
    model = cached_tiny_model("llama", layers=4, hidden=64)
    keys = tmp_path_factory.mktemp("keys")
    allow = keys / "allow.txt"
    allow.write_text(f"{identity(keys / 'm.key')}\n{identity(keys / 'b.key')}\n")
    nodes: list[Node] = []
    try:
        m = start_node(model, "--layers", "0:2", "--allow-peers", str(allow), "--key-file", str(keys / "m.key"), key_dir=keys)
        nodes.append(m)
        nodes.append(start_node(model, "--layers", "2:4", "--api", "off", "--join", m.address, "--allow-peers", str(allow),
                                "--key-file", str(keys / "b.key"), api=False, key_dir=keys))  # fmt: skip
        nodes.append(start_node(model, "--layers", "2:4", "--api", "off", "--join", m.address,
                                "--key-file", str(keys / "e.key"), api=False, key_dir=keys))  # fmt: skip
        wait_for_route(m)
        yield nodes[0], nodes[1], nodes[2]
    finally:
        for node in nodes:
            stop_node(node)
        for node in nodes:
            print(f"---- node output ({' '.join(node.proc.args[-4:])}) ----\n{node.output()[-2500:]}")


def test_a_peer_not_on_the_list_is_never_routed_to(private_swarm: tuple[Node, Node, Node]) -> None:
    m, b, e = private_swarm
    time.sleep(6)  # E has joined, published and retried a few times by now
    peers = {p["peer"] for p in httpx.get(f"{m.url}/v1/swarm", timeout=10).json()["peers"]}
    assert peers == {m.peer_id, b.peer_id}, peers
    model = httpx.get(f"{m.url}/v1/models", timeout=10).json()["data"][0]["id"]
    for _ in range(4):
        reply = httpx.post(f"{m.url}/v1/chat/completions", timeout=60,
                           json={"model": model, "messages": MESSAGES, "max_tokens": 6, "temperature": 0})  # fmt: skip
        assert reply.status_code == 200, reply.text
    assert e.proc.poll() is None  # E is up and serving: only the list keeps it out


def test_a_stranger_cannot_ask_a_private_node_anything(private_swarm: tuple[Node, Node, Node]) -> None:
    m, _, _ = private_swarm

    async def ask() -> str:
        async with running_host(create_new_key_pair(), ["/ip4/127.0.0.1/tcp/0"]) as stranger:
            peer = await stranger.connect(m.address)
            try:
                await fetch_swarm_map(stranger, peer, 10)
            except (SwarmMapError, HostError) as exc:
                return f"refused: {exc}"
            return "answered"

    assert trio.run(ask).startswith("refused")
