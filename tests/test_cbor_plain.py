"""The one decoder of CBOR from peers (shardmesh/mesh/cbor_plain.py), and its callers.

The scanner accepts everything shardmesh sends and refuses what it never sends: tags
(above all 28/29, the shared values that turn a few hundred bytes into a tree a
million leaves wide), indefinite lengths, deep nesting, counts the bytes cannot hold,
non-text map keys, odd simple values, trailing bytes. Each caller turns a refusal into
its own error (a ``bad_frame`` WireError, a malformed RecordError, a SwarmMapError),
error messages quote a stranger's value short, and a hop forwards only the ``open``
fields it knows. tests/test_hostile_cbor.py sends the bomb to a real node.
"""

from __future__ import annotations

import random
import struct
from typing import Any

import cbor2
import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from shardmesh.contract import StageInfo
from shardmesh.mesh.cbor_plain import MAX_DEPTH, MAX_ITEMS, PlainCborError, clip, loads_plain, quote
from shardmesh.mesh.next_hop import relayed_error
from shardmesh.mesh.open_request import FORWARDED_FIELDS, Limits, ThisNode, next_open, validate_open
from shardmesh.mesh.pipe import pipe_pair
from shardmesh.mesh.records import NodeRecord, RecordError, SIGNING_PREFIX, expires_at, sign_record, verify_record
from shardmesh.mesh.swarm_map import MAX_MAP_RECORDS, SwarmMapError, parse_swarm_map
from shardmesh.mesh.wire import FrameStream, WireError, encode_frame

ME = "12D3KooWthisnode"
NEXT = "12D3KooWnexthop"
MODEL = "tiny@0123456789ab"


def dag(levels: int, leaf: Any = "x" * 8) -> Any:
    """A pair of the level below, ``levels`` times: 2**levels leaves, but with
    ``value_sharing`` each level is encoded once (tag 28) and referenced (tag 29)."""
    value = leaf
    for _ in range(levels):
        value = [value, value]
    return value


def bomb_open(levels: int = 25) -> bytes:
    """An ``open`` header whose ``model`` is a shared-reference DAG, like issue 17's."""
    header = {
        "t": "open", "session": "bomb", "model": dag(levels), "gateway": NEXT,
        "route": [{"peer": ME, "start": 0, "end": 4}], "max_length": 64,
        "sampling": {"temperature": 0.0}, "n_prompt": 0,
    }
    return cbor2.dumps(header, value_sharing=True)


def refused(data: bytes, **bounds: int) -> str:
    with pytest.raises(PlainCborError) as caught:
        loads_plain(data, **bounds)
    return str(caught.value)


# ---- what we send is accepted, unchanged ---------------------------------------------


def _record(**changes: Any) -> tuple[NodeRecord, Any]:
    key = create_new_key_pair()
    peer = ID.from_pubkey(key.public_key).to_base58()
    record = NodeRecord(
        peer=peer, addrs=(f"/ip4/127.0.0.1/tcp/4001/p2p/{peer}",), model=MODEL, start=0, end=4, total_blocks=4,
        state="online", throughput=12.5, cache_tokens_free=4096, backend="torch", device="cpu", dtype="float32",
        rtt={f"12D3KooWpeer{i}": float(i) for i in range(32)}, version="test", seq=7, expires=expires_at(30),
        api="http://127.0.0.1:8000", limits={"max_sessions_per_peer": 64, "max_tokens_per_step": 2048},
    )
    return record, key


def test_everything_we_send_decodes_as_cbor2_does() -> None:
    route = [{"peer": (ME, NEXT)[i % 2], "start": i, "end": i + 1} for i in range(64)]
    record, key = _record()
    envelope = sign_record(record, key)
    samples = [
        {"t": "open", "session": "s" * 64, "model": MODEL, "gateway": NEXT, "route": route, "max_length": 2048,
         "sampling": {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "seed": -(2**63), "logprobs": True,
                      "top_logprobs": 20}, "n_prompt": 3, "nbytes": 24, "link": True},
        {"t": "result", "session": "s", "position": 9, "token": 2**40, "logprob": -0.25,
         "top": [[i, -float(i)] for i in range(20)], "spent": 1e-6},
        {"t": "result", "session": "s", "ok": True, "link": {"port": 40123, "token": b"\0" * 16, "key": b"\1" * 32}},
        {"t": "step", "session": "s", "position": 0, "want": False, "dtype": "bfloat16", "shape": [2048, 4096],
         "nbytes": 2048 * 4096 * 2, "spent": 0},
        {"t": "error", "code": "bad_input", "message": "é" * 100, "peer": ME, "session": None},
        envelope,
        cbor2.loads(envelope),
        [envelope] * 3,
        {"values": [0, 23, 24, 255, 256, 65535, 65536, 2**32, 2**64 - 1, -1, -24, -25, -(2**64)]},
    ]
    for value in samples:
        data = cbor2.dumps(value)
        assert loads_plain(data) == cbor2.loads(data)
    assert verify_record(envelope) == record


