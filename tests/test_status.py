"""``shardmesh status``: the swarm map as one peer shows it, verified record by record.

In process: the client keeps valid records and drops forged, foreign and expired ones
(the peer we ask must not be able to invent servers); a map is served and fetched over
real libp2p hosts; the report shows gaps. Then real node processes, a 12-block tiny
model split 0:6 and 6:12, probed with the command itself: text, ``--json``, and the
two ways a probe fails (a malformed address, nobody listening), each exit status 2.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cbor2
import httpx
import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from node_process import Node, start_node, stop_node

from shardmesh.mesh.host import running_host
from shardmesh.mesh.records import NodeRecord, RecordError, expires_at, sign_record
from shardmesh.mesh.registry import Registry
from shardmesh.mesh.swarm_map import (
    PROTOCOL,
    SwarmMap,
    SwarmMapError,
    fetch_swarm_map,
    parse_swarm_map,
    swarm_map_handler,
)
from shardmesh.mesh.wire import RESULT
from shardmesh.tools.status import render, summarize

MODEL = "tiny@0123456789ab"
HEADER = {"t": RESULT, "model": MODEL, "total_blocks": 12}
LOCAL = ["/ip4/127.0.0.1/tcp/0"]


def peer_of(key_pair) -> str:
    return ID.from_pubkey(key_pair.public_key).to_base58()


def make_record(key_pair, start: int, end: int, **changes) -> NodeRecord:
    peer = peer_of(key_pair)
    record = NodeRecord(
        peer=peer,
        addrs=(f"/ip4/127.0.0.1/tcp/4001/p2p/{peer}",),
        model=MODEL,
        start=start,
        end=end,
        total_blocks=12,
        state="online",
        throughput=100.0,
        cache_tokens_free=4096,
        backend="torch",
        device="cpu",
        dtype="float32",
        rtt={},
        version="test",
        seq=1,
        expires=expires_at(30),
    )
    return dataclasses.replace(record, **changes)


# --------------------------------------------------------------------------- in process


def test_client_keeps_valid_records_and_drops_forgeries() -> None:
    a, b, c = create_new_key_pair(), create_new_key_pair(), create_new_key_pair()
    good = make_record(a, 0, 6, seq=5)
    # b signs a record that claims to be c's: the signature does not match c's peer id.
    forged = sign_record(make_record(c, 6, 12), b)
    entries = [
        sign_record(good, a),
        sign_record(dataclasses.replace(good, seq=4, start=0, end=3), a),  # older: superseded
        forged,
        sign_record(make_record(b, 6, 12, model="other@ffffffffffff"), b),  # another model's swarm
        sign_record(make_record(b, 6, 12, expires=time.time() - 1), b),  # expired
        sign_record(make_record(b, 0, 8, total_blocks=8), b),  # disagrees on the model's size
        "not bytes",
        b"\xff garbage",
    ]
    swarm = parse_swarm_map(HEADER, cbor2.dumps(entries))
    assert swarm.records == [good]
    reasons = sorted(e.reason for e in swarm.dropped)
    assert reasons == sorted([
        RecordError.BAD_SIGNATURE,
        RecordError.WRONG_MODEL,
        RecordError.EXPIRED,
        RecordError.BAD_SPAN,
        RecordError.MALFORMED,
        RecordError.MALFORMED,
    ])


@pytest.mark.parametrize(
    "header, payload",
    [
        ({"t": "error", "code": "x"}, cbor2.dumps([])),
        ({"t": RESULT, "total_blocks": 12}, cbor2.dumps([])),
        ({"t": RESULT, "model": MODEL, "total_blocks": -1}, cbor2.dumps([])),
        (HEADER, cbor2.dumps({"not": "a list"})),
        (HEADER, b"\xff\xff"),
    ],
)
def test_malformed_maps_are_refused(header: dict, payload: bytes) -> None:
    with pytest.raises(SwarmMapError):
        parse_swarm_map(header, payload)


def test_map_served_and_fetched_over_libp2p() -> None:
    """A node's registry (its own record included) and a forgery planted in what it
    sends: the client verifies each record itself and keeps only the real ones."""
    other = create_new_key_pair()

    class Tampered:
        """Stands in for a registry whose peer adds a record it made up."""

        def __init__(self, registry: Registry) -> None:
            self.registry, self.model_id = registry, registry.model_id

        def total_blocks(self) -> int:
            return self.registry.total_blocks()

        def unreachable_for(self) -> dict[str, float]:
            return self.registry.unreachable_for()

        def signed_records(self) -> list[bytes]:
            me = self.registry.mesh_host.key_pair
            return [*self.registry.signed_records(), sign_record(make_record(other, 6, 12), me)]

    async def main() -> tuple[SwarmMap, SwarmMap, str]:
        with trio.fail_after(60):
            return await exchange()

    async def exchange() -> tuple[SwarmMap, SwarmMap, str]:
        async with (
            running_host(create_new_key_pair(), LOCAL) as server,
            running_host(create_new_key_pair(), LOCAL) as client,
            trio.open_nursery() as nursery,
        ):
            registry = Registry(server, MODEL, make_record(server.key_pair, 0, 6, addrs=()), ttl=5, publish_interval=1)
            await nursery.start(registry.run)
            server.set_handler(PROTOCOL, swarm_map_handler(registry))
            peer_id = await client.connect(server.dialable_addrs()[0])
            honest = await fetch_swarm_map(client, peer_id, timeout=10)
            server.set_handler(PROTOCOL, swarm_map_handler(Tampered(registry)))
            tampered = await fetch_swarm_map(client, peer_id, timeout=10)
            nursery.cancel_scope.cancel()
            return honest, tampered, server.peer_id_str

    honest, tampered, server_peer = trio.run(main)
    for swarm in (honest, tampered):
        assert (swarm.model, swarm.total_blocks) == (MODEL, 12)
        assert [(r.peer, r.span) for r in swarm.records] == [(server_peer, (0, 6))]
    assert honest.dropped == []
    assert [e.reason for e in tampered.dropped] == [RecordError.BAD_SIGNATURE]


def test_report_shows_gaps_gateways_and_the_peer_asked() -> None:
    a, b, g = create_new_key_pair(), create_new_key_pair(), create_new_key_pair()
    records = [
        make_record(b, 8, 12, throughput=40.0),
        make_record(g, 0, 0, backend="none", device="none", dtype="none", api="http://127.0.0.1:8000"),
        make_record(a, 0, 4, throughput=60.0),
    ]
    summary = summarize(SwarmMap(MODEL, 12, records), via=peer_of(g))
    assert [p["peer"] for p in summary["peers"]] == [peer_of(a), peer_of(b), peer_of(g)]
    assert summary["coverage"] == [1] * 4 + [0] * 4 + [1] * 4
    assert summary["gaps"] == [[4, 8]] and not summary["complete"] and summary["bottleneck"] == 0.0
    text = render(summary)
    assert "gaps: [4,8)" in text and "1111....11 11" in text
    assert f"{peer_of(g)[-8:]} *" in text and "gateway" in text and "http://127.0.0.1:8000" in text
    json.dumps(summary)  # what --json prints


# --------------------------------------------------------------------------- processes


def shardmesh_status(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "shardmesh", "status", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory) -> Iterator[tuple[Node, Node]]:
    """0:6 (no API) and 6:12 (API, joined to the first), once each knows the other."""
    from shardmesh.tools.tiny_model import cached_tiny_model

    model: Path = cached_tiny_model("llama", layers=12, hidden=64)
    keys = tmp_path_factory.mktemp("status-keys")
    first = start_node(model, "--layers", "0:6", "--api", "off", api=False, key_dir=keys)
    nodes = [first]
    try:
        second = start_node(model, "--layers", "6:12", "--join", first.address, key_dir=keys)
        nodes.append(second)
        deadline = time.monotonic() + 30
        while len(httpx.get(f"{second.url}/v1/swarm", timeout=5).json()["peers"]) < 2:
            assert time.monotonic() < deadline, "the second node never saw the first"
            time.sleep(0.2)
        yield first, second
    finally:
        for node in nodes:
            stop_node(node)


def status_json(first: Node, peers: int, within: float = 15) -> dict:
    """``status --json`` via ``first``, once its view holds ``peers`` records: the first
    node may get the second's gossip a moment after the second got its."""
    deadline = time.monotonic() + within
    while True:
        result = shardmesh_status("--join", first.address, "--json")
        assert result.returncode == 0, result.stderr
        view = json.loads(result.stdout)
        if len(view["peers"]) >= peers or time.monotonic() > deadline:
            return view
        time.sleep(0.5)


