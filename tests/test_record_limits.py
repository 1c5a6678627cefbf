"""The bounds of docs/PROTOCOL.md section 3.2, each enforced exactly, and who refuses what.

Every bound is tested at the bound (accepted) and one past it (refused), on a hand-made
envelope signed by the right key, so that only the bound can be the reason. Then: the
swarm view refuses a record whose ``total_blocks`` disagrees with ours, and a DHT node
refuses records of another model and drops stored ones at their expiry (real hosts).
"""

from __future__ import annotations

import dataclasses
import time

import cbor2
import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from shardmesh.mesh.host import running_host
from shardmesh.mesh.records import (
    MAX_ADDRS,
    MAX_LIMIT_VALUE,
    MAX_LIMITS,
    MAX_RTT_ENTRIES,
    MAX_RTT_MS,
    MAX_TEXT_BYTES,
    SIGNING_PREFIX,
    NodeRecord,
    RecordError,
    expires_at,
    record_key,
    sign_record,
    verify_record,
)
from shardmesh.mesh.registry import Registry
from shardmesh.mesh.swarm_view import SwarmView

MODEL = "tiny@0123456789ab"
OTHER_MODEL = "other@ba9876543210"
LOCAL = ["/ip4/127.0.0.1/tcp/0"]


def peer_of(key_pair) -> str:
    return ID.from_pubkey(key_pair.public_key).to_base58()


def make_record(key_pair, **changes) -> NodeRecord:
    peer = peer_of(key_pair)
    record = NodeRecord(
        peer=peer, addrs=(f"/ip4/127.0.0.1/tcp/4001/p2p/{peer}",), model=MODEL, start=0, end=4, total_blocks=12,
        state="online", throughput=10.0, cache_tokens_free=1024, backend="torch", device="cpu", dtype="float32",
        rtt={"12D3KooWother": 1.5}, version="0.1.0", seq=1, expires=expires_at(),
        limits={"max_tokens_per_step": 512, "max_sessions_per_peer": 8},
    )  # fmt: skip
    return dataclasses.replace(record, **changes)


@pytest.fixture
def key():
    return create_new_key_pair()


def signed_body(key_pair, **fields) -> bytes:
    """A good record's body with ``fields`` replaced, signed by its own peer: only they can be wrong."""
    body = cbor2.loads(cbor2.loads(sign_record(make_record(key_pair), key_pair))["body"])
    body.update(fields)
    raw = cbor2.dumps(body)
    return cbor2.dumps({"body": raw, "sig": key_pair.private_key.sign(SIGNING_PREFIX + raw)})


def accepted(key_pair, **fields) -> bool:
    try:
        verify_record(signed_body(key_pair, **fields))
        return True
    except RecordError as exc:
        assert exc.reason == RecordError.MALFORMED, exc
        return False


def test_rtt_entry_count(key) -> None:
    assert accepted(key, rtt={f"peer{i}": 1.0 for i in range(MAX_RTT_ENTRIES)})
    assert not accepted(key, rtt={f"peer{i}": 1.0 for i in range(MAX_RTT_ENTRIES + 1)})
    assert not accepted(key, rtt={f"peer{i}": 1.0 for i in range(600)})


def test_rtt_values_and_keys(key) -> None:
    assert accepted(key, rtt={"p": 0.0, "q": MAX_RTT_MS})
    assert not accepted(key, rtt={"p": MAX_RTT_MS + 0.001})
    assert not accepted(key, rtt={"p": -1.0})
    assert not accepted(key, rtt={"p": True})
    assert accepted(key, rtt={"p" * MAX_TEXT_BYTES: 1.0})
    assert not accepted(key, rtt={"p" * (MAX_TEXT_BYTES + 1): 1.0})


def test_limits_positive_and_bounded(key) -> None:
    assert accepted(key, limits={"max_tokens_per_step": 1, "max_sessions_per_peer": MAX_LIMIT_VALUE})
    assert not accepted(key, limits={"max_tokens_per_step": 0})
    assert not accepted(key, limits={"max_tokens_per_step": -5})
    assert not accepted(key, limits={"max_tokens_per_step": MAX_LIMIT_VALUE + 1})
    assert accepted(key, limits={f"l{i}": 1 for i in range(MAX_LIMITS)})
    assert not accepted(key, limits={f"l{i}": 1 for i in range(MAX_LIMITS + 1)})
    # our own node finds out at home, not from silent peers
    with pytest.raises(RecordError):
        sign_record(make_record(key, limits={"max_tokens_per_step": 0}), key)


def test_addrs_count_length_and_peer(key) -> None:
    peer = peer_of(key)
    addr = f"/ip4/10.0.0.1/tcp/4001/p2p/{peer}"
    assert accepted(key, addrs=[addr] * MAX_ADDRS)
    assert not accepted(key, addrs=[addr] * (MAX_ADDRS + 1))
    at_bound = "/dns4/" + "a" * (MAX_TEXT_BYTES - len(f"/dns4//p2p/{peer}")) + f"/p2p/{peer}"
    assert len(at_bound) == MAX_TEXT_BYTES and accepted(key, addrs=[at_bound])
    assert not accepted(key, addrs=["/dns4/a" + at_bound[len("/dns4/") :]])
    assert not accepted(key, addrs=["/ip4/10.0.0.1/tcp/4001"])  # must end in /p2p/<peer>
    assert not accepted(key, addrs=[f"/ip4/10.0.0.1/tcp/4001/p2p/{peer_of(create_new_key_pair())}"])