@pytest.mark.parametrize(
    "data, value",
    [
        (bytes.fromhex("f93c00"), 1.0),  # half precision, as a JS or Rust peer may send
        (bytes.fromhex("fa3fc00000"), 1.5),  # single
        (bytes.fromhex("fb3ff8000000000000"), 1.5),  # double
        (bytes.fromhex("f4"), False),
        (bytes.fromhex("f5"), True),
        (bytes.fromhex("f6"), None),
    ],
)
def test_floats_of_every_width_and_the_three_simple_values(data: bytes, value: Any) -> None:
    assert loads_plain(data) == value


def test_the_bounds_themselves_are_accepted() -> None:
    nested = b"\x81" * MAX_DEPTH + b"\x00"
    assert loads_plain(nested) == cbor2.loads(nested)
    many = cbor2.dumps([0] * (MAX_ITEMS - 1))  # the array itself is the last item
    assert loads_plain(many) == [0] * (MAX_ITEMS - 1)
    exact = b"\x83\x01\x02\x03"  # a count the bytes left hold exactly
    assert loads_plain(exact) == [1, 2, 3]


# ---- refused --------------------------------------------------------------------------


def test_a_shared_reference_dag_is_refused_at_its_first_tag() -> None:
    data = cbor2.dumps(dag(40), value_sharing=True)  # 2**40 leaves in a couple hundred bytes
    assert len(data) < 300
    assert "tag" in refused(data)
    # Without the scanner cbor2 would build it at once: a shared DAG, not a tree.
    shared = cbor2.loads(cbor2.dumps(dag(3), value_sharing=True))
    assert shared[0] is shared[1]


def test_the_bomb_open_of_issue_17_is_refused() -> None:
    data = bomb_open()
    print(f"bomb open header: {len(data)} bytes, 2**25 leaves")
    assert len(data) <= 422
    assert "tag" in refused(data)
    # The same DAG as the only tagged field of an otherwise plain header (raw bytes: cbor2's
    # value_sharing tags the outer map too): refused at the field's first byte.
    head = b"\xa2" + cbor2.dumps("t") + cbor2.dumps("open") + cbor2.dumps("model")
    data = head + cbor2.dumps(dag(25), value_sharing=True)
    assert f"a tag at byte {len(head)}" in refused(data)
    decoded = cbor2.loads(data)  # what cbor2 alone builds: one list shared 2**25 times over
    assert decoded["model"][0] is decoded["model"][1]


@pytest.mark.parametrize(
    "tag",
    [0, 1, 2, 3, 4, 5, 21, 24, 25, 28, 29, 30, 32, 35, 256, 258, 55799],
)
def test_every_tag_is_refused(tag: int) -> None:
    assert "tag" in refused(cbor2.dumps(cbor2.CBORTag(tag, "x")))
    assert "tag" in refused(cbor2.dumps({"t": "open", "model": cbor2.CBORTag(tag, 1)}))


def test_deep_nesting_is_refused_without_recursing() -> None:
    assert "deeper" in refused(b"\x81" * (MAX_DEPTH + 1) + b"\x00")
    assert "deeper" in refused(b"\x81" * 1_000_000 + b"\x00")  # far past any recursion limit
    assert "deeper" in refused(b"\xa1\x61k" * (MAX_DEPTH + 1) + b"\x00")
    assert "deeper" in refused(b"\x81\x81\x00", max_depth=1)


@pytest.mark.parametrize(
    "data",
    [
        b"\x9b" + b"\xff" * 8,  # an array of 2**64 - 1 items, in 9 bytes
        b"\x9a\xff\xff\xff\xff" + b"\x00" * 16,
        b"\xbb" + b"\xff" * 8,  # a map of 2**64 - 1 pairs
        b"\xb9\x01\x00" + b"\x61k\x00" * 100,  # 256 pairs claimed, 100 there
        b"\x5b" + b"\xff" * 8,  # a byte string of 2**64 - 1 bytes
        b"\x7a\x00\x10\x00\x00" + b"x" * 100,  # a text string of 1 MiB, 100 bytes there
        b"\x84\x01\x02\x03",  # one item short
        b"\x99\x10\x00" + b"\x00" * 4095,
    ],
)
def test_counts_the_bytes_cannot_hold_are_refused_before_decoding(data: bytes) -> None:
    message = refused(data)
    assert "claims" in message or "truncated" in message