@pytest.mark.slow
def test_status_json_lists_both_nodes(two_nodes: tuple[Node, Node]) -> None:
    first, second = two_nodes
    view = status_json(first, 2)
    peers = {p["peer"]: p for p in view["peers"]}
    assert set(peers) == {first.peer_id, second.peer_id}
    assert peers[first.peer_id]["span"] == [0, 6] and peers[second.peer_id]["span"] == [6, 12]
    assert all(p["state"] == "online" and p["throughput"] > 0 for p in peers.values())
    assert peers[second.peer_id]["api"] == second.url and peers[first.peer_id]["api"] is None
    assert view["via"] == first.peer_id and view["total_blocks"] == 12
    assert view["coverage"] == [1] * 12 and view["complete"] and view["gaps"] == []
    assert view["bottleneck"] > 0 and view["dropped"] == []


@pytest.mark.slow
def test_status_table(two_nodes: tuple[Node, Node]) -> None:
    first, second = two_nodes
    status_json(first, 2)  # wait until the first node's view is whole
    result = shardmesh_status("--join", first.address)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    print(out)
    lines = out.splitlines()
    row = {node.peer_id: next(line for line in lines if line.strip().startswith(node.peer_id[-8:])) for node in (first, second)}
    assert "[0,6)" in row[first.peer_id] and "online" in row[first.peer_id] and " * " in row[first.peer_id]
    assert "[6,12)" in row[second.peer_id] and second.url in row[second.peer_id]
    assert lines.index(row[first.peer_id]) < lines.index(row[second.peer_id])  # sorted by span
    assert "complete" in out and "bottleneck" in out


