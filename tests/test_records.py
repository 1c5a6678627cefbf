"""NodeRecord signing and verification: what a peer must refuse to believe.

Every rejection test starts from a record that verifies, changes one thing, and checks
that verification now fails *for that reason*: a check that rejected everything would
fail the round-trip test, and one that rejected nothing would fail the others.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time

import cbor2
import pytest
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from shardmesh.mesh.record_keys import block_key, block_key_multihash, model_identity, record_key
from shardmesh.mesh.records import (
    MAX_RECORD_BYTES,
    MAX_RTT_ENTRIES,
    RECORD_TTL,
    SIGNING_PREFIX,
    NodeRecord,
    RecordError,
    content_of,
    record_ttl,
    sign_record,
    verify_record,
)

MODEL = "tiny@0123456789ab"
NOW = 1_700_000_000.0


def peer_of(key_pair) -> str:
    return ID.from_pubkey(key_pair.public_key).to_base58()


def make_record(key_pair, **changes) -> NodeRecord:
    peer = peer_of(key_pair)
    record = NodeRecord(
        peer=peer,
        addrs=(f"/ip4/127.0.0.1/tcp/4001/p2p/{peer}",),
        model=MODEL,
        start=4,
        end=8,
        total_blocks=12,
        state="online",
        throughput=123.5,
        cache_tokens_free=4096,
        backend="torch",
        device="cpu",
        dtype="bfloat16",
        rtt={"12D3KooWother": 1.5},
        version="0.1.0",
        seq=7,
        expires=NOW + RECORD_TTL,
        api="http://127.0.0.1:8000",
        limits={"max_tokens_per_step": 512, "max_sessions_per_peer": 8},
    )
    return dataclasses.replace(record, **changes)


def reason_of(data: bytes, **kwargs) -> str:
    kwargs.setdefault("now", NOW)
    with pytest.raises(RecordError) as info:
        verify_record(data, **kwargs)
    return info.value.reason


def envelope(body: dict | bytes, key_pair=None, sig: bytes | None = None) -> bytes:
    """A hand-made envelope: body as given, signed by ``key_pair`` unless ``sig`` is given."""
    body_bytes = body if isinstance(body, bytes) else cbor2.dumps(body)
    if sig is None and key_pair is not None:
        sig = key_pair.private_key.sign(SIGNING_PREFIX + body_bytes)
    env = {"body": body_bytes}
    if sig is not None:
        env["sig"] = sig
    return cbor2.dumps(env)


@pytest.fixture
def key():
    return create_new_key_pair()


def test_round_trip(key) -> None:
    record = make_record(key)
    data = sign_record(record, key)
    assert len(data) < 1024
    back = verify_record(data, now=NOW, expected_peer=record.peer, expected_model=MODEL)
    assert back == record
    assert back.addrs == record.addrs and isinstance(back.addrs, tuple)
    assert back.limits["max_tokens_per_step"] == 512
    assert back.serves(4) and back.serves(7) and not back.serves(8)
    assert record_ttl(back, now=NOW) == RECORD_TTL


def test_gateway_only_record_round_trips(key) -> None:
    record = make_record(key, start=0, end=0, api=None, limits={})
    back = verify_record(sign_record(record, key), now=NOW)
    assert back == record and not back.serves_blocks and back.api is None


def test_rtt_keeps_only_the_nearest_peers(key) -> None:
    rtt = {f"peer{i:03d}": float(100 - i) for i in range(100)}
    back = verify_record(sign_record(make_record(key, rtt=rtt), key), now=NOW)
    assert len(back.rtt) == MAX_RTT_ENTRIES
    assert max(back.rtt.values()) == MAX_RTT_ENTRIES  # the 32 smallest: 1..32 ms
    assert set(back.rtt) == {f"peer{i:03d}" for i in range(100 - MAX_RTT_ENTRIES, 100)}


def test_another_key_cannot_sign_for_a_peer(key) -> None:
    """Y signs a record that claims to be X: the signature must come from X's peer id."""
    forger = create_new_key_pair()
    forged = sign_record(make_record(key), forger)  # claims key's peer, signed by forger
    assert reason_of(forged) == RecordError.BAD_SIGNATURE
    # the forger's own record, signed by itself, is fine: the check is about the claim
    verify_record(sign_record(make_record(forger), forger), now=NOW)