@pytest.mark.parametrize("name", ["model", "backend", "device", "dtype", "version", "api", "state"])
def test_text_fields_are_short(key, name: str) -> None:
    long = "x" * (MAX_TEXT_BYTES + 1)
    assert not accepted(key, **{name: long})
    assert not accepted(key, **{name: "é" * (MAX_TEXT_BYTES // 2 + 1)})  # UTF-8 bytes count, not characters
    if name != "state":
        assert accepted(key, **{name: "x" * MAX_TEXT_BYTES})


def test_swarm_view_refuses_a_different_block_count(key) -> None:
    view = SwarmView(MODEL, None, total_blocks=12)
    liar = make_record(key, total_blocks=24, start=0, end=24)
    assert not view.merge(liar, sign_record(liar, key))
    assert view.records() == []
    honest = make_record(key, seq=2)
    assert view.merge(honest, sign_record(honest, key))
    assert [r.peer for r in view.records()] == [honest.peer]


def test_dht_refuses_other_models_and_drops_expired_records() -> None:
    """A peer that skips its own validator puts straight into the victim's store."""
    from libp2p.records.record import make_signed_put_record

    async def eventually(condition, what: str) -> None:
        with trio.fail_after(20):
            while not condition():
                await trio.sleep(0.05)
        print(f"ok: {what}")

    async def main() -> None:
        async with running_host(create_new_key_pair(), LOCAL) as v_host, running_host(
            create_new_key_pair(), LOCAL
        ) as m_host:
            local = make_record(v_host.key_pair, addrs=(), seq=0, expires=0.0)
            victim = Registry(v_host, MODEL, local, ttl=3.0, publish_interval=1.0)
            attacker = Registry(m_host, MODEL, None, ttl=3.0, publish_interval=1.0)
            async with trio.open_nursery() as nursery:
                await nursery.start(victim.run)
                await nursery.start(attacker.run)
                await m_host.connect(v_host.dialable_addrs()[0])
                await eventually(lambda: attacker.dht.get_routing_table_size() >= 1, "attacker knows the victim")
                store = victim.dht.value_store
                signer = m_host.key_pair

                async def put(record: NodeRecord) -> tuple[bool, bytes]:
                    key = record_key(record.model, record.peer).encode()
                    value = sign_record(record, signer)
                    put_record = make_signed_put_record(key, value, signer.private_key)
                    ok = await attacker.dht.value_store._store_at_peer(v_host.peer_id, key, value, record=put_record)
                    return ok, key

                mine = dataclasses.replace(make_record(signer), addrs=())
                ok, key = await put(dataclasses.replace(mine, model=OTHER_MODEL))
                assert ok is False and store.get(key) is None, "a record of another model was stored"
                ok, key = await put(dataclasses.replace(mine, expires=time.time() - 1))
                assert ok is False and store.get(key) is None, "an expired record was stored"

                # A good record is stored, and gone from the store once it expires (not 24 h later).
                ok, key = await put(dataclasses.replace(mine, expires=time.time() + 1.0))
                assert ok is True and store.get(key) is not None
                await eventually(lambda: key not in store.store, "the record left the store at its expiry")
                assert store.get(key) is None
                assert victim.view.total_blocks == 12  # the registry hands the view our block count
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_node_with_many_interfaces_publishes_at_most_max_addrs() -> None:
    """More listen addresses than a record may hold (container bridges, many IPv6
    addresses) must not make our own record unsignable: loopback goes first, then the
    excess, and what is left signs."""
    from multiaddr import Multiaddr

    from shardmesh.mesh.host import MeshHost
    from shardmesh.mesh.record_checks import MAX_ADDRS

    class ManyInterfaces:  # what dialable_addrs reads of a host: its listen addresses
        def addrs(self) -> list[Multiaddr]:
            peer = "12D3KooWCj1i9oMUkt3kodtXXJGwsd7zvSQAvg8hDj4NZ3gBKQy9"
            lan = [Multiaddr(f"/ip4/10.0.0.{i}/tcp/4001/p2p/{peer}") for i in range(MAX_ADDRS + 4)]
            return [Multiaddr(f"/ip4/127.0.0.1/tcp/4001/p2p/{peer}"), *lan]

    addrs = MeshHost.dialable_addrs(ManyInterfaces())  # type: ignore[arg-type]
    assert len(addrs) == MAX_ADDRS
    assert not any(a.startswith("/ip4/127.") for a in addrs)
    assert addrs[0].startswith("/ip4/10.0.0.0/")


def test_the_dht_store_refuses_new_keys_once_full(key) -> None:
    """An identity is free, so the store of /shardmesh/ values has a fixed size: past it a
    new key is refused (the validator raises, py-libp2p stores nothing); known keys still
    refresh."""
    from shardmesh.mesh.dht_values import ExpiringValues, RecordValidator

    values = ExpiringValues(max_tracked=2)
    validator = RecordValidator(MODEL, values.track)
    keys = [create_new_key_pair() for _ in range(3)]
    envelopes = [sign_record(make_record(k), k) for k in keys]
    names = [record_key(MODEL, peer_of(k)) for k in keys]
    validator.validate(names[0], envelopes[0])
    validator.validate(names[1], envelopes[1])
    with pytest.raises(RecordError) as refused:
        validator.validate(names[2], envelopes[2])
    assert refused.value.reason == RecordError.NO_ROOM
    validator.validate(names[0], sign_record(make_record(keys[0], seq=2), keys[0]))