def test_the_item_count_is_bounded() -> None:
    # A claim over the bound is refused from the container's own head, before its items.
    assert "claims" in refused(cbor2.dumps([0] * MAX_ITEMS))  # MAX_ITEMS + 1 with the array
    assert "bound of 10 items" in refused(cbor2.dumps([[0] * 6, [0] * 6]), max_items=10)
    # Claims that each fit, but not together: counted off as the items arrive.
    assert "more than 5 items" in refused(cbor2.dumps([[0, 0, 0], 0, 0]), max_items=5)
    assert loads_plain(cbor2.dumps([[0, 0, 0], 0]), max_items=6) == [[0, 0, 0], 0]  # six items: the bound


@pytest.mark.parametrize(
    "data",
    [
        b"\x9f\x01\xff",  # indefinite array
        b"\xbf\x61k\x01\xff",  # indefinite map
        b"\x5f\x41a\xff",  # indefinite byte string
        b"\x7f\x61a\xff",  # indefinite text string
    ],
)
def test_indefinite_lengths_are_refused(data: bytes) -> None:
    assert cbor2.loads(data) is not None  # valid CBOR, just not ours
    assert "indefinite" in refused(data)


@pytest.mark.parametrize("key", [1, -1, b"k", 1.5, None, True])
def test_map_keys_must_be_text(key: Any) -> None:
    assert "key" in refused(cbor2.dumps({"t": "open", key: 1}))
    assert "key" in refused(b"\xa1\x81\x00\x00")  # an array as a key


@pytest.mark.parametrize("data", [b"\xf7", b"\xf0", b"\xf8\x20", b"\xff", b"\x1c", b"\x3f", b"\x82\x00\xf7"])
def test_undefined_other_simple_values_breaks_and_reserved_encodings(data: bytes) -> None:
    refused(data)


def test_duplicate_keys_and_bad_utf8_are_refused_by_cbor2_after_the_walk() -> None:
    assert "uplicate" in refused(b"\xa2\x61k\x01\x61k\x02")
    refused(b"\x62\xff\xfe")


def test_truncations_and_trailing_bytes_are_refused() -> None:
    data = cbor2.dumps({"t": "step", "session": "s", "shape": [1, 64], "spent": 0.5})
    for cut in range(len(data)):
        refused(data[:cut])
    assert "after" in refused(data + b"\x00")


def test_random_bytes_are_refused_or_decode_exactly_as_cbor2() -> None:
    rng = random.Random(17)
    accepted = 0
    for _ in range(20_000):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 24)))
        try:
            value = loads_plain(data)
        except PlainCborError:
            continue
        accepted += 1
        assert value == cbor2.loads(data) or value != value  # NaN is not equal to itself
    assert accepted > 100  # the test says something about acceptance too


# ---- quoting untrusted values ---------------------------------------------------------


def test_quote_is_short_whatever_it_is_given() -> None:
    assert quote("tiny@1") == "'tiny@1'"
    long = quote("m" * 100_000)
    assert len(long) < 100 and "100000 characters" in long
    assert quote(dag(200)) == "a list of 2 items"  # never walks it
    assert quote({"a": dag(200)}) == "a map of 1 entries"
    assert quote(b"\0" * 1000) == "1000 bytes"
    assert quote(None) == "None" and quote(7) == "7" and quote(True) == "True" and quote(0.5) == "0.5"
    assert "bits" in quote(2**200)
    assert clip("x" * 50, 10) == "xxxxxxxxxx... (50 characters)" and clip("short") == "short"


# ---- the callers -----------------------------------------------------------------------


def test_a_frame_header_that_is_not_plain_is_a_bad_frame() -> None:
    async def main() -> None:
        for head in (bomb_open(), cbor2.dumps({"t": "close", "session": cbor2.CBORTag(2, b"\1")}), b"\x9b" + b"\xff" * 8):
            mine, theirs = pipe_pair()
            await mine.write(struct.pack(">I", len(head)) + head)
            with pytest.raises(WireError) as caught:
                await FrameStream(theirs).read_frame(idle_timeout=5)
            assert caught.value.code == "bad_frame" and "plain CBOR" in caught.value.message

    trio.run(main)


