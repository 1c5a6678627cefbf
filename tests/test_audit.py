"""Auditing in a real swarm: a peer with other weights that claims a huge throughput.

A, B and L each serve all four blocks of the tiny Llama. L is a real node too, but its
folder holds other random weights of the very same shapes (so the same model id) and
its throughput cache was edited to claim a million times its speed: it answers every
step with wrong hidden states of the right shape, and its record says it is the
fastest server by far. Its peer id is the smallest of the three, so where claims tie
routing picks it.

G0 (``--audit-rate 0``) routes to L and returns L's garbage: the attack works without
audits. G (the default rate) shadows L's first token, finds that A and B agree and L
does not, bans L and replays the answer on a clean chain: its clients get exactly what
single-process transformers generates, from the first request on.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from node_process import Node, greedy_chat, start_node, stop_node, wait_for_route
from reference import Transformers

from shardmesh.backends.torch.throughput import default_cache_dir
from shardmesh.mesh.host import peer_id_of
from shardmesh.mesh.identity import load_or_create_identity
from shardmesh.tools.tiny_build import build_tiny_model
from shardmesh.tools.tiny_model import cached_tiny_model

MESSAGES = [{"role": "user", "content": "Tell me about foxes."}]
TOKENS = 12


def _keys(folder: Path, n: int) -> list[Path]:
    """``n`` key files, sorted by their peer ids."""
    paths = [folder / f"k{i}.key" for i in range(n)]
    return sorted(paths, key=lambda p: peer_id_of(load_or_create_identity(p)).to_base58())


def _boasting_cache(folder: Path) -> dict[str, str]:
    """An environment whose throughput cache claims a million times the honest figure."""
    honest = json.loads((default_cache_dir() / "throughput.json").read_text())
    (folder / "shardmesh").mkdir(parents=True)
    (folder / "shardmesh" / "throughput.json").write_text(json.dumps({k: v * 1e6 for k, v in honest.items()}))
    return {"XDG_CACHE_HOME": str(folder)}


@pytest.fixture(scope="module")
def swarm(tmp_path_factory) -> Iterator[dict[str, Node]]:
    model = cached_tiny_model("llama", layers=4, hidden=64)
    tmp = tmp_path_factory.mktemp("audit")
    other_weights = build_tiny_model(tmp / "liar" / model.name, "llama", layers=4, hidden=64, seed=7)
    liar_key, a_key, b_key = _keys(tmp, 3)
    nodes: dict[str, Node] = {}
    try:
        nodes["A"] = a = start_node(model, "--layers", "all", "--api", "off", "--key-file", str(a_key), api=False, key_dir=tmp)
        nodes["B"] = start_node(model, "--layers", "all", "--api", "off", "--join", a.address,
                                "--key-file", str(b_key), api=False, key_dir=tmp)  # fmt: skip
        nodes["L"] = start_node(other_weights, "--layers", "all", "--api", "off", "--join", a.address,
                                "--key-file", str(liar_key), api=False, key_dir=tmp,
                                env=_boasting_cache(tmp / "cache"))  # fmt: skip
        nodes["G"] = start_node(model, "--layers", "none", "--join", a.address, key_dir=tmp)
        nodes["G0"] = start_node(model, "--layers", "none", "--audit-rate", "0", "--join", a.address, key_dir=tmp)
        for gateway in (nodes["G"], nodes["G0"]):
            wait_for_route(gateway)
            deadline = time.monotonic() + 30
            while len(servers(gateway)) < 3:
                assert time.monotonic() < deadline, f"the gateway sees only {servers(gateway)}"
                time.sleep(0.3)
        yield nodes
    finally:
        for node in nodes.values():
            stop_node(node)
        for name, node in nodes.items():
            print(f"---- {name} ----\n{node.output()[-3000:]}")


def servers(gateway: Node) -> dict[str, float]:
    """Peer id -> claimed throughput of the servers in the gateway's view."""
    peers = httpx.get(f"{gateway.url}/v1/swarm", timeout=10).json()["peers"]
    return {p["peer"]: p["throughput"] for p in peers if not p["gateway"] and p["state"] == "online"}


def test_audits_catch_a_peer_with_other_weights(swarm: dict[str, Node]) -> None:
    g, g0, liar = swarm["G"], swarm["G0"], swarm["L"]
    claims = servers(g)
    honest_claim = claims[swarm["A"].peer_id]
    assert claims[liar.peer_id] > 1000 * honest_claim  # same model id, and it boasts
    reference = Transformers(cached_tiny_model("llama", layers=4, hidden=64))
    expected = reference.greedy(reference.chat_ids(MESSAGES), TOKENS).text

    unaudited = greedy_chat(g0, MESSAGES, max_tokens=TOKENS)
    assert unaudited != expected, "without audits the liar's answer should have come through"

    answers = [greedy_chat(g, MESSAGES, max_tokens=TOKENS) for _ in range(4)]
    print(f"\nexpected {expected!r}\nunaudited {unaudited!r}\naudited {answers}")
    assert answers == [expected] * 4
    log = g.output()
    assert f"audit: {liar.peer_id} answered differently" in log
    assert log.count("answered differently") == 1, "only the liar is ever banned"
