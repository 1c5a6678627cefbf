"""A js-libp2p peer (``interop/``, npm) against real shardmesh nodes on 127.0.0.1.

The JS peer was written from docs/PROTOCOL.md, not from our Python code, so these tests
check two things at once: that our nodes speak standard libp2p (Noise, Yamux, identify,
ping, gossipsub, Kademlia) to a second implementation, and that the protocol document
is enough to write a client (records, keys, topics, the swarm map and the inference
frames).

One node process (a tiny 4-block Llama, ``--layers all``) serves the whole module. It
is started with ``--join`` pointing at a JS peer (the *hub*), so the node dials JS; a
second JS peer (the *client*) dials the node. The DHT test builds its own small swarm
in-process whose only meeting point is a third JS peer.

The JS peer is a long-running ``node`` process driven by one JSON command per line on
stdin (see interop/peer.mjs). Its npm packages are locked in interop/package-lock.json
and installed by ``make test`` (``npm ci``); without node or the packages these tests
skip and say why.
"""

from __future__ import annotations

import dataclasses
import struct
import time
from pathlib import Path
from typing import Any, Iterator

import cbor2
import httpx
import pytest
from js_peer import JsError, JsPeer, js_skip_reason
from node_process import Node, start_node, stop_node

INFER = "/shardmesh/infer/1.0.0"
PROMPT = [1, 17, 42, 99, 7, 300]
N_TOKENS = 8  # one greedy chain
STEADY_TOKENS = 24  # enough for the session kept open through the abuse test
BLOCKS = 4


pytestmark = [pytest.mark.slow, pytest.mark.skipif(js_skip_reason() is not None, reason=js_skip_reason() or "")]


@pytest.fixture
def js_peer_factory() -> Iterator:
    peers: list[JsPeer] = []

    def make(swarm_key: Path | None = None) -> JsPeer:
        peers.append(JsPeer(swarm_key))
        return peers[-1]

    yield make
    for peer in peers:
        peer.close()


# --- the swarm under test -----------------------------------------------------------------


@pytest.fixture(scope="module")
def model_path() -> Path:
    from shardmesh.tools.tiny_model import cached_tiny_model

    return cached_tiny_model("llama", layers=BLOCKS, hidden=64)