def test_expired(key) -> None:
    data = sign_record(make_record(key, expires=NOW - 0.5), key)
    assert reason_of(data) == RecordError.EXPIRED
    assert verify_record(data, now=NOW - 1.0).seq == 7  # the same bytes, a second earlier


def test_expiry_too_far_in_the_future(key) -> None:
    """A record "valid for a year" would outlive its node: refused, though correctly signed."""
    data = sign_record(make_record(key, expires=NOW + 365 * 86400), key)
    assert reason_of(data) == RecordError.EXPIRY_TOO_FAR
    verify_record(sign_record(make_record(key, expires=NOW + 590), key), now=NOW)


def test_oversized_is_refused_before_decoding(key) -> None:
    # Not even valid CBOR: if it were decoded first, the reason would be "malformed".
    assert reason_of(b"\xff" * (MAX_RECORD_BYTES + 1)) == RecordError.OVERSIZED
    big = make_record(key, addrs=tuple(f"/ip4/10.0.0.{i % 250}/tcp/{i}" for i in range(1000)))
    with pytest.raises(RecordError) as info:
        sign_record(big, key)  # we refuse to produce what others would drop
    assert info.value.reason == RecordError.OVERSIZED


def test_tampered_body(key) -> None:
    data = sign_record(make_record(key, state="online"), key)
    env = cbor2.loads(data)
    body = cbor2.loads(env["body"])
    body["state"] = "draining"  # a well-formed change the signer never made
    assert reason_of(envelope(body, sig=env["sig"])) == RecordError.BAD_SIGNATURE
    flipped = bytearray(env["sig"])
    flipped[0] ^= 1
    assert reason_of(envelope(env["body"], sig=bytes(flipped))) == RecordError.BAD_SIGNATURE


@pytest.mark.parametrize(
    "data",
    [b"", b"garbage", b"\x00" * 40, cbor2.dumps([1, 2, 3]), cbor2.dumps({"body": "text", "sig": b"x"}), b"\x81" * 5000],
)
def test_garbage(data: bytes) -> None:
    assert reason_of(data) == RecordError.MALFORMED


def test_not_bytes() -> None:
    assert reason_of("a string") == RecordError.MALFORMED  # type: ignore[arg-type]


def test_missing_signature(key) -> None:
    body = cbor2.loads(cbor2.loads(sign_record(make_record(key), key))["body"])
    assert reason_of(envelope(body)) == RecordError.UNSIGNED


@pytest.mark.parametrize(
    "field, value",
    [
        ("seq", None),  # missing
        ("seq", "7"),
        ("seq", True),  # a bool is an int in Python, not in a record
        ("start", 4.0),
        ("throughput", "fast"),
        ("throughput", float("nan")),
        ("addrs", "/ip4/127.0.0.1/tcp/1"),
        ("addrs", [1, 2]),
        ("rtt", {"p": "1ms"}),
        ("limits", {"max_tokens_per_step": 1.5}),
        ("api", 5),
        ("peer", 5),
        ("reach", "everywhere"),
        ("reach", 1),
    ],
)
def test_wrongly_typed_or_missing_fields(key, field: str, value) -> None:
    body = cbor2.loads(cbor2.loads(sign_record(make_record(key), key))["body"])
    if value is None:
        del body[field]
    else:
        body[field] = value
    # correctly signed, so only the shape check can reject it
    assert reason_of(envelope(body, key)) == RecordError.MALFORMED


def test_reach_travels_and_is_left_out_while_unknown(key) -> None:
    """Records of nodes that never found out (or older versions) carry no ``reach``."""
    for reach in ("public", "private"):
        data = sign_record(make_record(key, reach=reach), key)
        assert cbor2.loads(cbor2.loads(data)["body"])["reach"] == reach
        assert verify_record(data, now=NOW).reach == reach
    data = sign_record(make_record(key), key)
    assert "reach" not in cbor2.loads(cbor2.loads(data)["body"])
    assert verify_record(data, now=NOW).reach == "unknown"


def test_unknown_fields_are_ignored(key) -> None:
    """Forward compatibility: a later version may add fields; older nodes still read it."""
    body = cbor2.loads(cbor2.loads(sign_record(make_record(key), key))["body"])
    body["gpu_count"] = 2
    assert verify_record(envelope(body, key), now=NOW) == make_record(key)


def test_expected_peer_and_model(key) -> None:
    data = sign_record(make_record(key), key)
    other = peer_of(create_new_key_pair())
    assert reason_of(data, expected_peer=other) == RecordError.WRONG_PEER
    assert reason_of(data, expected_model="tiny@ffffffffffff") == RecordError.WRONG_MODEL
    verify_record(data, now=NOW, expected_peer=peer_of(key), expected_model=MODEL)