@pytest.mark.slow
def test_malformed_address_exits_2_with_one_line() -> None:
    result = shardmesh_status("--join", "/ip4/127.0.0.1/tcp/4001")  # no /p2p/<peer id>
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and "/p2p/" in result.stderr


@pytest.mark.slow
def test_unreachable_peer_exits_2_quickly() -> None:
    with socket.socket() as s:  # a port that was free a moment ago: nobody listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    peer = peer_of(create_new_key_pair())
    began = time.monotonic()
    result = shardmesh_status("--join", f"/ip4/127.0.0.1/tcp/{port}/p2p/{peer}", timeout=30)
    assert time.monotonic() - began < 15
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and "cannot reach" in result.stderr, result.stderr


def test_unreachable_marks_are_shown_and_bounded() -> None:
    """The asked node's liveness marks (docs/PROTOCOL.md 5): kept only for peers with a
    record in the map and with a sane figure; such a peer counts for no coverage."""
    a, b = create_new_key_pair(), create_new_key_pair()
    records = [make_record(a, 0, 6), make_record(b, 6, 12)]
    marks = {peer_of(b): 12.3, peer_of(a): "soon", "12D3KooWnobodyHere": 5, "x" * 10_000: 1}
    swarm = parse_swarm_map({**HEADER, "unreachable": marks}, cbor2.dumps([sign_record(r, k) for r, k in zip(records, (a, b))]))
    assert swarm.unreachable == {peer_of(b): 12.3}
    assert parse_swarm_map({**HEADER, "unreachable": [1, 2]}, cbor2.dumps([])).unreachable == {}
    summary = summarize(swarm, via=peer_of(a))
    assert summary["coverage"] == [1] * 6 + [0] * 6 and summary["gaps"] == [[6, 12]]
    b_row = next(p for p in summary["peers"] if p["peer"] == peer_of(b))
    assert b_row["unreachable"] and b_row["unreachable_for"] == 12.3
    assert "unreachable 12s" in render(summary)
