"""Finding the models a swarm serves (mesh/model_finder.py): the pure merge of swarm
maps, then real node processes of two different models asked over libp2p."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from node_process import start_node, stop_node

from shardmesh.mesh.model_finder import find_served_models, served_models
from shardmesh.mesh.records import NodeRecord
from shardmesh.mesh.swarm_map import SwarmMap
from shardmesh.tools.tiny_model import cached_tiny_model


def record(peer: str, model: str, span: tuple[int, int], *, total: int = 4, seq: int = 1, state: str = "online") -> NodeRecord:
    return NodeRecord(peer=peer, addrs=(), model=model, start=span[0], end=span[1], total_blocks=total, state=state,
                      throughput=100.0, cache_tokens_free=1000, backend="torch", device="cpu", dtype="float32", rtt={},
                      version="0", seq=seq, expires=0.0)  # fmt: skip


def test_maps_merge_into_models_served_whole_or_not() -> None:
    a, b = "org/a@111111111111", "org/b@222222222222"
    maps = [
        SwarmMap(a, 4, [record("p1", a, (0, 2)), record("p2", a, (2, 4)), record("x", b, (0, 4))]),  # x: not a's map's to give
        SwarmMap(a, 4, [record("p2", a, (2, 4), seq=2, state="draining")]),  # a newer record of p2 wins
        SwarmMap(b, 4, [record("q1", b, (0, 3))]),
    ]
    found = served_models(maps)
    assert set(found) == {a, b}
    assert not found[a].complete and found[a].servers == {"p1"}  # p2 drains: block 2 and 3 have no online server
    assert not found[b].complete and found[b].servers == {"q1"} and found[b].name == "org/b"
    maps.append(SwarmMap(a, 4, [record("p3", a, (2, 4))]))
    assert served_models(maps)[a].complete


def test_a_map_cannot_change_a_models_size_alone() -> None:
    a = "org/a@111111111111"
    found = served_models([SwarmMap(a, 4, [record("p1", a, (0, 4)), record("p2", a, (0, 4))]),
                           SwarmMap(a, 9, [record("liar", a, (0, 9), total=9)])])  # fmt: skip
    assert found[a].total_blocks == 4 and found[a].complete and found[a].servers == {"p1", "p2"}


@pytest.mark.slow
def test_peers_of_two_models_are_found_by_asking_them(tmp_path: Path) -> None:
    from libp2p.crypto.ed25519 import create_new_key_pair

    from shardmesh.mesh.host import running_host

    nodes = [start_node(cached_tiny_model(arch, layers=2, hidden=64), "--api", "off", api=False, key_dir=tmp_path)
             for arch in ("llama", "qwen3")]  # fmt: skip

    async def ask() -> dict:
        async with running_host(create_new_key_pair(), ["/ip4/127.0.0.1/tcp/0"]) as mesh:
            peers = [str(await mesh.connect(node.address)) for node in nodes]
            with trio.fail_after(30):
                while True:  # until each node serves (its record online in its own view)
                    found = await find_served_models(mesh, peers)
                    if len(found) == 2 and all(m.complete for m in found.values()):
                        return found
                    await trio.sleep(0.2)

    try:
        found = trio.run(ask)
    finally:
        for node in nodes:
            stop_node(node)
    assert sorted(m.name.split("-")[0] for m in found.values()) == ["llama", "qwen3"]
    assert {m.servers for m in found.values()} == {frozenset({node.peer_id}) for node in nodes}
    assert all(m.total_blocks == 2 for m in found.values())


def test_a_models_files_are_the_source_whose_identity_matches() -> None:
    from shardmesh.backends.weights import ModelSourceError, identity_bytes, resolve
    from shardmesh.mesh.record_keys import model_identity
    from shardmesh.node.model import files_of, model_name

    llama, qwen3 = (str(cached_tiny_model(arch, layers=2, hidden=64)) for arch in ("llama", "qwen3"))
    files = resolve(llama)
    wanted = model_identity(model_name(files), *identity_bytes(files))
    assert files_of(wanted, local=(qwen3, llama)).root == files.root
    other = wanted.rsplit("@", 1)[0] + "@000000000000"  # the same name, other weights
    with pytest.raises(ModelSourceError, match="is " + wanted.replace(".", r"\.")):
        files_of(other, local=(llama,))