@pytest.mark.parametrize("start, end, total", [(8, 4, 12), (-1, 4, 12), (4, 13, 12), (0, 1, 0), (0, 4, 2**40)])
def test_bad_span(key, start: int, end: int, total: int) -> None:
    body = cbor2.loads(cbor2.loads(sign_record(make_record(key), key))["body"])
    body.update(start=start, end=end, total_blocks=total)
    assert reason_of(envelope(body, key)) == RecordError.BAD_SPAN
    with pytest.raises(RecordError):
        sign_record(make_record(key, start=start, end=end, total_blocks=total), key)


def test_unknown_state(key) -> None:
    body = cbor2.loads(cbor2.loads(sign_record(make_record(key), key))["body"])
    body["state"] = "sleeping"
    assert reason_of(envelope(body, key)) == RecordError.BAD_STATE


def test_peer_id_without_embedded_key(key) -> None:
    """An RSA-style peer id is a hash of the key: nothing to verify against, so refused."""
    import multihash

    hashed_id = ID(multihash.encode(hashlib.sha256(b"some rsa key").digest(), "sha2-256")).to_base58()
    body = cbor2.loads(cbor2.loads(sign_record(make_record(key), key))["body"])
    body["peer"] = hashed_id
    body["addrs"] = []  # addresses must end in /p2p/<peer>
    assert reason_of(envelope(body, key)) == RecordError.BAD_SIGNATURE


def test_model_identity() -> None:
    config, index = b'{"hidden_size": 64}', b'{"weight_map": {"a": "model.safetensors"}}'
    ident = model_identity("tiny", config, index)
    name, digest = ident.split("@")
    # Every node must derive the same id from the same files: the first 12 hex digits
    # of sha256(config, NUL, index).
    assert name == "tiny" and digest == hashlib.sha256(config + b"\0" + index).hexdigest()[:12]
    assert model_identity("tiny", config, index) == ident  # pure
    assert model_identity("tiny", config + b" ", index) != ident
    assert model_identity("tiny", config, index + b" ") != ident
    assert model_identity("other", config, index).split("@")[1] == digest  # the name is a label
    # the separator keeps the boundary between config and index
    assert model_identity("t", b"ab", b"c") != model_identity("t", b"a", b"bc")


def test_record_key_is_short_namespaced_and_per_peer(key) -> None:
    peer = peer_of(key)
    k = record_key(MODEL, peer)
    assert k.startswith("/shardmesh/") and len(k.encode()) <= 50
    assert record_key(MODEL, peer) == k
    assert record_key(MODEL, peer_of(create_new_key_pair())) != k
    assert record_key("tiny@ffffffffffff", peer) != k


def test_block_key_is_a_cid_py_libp2p_and_js_accept() -> None:
    """CIDv1, raw codec, sha2-256 of "shardmesh/<model>/block/<i>"; the DHT sees its multihash."""
    from libp2p.bitswap.cid import compute_cid_v1_obj, parse_cid
    from libp2p.kad_dht.kad_dht import _encode_key

    key = block_key(MODEL, 5)
    assert key == compute_cid_v1_obj(f"shardmesh/{MODEL}/block/5".encode()).encode("base32").decode()
    cid = parse_cid(key)
    assert cid.version == 1 and cid.codec == "raw"
    wire = _encode_key(key)  # what KadDHT.provide / find_providers put in the message
    assert wire == block_key_multihash(MODEL, 5)
    assert wire == b"\x12\x20" + hashlib.sha256(f"shardmesh/{MODEL}/block/5".encode()).digest()
    assert len({block_key(MODEL, i) for i in range(100)}) == 100
    assert block_key("tiny@ffffffffffff", 5) != key


def test_content_ignores_refresh_fields(key) -> None:
    a = make_record(key)
    assert content_of(a) == content_of(dataclasses.replace(a, seq=8, expires=NOW + 99, rtt={}))
    assert content_of(a) != content_of(dataclasses.replace(a, state="draining"))


def test_real_clock_default(key) -> None:
    fresh = make_record(key, expires=time.time() + 10)
    assert verify_record(sign_record(fresh, key)).peer == peer_of(key)
    assert reason_of(sign_record(make_record(key), key), now=time.time()) == RecordError.EXPIRED