def test_records_with_tags_are_malformed() -> None:
    record, key = _record()
    envelope = cbor2.loads(sign_record(record, key))
    tagged_envelope = cbor2.dumps({**envelope, "extra": dag(30)}, value_sharing=True)
    with pytest.raises(RecordError) as caught:
        verify_record(tagged_envelope)
    assert caught.value.reason == RecordError.MALFORMED and "plain" in caught.value.detail
    # A body with a tag, correctly signed: refused as malformed before its signature.
    body = cbor2.loads(envelope["body"])
    body["version"] = dag(30)
    body_bytes = cbor2.dumps(body, value_sharing=True)
    signed = cbor2.dumps({"body": body_bytes, "sig": key.private_key.sign(SIGNING_PREFIX + body_bytes)})
    with pytest.raises(RecordError) as caught:
        verify_record(signed)
    assert caught.value.reason == RecordError.MALFORMED and "plain" in caught.value.detail


def test_a_swarm_map_is_bounded_while_it_is_walked() -> None:
    header = {"t": "result", "model": MODEL, "total_blocks": 4}
    with pytest.raises(SwarmMapError):
        parse_swarm_map(header, b"\x9a\x00\x0f\x42\x40")  # claims a million entries, holds none
    with pytest.raises(SwarmMapError):
        parse_swarm_map(header, cbor2.dumps([b""] * (MAX_MAP_RECORDS + 1)))
    with pytest.raises(SwarmMapError):
        parse_swarm_map(header, cbor2.dumps([[b"nested"]]))
    with pytest.raises(SwarmMapError):
        parse_swarm_map(header, cbor2.dumps([cbor2.CBORTag(24, b"")]))
    assert parse_swarm_map(header, cbor2.dumps([b""] * MAX_MAP_RECORDS)).records == []


def _this_node() -> ThisNode:
    info = StageInfo(MODEL, 0, 4, 4, hidden_size=64, vocab_size=512, dtype="float32", device="cpu", backend="torch")
    return ThisNode(ME, MODEL, 4, 2048, info)


def test_the_wrong_model_message_quotes_the_field_short() -> None:
    header = {"t": "open", "session": "s", "model": "m" * 60_000, "gateway": NEXT,
              "route": [{"peer": ME, "start": 0, "end": 4}], "max_length": 64}
    with pytest.raises(WireError) as caught:
        validate_open(header, b"", _this_node(), Limits(), 0, ())
    assert caught.value.code == "wrong_model" and len(caught.value.message) < 200
    header["model"] = dag(300)  # a tree (not shared) this deep cannot come off the wire, but quote does not care
    with pytest.raises(WireError) as caught:
        validate_open(header, b"", _this_node(), Limits(), 0, ())
    assert caught.value.message.endswith("not a list of 2 items")


def test_a_hop_forwards_only_the_open_fields_it_knows() -> None:
    route = [{"peer": ME, "start": 0, "end": 2, "via": "x" * 1000}, {"peer": NEXT, "start": 2, "end": 4, "extra": [1]}]
    header = {"t": "open", "session": "s", "model": MODEL, "gateway": NEXT, "route": route, "max_length": 64,
              "sampling": {"temperature": 0.0}, "n_prompt": 0, "nbytes": 0, "link": True, "x-junk": "y" * 1000, "cache": True,
              "ticket": b"the gateway's signature, passed on as it came"}  # fmt: skip
    request = validate_open(header, b"", _this_node(), Limits(), 0, ())
    assert request.route == [{"peer": ME, "start": 0, "end": 2}, {"peer": NEXT, "start": 2, "end": 4}]
    forwarded = next_open(header, request.route)
    assert set(forwarded) == set(FORWARDED_FIELDS) | {"route"}
    assert forwarded["route"] == [{"peer": NEXT, "start": 2, "end": 4}]
    assert forwarded["sampling"] == {"temperature": 0.0} and forwarded["session"] == "s"
    assert forwarded["ticket"] == header["ticket"]
    assert cbor2.loads(encode_frame(forwarded)[4:]) == forwarded


def test_an_error_relayed_back_is_rebuilt_from_its_known_fields() -> None:
    err = relayed_error({"t": "error", "code": "cache_full", "message": "full", "peer": ME, "junk": dag(5)}, NEXT)
    assert (err.code, err.message, err.peer) == ("cache_full", "full", ME)
    err = relayed_error({"t": "error", "code": ["x"], "message": {"a": 1}, "peer": 7}, NEXT)
    assert (err.code, err.message, err.peer) == ("error", "", NEXT)
    err = relayed_error({"t": "error", "code": "c" * 100, "message": "m" * 100_000, "peer": "p" * 1000}, NEXT)
    assert err.code == "error" and len(err.message) < 1100 and err.peer == NEXT