@pytest.fixture(scope="module")
def model_id(model_path: Path) -> str:
    """The model id as PROTOCOL.md section 2 defines it, computed here independently."""
    import hashlib

    config = (model_path / "config.json").read_bytes()
    index_file = model_path / "model.safetensors.index.json"
    if index_file.exists():
        index = index_file.read_bytes()
    else:
        with open(model_path / "model.safetensors", "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            index = f.read(length)
    digest = hashlib.sha256(config + b"\0" + index).hexdigest()
    return f"{model_path.name}@{digest[:12]}"


@pytest.fixture(scope="module")
def expected(model_path: Path) -> list[int]:
    """Greedy tokens of single-process transformers (full forwards; eos does not stop it)."""
    from reference import Transformers

    return Transformers(model_path).greedy_forwards(PROMPT, STEADY_TOKENS)


@pytest.fixture(scope="module")
def hub() -> Iterator[JsPeer]:
    """The JS peer the node joins through: the node dials it."""
    peer = JsPeer()
    yield peer
    peer.close()


@pytest.fixture(scope="module")
def node(request, model_path: Path, hub: JsPeer, tmp_path_factory) -> Iterator[Node]:
    node = start_node(model_path, "--layers", "all", "--join", hub.address, key_dir=tmp_path_factory.mktemp("keys"))
    failed_before = request.session.testsfailed
    yield node
    stop_node(node)
    if request.session.testsfailed > failed_before:
        print(f"---- node output ----\n{node.output()}\n---- hub (JS) log ----\n{hub.log()}")


@pytest.fixture(scope="module")
def client(node: Node) -> Iterator[JsPeer]:
    """A JS peer that dials the node itself."""
    peer = JsPeer()
    yield peer
    peer.close()


def one_hop(node: Node) -> list[dict]:
    return [{"peer": node.peer_id, "start": 0, "end": BLOCKS}]


# --- 1. transport, identify, ping -------------------------------------------------------


STANDARD = {"/ipfs/id/1.0.0", "/ipfs/ping/1.0.0", "/ipfs/kad/1.0.0", "/meshsub/1.2.0"}
OURS = {INFER, "/shardmesh/swarm/1.0.0"}


def check_connection(info: dict, peer: str, direction: str) -> None:
    assert info["peer"] == peer
    assert info["direction"] == direction, info
    assert info["encryption"] == "/noise", info
    assert info["multiplexer"] == "/yamux/1.0.0", info


def test_js_peer_dials_a_node(node: Node, client: JsPeer) -> None:
    check_connection(client.call("dial", addr=node.address), node.peer_id, "outbound")

    ident = client.call("identify", peer=node.peer_id)
    assert ident["peer"] == node.peer_id
    assert STANDARD | OURS <= set(ident["protocols"]), ident["protocols"]
    assert node.address.split("/p2p/")[0] in ident["listen_addrs"], ident["listen_addrs"]

    rtts = client.call("ping", peer=node.peer_id, count=3)["rtts"]
    assert len(rtts) == 3 and all(0 <= ms < 1000 for ms in rtts), rtts


def test_a_node_dials_the_js_peer(node: Node, hub: JsPeer, model_id: str) -> None:
    """The node was started with ``--join <hub>``: the connection is the node's dial."""
    check_connection(hub.call("connection", peer=node.peer_id), node.peer_id, "inbound")
    ident = hub.call("identify", peer=node.peer_id)
    assert STANDARD | OURS <= set(ident["protocols"]), ident["protocols"]
    assert len(hub.call("ping", peer=node.peer_id)["rtts"]) == 3

    # The node pings the peers in its view that serve blocks and publishes the RTTs in
    # its own record. The hub announces a record (signed in JS; `draining`, so nobody
    # routes to it): the node must accept it, ping the hub over its own connection and
    # show the measured RTT.
    hub.call("announce", model=model_id, start=0, end=1, total_blocks=BLOCKS)

    def view() -> dict:
        return httpx.get(f"{node.url}/v1/swarm", timeout=5).json()

    def own_record_with_hub_rtt():
        peers = {p["peer"]: p for p in view()["peers"]}
        mine = peers.get(node.peer_id, {})
        return peers if hub.peer_id in mine.get("rtt_ms", {}) else None

    peers = hub.poll("the node's record shows an RTT to the hub", own_record_with_hub_rtt, 30)
    assert peers[hub.peer_id]["state"] == "draining" and peers[hub.peer_id]["span"] == [0, 1]
    assert 0 < peers[node.peer_id]["rtt_ms"][hub.peer_id] < 1000


# --- 2. records over gossip, checked in JS ------------------------------------------------


def test_js_peer_learns_the_model_and_verifies_gossiped_records(node: Node, hub: JsPeer, model_id: str) -> None:
    swarm = hub.call("swarm_map", peer=node.peer_id)
    assert swarm["model"] == model_id and swarm["total_blocks"] == BLOCKS
    assert swarm["dropped"] == []
    assert node.peer_id in {r["peer"] for r in swarm["records"]}

    topic = hub.call("keys", model=model_id, peer=node.peer_id)["topic"]
    hub.call("subscribe", topic=topic)

    def from_node() -> list[dict] | None:
        """The node's messages, once one shows its blocks (the record it starts with, from
        before it has loaded them, has an empty span and may arrive first)."""
        messages = [m for m in hub.call("received", topic=topic)["messages"] if m["from"] == node.peer_id]
        return messages if any(m.get("record", {}).get("end") == BLOCKS for m in messages) else None

    messages = hub.poll("a record of the node's blocks on gossip", from_node, 30)
    assert all("record" in m for m in messages), f"the JS verifier refused a node's record: {messages}"
    record = [m["record"] for m in messages if m["record"]["end"] == BLOCKS][-1]
    assert record["peer"] == node.peer_id and record["model"] == model_id
    assert (record["start"], record["end"], record["total_blocks"]) == (0, BLOCKS, BLOCKS)
    assert record["state"] == "online" and record["throughput"] > 0
    assert node.address in record["addrs"]


def test_the_js_verifier_refuses_what_ours_refuses(hub: JsPeer) -> None:
    """The JS verifier is the proof in the gossip test: show that it can say no."""
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.id import ID

    from shardmesh.mesh.records import NodeRecord, expires_at, sign_record

    key, other = create_new_key_pair(), create_new_key_pair()
    peer = ID.from_pubkey(key.public_key).to_base58()
    record = NodeRecord(
        peer=peer, addrs=(f"/ip4/127.0.0.1/tcp/4001/p2p/{peer}",), model="m@0123456789ab", start=0, end=2,
        total_blocks=4, state="online", throughput=3.5, cache_tokens_free=10, backend="torch", device="cpu",
        dtype="float32", rtt={"x": 1.25}, version="t", seq=7, expires=expires_at(), limits={"max_tokens_per_step": 2},
    )

    def verify(envelope: bytes, **expect) -> dict:
        return hub.call("verify", envelope_hex=envelope.hex(), **expect)

    good = verify(sign_record(record, key), expected_peer=peer)
    assert good["valid"] and good["record"]["seq"] == 7 and good["record"]["rtt"] == {"x": 1.25}

    envelope = cbor2.loads(sign_record(record, key))
    bad_sig = bytes([envelope["sig"][0] ^ 1]) + envelope["sig"][1:]
    assert verify(cbor2.dumps({**envelope, "sig": bad_sig})) == {"valid": False, "reason": "bad-signature"}
    assert verify(sign_record(record, other)) == {"valid": False, "reason": "bad-signature"}  # claims `peer`
    stale = dataclasses.replace(record, expires=time.time() - 1)
    assert verify(sign_record(stale, key)) == {"valid": False, "reason": "expired"}
    assert verify(sign_record(record, key), expected_model="x@1") == {"valid": False, "reason": "wrong-model"}
    assert verify(cbor2.dumps({"body": envelope["body"]})) == {"valid": False, "reason": "unsigned"}

    # Every bound of section 3.2, at the bound (valid) and one past it (malformed), on a
    # body signed by the right key so that only the bound can be the reason.
    from shardmesh.mesh.records import SIGNING_PREFIX

    def signed(**fields: Any) -> bytes:
        body = cbor2.loads(envelope["body"])
        body.update(fields)
        raw = cbor2.dumps(body)
        return cbor2.dumps({"body": raw, "sig": key.private_key.sign(SIGNING_PREFIX + raw)})

    def reason(**fields: Any) -> str:
        answer = verify(signed(**fields))
        return "valid" if answer["valid"] else answer["reason"]

    own = f"/p2p/{peer}"
    cases = [
        ({"rtt": {f"p{i}": 1.0 for i in range(32)}}, {"rtt": {f"p{i}": 1.0 for i in range(33)}}),
        ({"rtt": {"p": 60000}}, {"rtt": {"p": 60001}}),
        ({"limits": {"a": 1}}, {"limits": {"a": 0}}),
        ({"limits": {"a": 2**31 - 1}}, {"limits": {"a": 2**31}}),
        ({"limits": {f"l{i}": 1 for i in range(16)}}, {"limits": {f"l{i}": 1 for i in range(17)}}),
        ({"addrs": [f"/ip4/10.0.0.{i}/tcp/1{own}" for i in range(16)]}, {"addrs": [f"/ip4/10.0.0.{i}/tcp/1{own}" for i in range(17)]}),
        ({"addrs": [f"/ip4/10.0.0.1/tcp/1{own}"]}, {"addrs": ["/ip4/10.0.0.1/tcp/1/p2p/12D3KooWsomeoneelse"]}),
        ({"version": "v" * 256}, {"version": "v" * 257}),
        ({"device": "é" * 128}, {"device": "é" * 129}),
    ]
    for at_bound, past_it in cases:
        assert (reason(**at_bound), reason(**past_it)) == ("valid", "malformed"), (at_bound, past_it)


# --- 3. the DHT ------------------------------------------------------------------------------


def test_js_peer_computes_our_keys(hub: JsPeer, model_id: str) -> None:
    from shardmesh.mesh.records import block_key, record_key
    from shardmesh.mesh.registry import records_topic

    peer = "12D3KooWQ6xSUo4ScnVjm6xFVjp65uCs8MeQ13s8X5vdbTS22nkS"
    keys = hub.call("keys", model=model_id, peer=peer, blocks=list(range(BLOCKS)))
    assert keys["topic"] == records_topic(model_id)
    assert keys["record_key"] == record_key(model_id, peer)
    assert keys["block_cids"] == [block_key(model_id, b) for b in range(BLOCKS)]


def test_js_peer_finds_providers_and_records_through_the_dht(node: Node, client: JsPeer, model_id: str) -> None:
    client.call("dial", addr=node.address)
    for block in range(BLOCKS):

        def providers() -> list[str]:
            found = client.call("find_providers", model=model_id, block=block, expect=node.peer_id)["providers"]
            return found if node.peer_id in found else []

        client.poll(f"the node among the providers of block {block}", providers, 30)

    def record() -> dict | None:
        try:
            return client.call("get_record", model=model_id, peer=node.peer_id)["record"]
        except JsError:
            return None

    got = client.poll("the node's record from the DHT", record, 30)
    assert got["peer"] == node.peer_id and got["model"] == model_id
    assert (got["start"], got["end"], got["state"]) == (0, BLOCKS, "online")


def test_our_nodes_store_and_find_records_through_a_js_dht_server(js_peer_factory) -> None:
    """A serves blocks [0, 2) and joins only via the JS peer, stores its record and
    provider entries there, and stops. B joins only via the JS peer, which does not
    subscribe to the model's gossip: whatever B learns of A came out of the JS peer's
    DHT store."""
    import trio
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.id import ID

    from shardmesh.mesh.host import running_host
    from shardmesh.mesh.records import NodeRecord, block_key_multihash, record_key, verify_record
    from shardmesh.mesh.registry import Registry

    relay = js_peer_factory()
    model = "tiny@0123456789ab"

    def record_of(host, start: int, end: int) -> NodeRecord:
        return NodeRecord(
            peer=host.peer_id_str, addrs=tuple(host.dialable_addrs()), model=model, start=start, end=end,
            total_blocks=BLOCKS, state="online", throughput=50.0, cache_tokens_free=2048, backend="torch",
            device="cpu", dtype="float32", rtt={}, version="test", seq=0, expires=0.0,
        )

    async def eventually(condition, timeout: float, what: str) -> None:
        with trio.move_on_after(timeout):
            while not condition():
                await trio.sleep(0.05)
            return
        raise AssertionError(f"not within {timeout} s: {what}\n{relay.log()}")

    async def held_by_relay(a: Registry, a_peer: str, timeout: float = 30.0) -> None:
        """Wait until the JS peer itself answers GET_VALUE with A's record and GET_PROVIDERS
        with A for blocks 0 and 1: asked directly (py-libp2p's per-peer calls, private),
        because a lookup would also find them at A. A's first put may have gone out before
        A's DHT knew the JS peer; its next one comes within a third of the TTL."""
        relay_id = ID.from_base58(relay.peer_id)
        key = record_key(model, a_peer).encode()
        with trio.move_on_after(timeout):
            while True:
                with trio.move_on_after(5):
                    value = await a.dht.value_store._get_from_peer(relay_id, key)
                    providers = [
                        {p.peer_id.to_base58() for p in
                         (await a.dht.provider_store._get_providers_from_peer_with_closers(relay_id, block_key_multihash(model, b)))[0]}
                        for b in (0, 1)
                    ]
                    if value is not None and verify_record(value).peer == a_peer and all(a_peer in p for p in providers):
                        return
                await trio.sleep(0.2)
        raise AssertionError(f"the JS peer does not hold A's record and provider entries after {timeout} s\n{relay.log()}")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            async with running_host(create_new_key_pair(), ["/ip4/127.0.0.1/tcp/0"]) as a_host:
                a = Registry(a_host, model, record_of(a_host, 0, 2), publish_interval=1.0)
                await a_host.connect(relay.address)
                a_scope = trio.CancelScope()

                async def run_a(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
                    with a_scope:
                        await a.run(task_status=task_status)

                await nursery.start(run_a)
                a_peer = a_host.peer_id_str
                await held_by_relay(a, a_peer)
                a_scope.cancel()
            # A is gone: its record and provider entries live on in the JS peer only.

            async with running_host(create_new_key_pair(), ["/ip4/127.0.0.1/tcp/0"]) as b_host:
                b = Registry(b_host, model, record_of(b_host, 2, 4), publish_interval=1.0)
                await b_host.connect(relay.address)
                await nursery.start(b.run)
                await eventually(lambda: b.dht.get_routing_table_size() >= 1, 10, "B adopted the JS peer")
                assert b.get(a_peer) is None, "B must not know A before asking the DHT"
                for block in (0, 1):
                    found = await b.lookup_block(block)
                    assert [r.peer for r in found] == [a_peer], f"block {block}: {found}"
                    assert found[0].span == (0, 2)
                assert b.stats.dht_records_fetched >= 1
                assert {r.peer for r in await b.lookup_block(3)} == {b_host.peer_id_str}
                nursery.cancel_scope.cancel()

    trio.run(main)


# --- 4. inference: a greedy chain, then abuse ---------------------------------------------


def test_js_peer_runs_a_greedy_chain_equal_to_transformers(node: Node, client: JsPeer, model_id: str, expected) -> None:
    client.call("dial", addr=node.address)
    got = client.call("generate", session="js-greedy", model=model_id, route=one_hop(node),
                      prompt=PROMPT, n=N_TOKENS, max_length=64, timeout=60)["tokens"]
    assert got == expected[:N_TOKENS]


def open_header(node: Node, client: JsPeer, model_id: str, **overrides) -> dict:
    header = {"t": "open", "session": "evil", "model": model_id, "gateway": client.peer_id,
              "route": one_hop(node), "max_length": 64, "sampling": {"temperature": 0}, "n_prompt": 0}
    return {**header, **overrides}


def step_header(session: str, dtype: str = "int64", shape: list[int] = (1,)) -> dict:
    return {"t": "step", "session": session, "position": 0, "want": False, "dtype": dtype, "shape": list(shape)}


def cbor_head(header: Any) -> str:
    head = cbor2.dumps(header)
    return (struct.pack(">I", len(head)) + head).hex()


def test_abuse_gets_error_frames_and_the_node_keeps_serving(node: Node, client: JsPeer, model_id: str, expected) -> None:
    """Mirrors tests/test_hop_server.py over a js-libp2p connection. A good session stays
    open throughout, and a whole greedy chain runs again at the end."""
    client.call("dial", addr=node.address)
    client.call("chain_open", session="steady", model=model_id, route=one_hop(node), prompt=PROMPT, max_length=64)
    steady = [client.call("chain_step", session="steady", ids=PROMPT, position=0)["token"]]

    def next_steady_token() -> None:
        position = len(PROMPT) + len(steady) - 1
        steady.append(client.call("chain_step", session="steady", ids=[steady[-1]], position=position)["token"])

    def attack(*actions: dict) -> list[dict]:
        return client.call("raw", peer=node.peer_id, actions=list(actions), timeout=15)["outcomes"]

    def refused(outcomes: list[dict], code: str) -> None:
        """An error frame with ``code``, then the stream ends (reset, or closed after a session error)."""
        assert "frame" in outcomes[0], outcomes
        header = outcomes[0]["frame"]["header"]
        assert header["t"] == "error" and header["code"] == code, header
        assert header["peer"] == node.peer_id and header["message"], header
        assert outcomes[-1].get("end") in ("reset", "eof"), outcomes

    read_to_end = {"read_until_end": True}
    cases = {
        "header length beyond the limit": ([{"send_hex": (struct.pack(">I", 1 << 30) + b"x" * 16).hex()}, read_to_end], "too_large"),
        "header not CBOR": ([{"send_hex": "00000003fffefd"}, read_to_end], "bad_frame"),
        "header not a map": ([{"send_hex": cbor_head([1, 2, 3])}, read_to_end], "bad_frame"),
        "unknown frame type": ([{"send_hex": cbor_head({"t": "bogus"})}, read_to_end], "bad_frame"),
        "step without a session": ([{"send_frame": step_header("steady"), "payload_hex": "00" * 8}, read_to_end], "bad_frame"),
        "payload of 2^40 bytes announced": ([{"send_hex": cbor_head({**open_header(node, client, model_id), "nbytes": 1 << 40})}, read_to_end], "too_large"),
        "attach to no session": ([{"send_frame": {"t": "attach", "session": "nobody"}}, read_to_end], "unknown_session"),
        "second attach to a live session": ([{"send_frame": {"t": "attach", "session": "steady"}}, read_to_end], "forbidden"),
        "another model": ([{"sign_ticket": True, "send_frame": open_header(node, client, model_id, model="other@123")}, read_to_end], "wrong_model"),
        "a route not through this node": ([{"sign_ticket": True, "send_frame": open_header(node, client, model_id, route=[{"peer": client.peer_id, "start": 0, "end": BLOCKS}])}, read_to_end], "bad_route"),
        "a session id already open": ([{"sign_ticket": True, "send_frame": open_header(node, client, model_id, session="steady")}, read_to_end], "bad_input"),
        "unknown sampling parameter": ([{"sign_ticket": True, "send_frame": open_header(node, client, model_id, sampling={"temprature": 0})}, read_to_end], "bad_input"),
    }
    for name, (actions, code) in cases.items():
        try:
            refused(attack(*actions), code)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from None
        next_steady_token()

    in_session = {
        # 4,096 tokens announced: refused from the header, the payload is never sent.
        "more tokens than a step may carry": ({"send_frame": {**step_header("s", shape=[4096]), "nbytes": 4096 * 8}}, "too_large"),
        "hidden states into the first block": ({"send_frame": step_header("s", "float32", [2, 64]), "payload_hex": "01" * 512}, "bad_input"),
        "payload smaller than its shape": ({"send_frame": step_header("s", shape=[3]), "payload_hex": "01" * 8}, "bad_input"),
        "three dimensions": ({"send_frame": step_header("s", shape=[2, 2, 2]), "payload_hex": "01" * 64}, "bad_input"),
        "unknown dtype": ({"send_frame": step_header("s", "complex", [1]), "payload_hex": "01" * 8}, "bad_input"),
        "a token id outside the vocabulary": ({"send_frame": step_header("s"), "payload_hex": struct.pack("<q", 10**9).hex()}, "bad_input"),
    }
    for i, (name, (bad_step, code)) in enumerate(in_session.items()):
        bad_step["send_frame"]["session"] = f"s{i}"
        outcomes = attack({"sign_ticket": True, "send_frame": open_header(node, client, model_id, session=f"s{i}")}, {"read": True}, bad_step, read_to_end)
        try:
            assert outcomes[0]["frame"]["header"].get("ok") is True, outcomes
            refused(outcomes[1:], code)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from None
        next_steady_token()

    # A frame cut short, then our end of stream: only the length prefix tells the node
    # that this is a truncated frame and not a clean close.
    refused(attack({"send_hex": cbor_head(open_header(node, client, model_id))[:14]}, {"close_write": True}, read_to_end), "truncated")
    next_steady_token()

    assert steady == expected[: len(steady)]
    # `close`, then our end of stream: the node ends the session and closes both its streams.
    assert client.call("chain_close", session="steady")["ends"] == {"first": "eof", "last": "eof"}
    again = client.call("generate", session="js-again", model=model_id, route=one_hop(node),
                        prompt=PROMPT, n=N_TOKENS, max_length=64, timeout=60)["tokens"]
    assert again == expected[:N_TOKENS]


# --- 5. a private swarm: the pnet key exchange -------------------------------------------


def test_js_peer_with_the_swarm_key_chains_and_one_without_cannot_connect(
    js_peer_factory, model_path: Path, model_id: str, expected, tmp_path_factory
) -> None:
    """The same key file admits @libp2p/pnet and our XSalsa20 both ways; no key, no connection."""
    from shardmesh.mesh.swarm_key import write_new_swarm_key

    keys = tmp_path_factory.mktemp("pnet")
    write_new_swarm_key(keys / "swarm.key")
    hub = js_peer_factory(keys / "swarm.key")
    node = start_node(model_path, "--layers", "all", "--join", hub.address, "--swarm-key", str(keys / "swarm.key"),
                      key_dir=keys)  # fmt: skip
    try:
        # The node dialled the keyed JS hub (it joined through it) ...
        def joined() -> dict | None:
            try:
                return hub.call("connection", peer=node.peer_id)
            except JsError:
                return None

        check_connection(hub.poll("the node connected to the JS hub", joined, 30), node.peer_id, "inbound")
        # ... a keyed JS client dials the node and runs a greedy chain ...
        client = js_peer_factory(keys / "swarm.key")
        client.call("dial", addr=node.address)
        got = client.call("generate", session="pnet-greedy", model=model_id, route=one_hop(node),
                          prompt=PROMPT, n=N_TOKENS, max_length=64, timeout=60)["tokens"]  # fmt: skip
        assert got == expected[:N_TOKENS]
        # ... and a JS peer without the key cannot even connect.
        stranger = js_peer_factory()
        with pytest.raises(JsError):
            stranger.call("dial", addr=node.address, timeout=10)
    finally:
        stop_node(node)
