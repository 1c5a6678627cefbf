"""NodeRecord: the signed capability record every node publishes about itself.

A record says who a node is (peer id, addresses), what it serves (a span of a model's
blocks), how well (throughput, free KV cache, limits) and until when (``expires``).
Records travel over gossip and sit in the Kademlia DHT, so they pass through peers we
do not trust. Three rules keep that safe:

* **Self-certifying.** A record is signed with the node's libp2p ed25519 key, and an
  ed25519 peer id *is* the public key (an identity multihash). Anyone can check that
  the record was written by the peer it names, with no lookup and no third party.
  A record that names peer X but is signed by Y is a forgery and is rejected.
* **Short-lived.** ``expires`` is absolute unix time, normally now + :data:`RECORD_TTL`.
  A node that stops refreshing disappears from everyone's view within a TTL. A record
  that claims to live more than :data:`MAX_RECORD_LIFETIME` is rejected too: a
  "valid forever" record would outlive its node (and a leaked key) indefinitely.
* **Small and strict.** Input over :data:`MAX_RECORD_BYTES` is refused before it is
  decoded; envelope and body are decoded as plain CBOR only (:mod:`~shardmesh.mesh.cbor_plain`:
  no tags, no shared values, bounded nesting and item count); every field is
  type- and bound-checked (:mod:`~shardmesh.mesh.record_checks`: entry counts, text
  lengths, value ranges); unknown fields are ignored so that later versions can add fields
  without breaking older nodes. Error details quote a field's value short
  (:func:`~shardmesh.mesh.cbor_plain.quote`), never whole.

Wire format (CBOR everywhere)::

    body     = CBOR map of the record's fields
    envelope = CBOR map {"body": <body bytes>, "sig": ed25519(SIGNING_PREFIX + body)}

The signature covers the body *bytes* exactly as sent, so no canonical re-encoding is
needed to verify. The prefix keeps a record signature from being replayed as some other
kind of signed libp2p message (pubsub, peer records), and vice versa.

The DHT keys records are stored under and the model identity they carry live in
:mod:`~shardmesh.mesh.record_keys`; they are re-exported here for older importers.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import cbor2

from ..placement.spans import ServerView
from .cbor_plain import PlainCborError, loads_plain, quote
from .record_checks import (
    MAX_ADDRS, MAX_BLOCKS, MAX_LIMIT_VALUE, MAX_LIMITS, MAX_RTT_ENTRIES, MAX_RTT_MS, MAX_TEXT_BYTES, RecordError,
    addr_list, integer, limits_map, number, reachability, rtt_map, suspect_list, text,
)  # fmt: skip
from .record_keys import RECORD_NAMESPACE, block_key, block_key_multihash, model_identity, record_key

RECORD_TTL = 30.0  # seconds a published record stays valid; refreshed well before
MAX_RECORD_LIFETIME = 600.0  # a record may not claim to live longer than this
MAX_RECORD_BYTES = 16 * 1024  # signed envelope, checked before decoding
SIGNING_PREFIX = b"shardmesh-record/1\0"
STATES = ("joining", "online", "draining")

__all__ = [
    "MAX_ADDRS", "MAX_BLOCKS", "MAX_LIMITS", "MAX_LIMIT_VALUE", "MAX_RTT_MS", "MAX_TEXT_BYTES", "MAX_RECORD_BYTES", "MAX_RECORD_LIFETIME", "MAX_RTT_ENTRIES", "RECORD_TTL", "SIGNING_PREFIX", "STATES",
    "NodeRecord", "RecordError", "content_of", "expires_at", "record_json", "record_ttl", "server_view", "sign_record",
    "verify_record",
    # from record_keys, re-exported so that importers of records keep working
    "RECORD_NAMESPACE", "block_key", "block_key_multihash", "model_identity", "record_key",
]


@dataclass(frozen=True)
class NodeRecord:
    """What one node serves, as it announces it. Immutable: change with ``dataclasses.replace``."""

    peer: str  # base58 peer id (ed25519: "12D3KooW...")
    addrs: tuple[str, ...]  # multiaddrs ending in /p2p/<peer>
    model: str  # "name@hash", see model_identity()
    start: int  # span [start, end) of blocks; 0, 0 for a gateway that serves none
    end: int
    total_blocks: int
    state: str  # one of STATES
    throughput: float  # tokens/s per block, measured
    cache_tokens_free: int
    backend: str  # "torch", "mlx", ...
    device: str  # "cpu", "cuda:0", "mps", ...
    dtype: str  # "bfloat16", ...
    rtt: Mapping[str, float]  # peer -> ms, nearest MAX_RTT_ENTRIES kept on the wire
    version: str  # shardmesh version
    seq: int  # higher wins; the registry bumps it on every publish
    expires: float  # unix seconds
    api: str | None = None  # gateway URL, if this node runs one
    limits: Mapping[str, int] = field(default_factory=dict)  # max_tokens_per_step, ...
    suspects: tuple[str, ...] = ()  # peers this node found unreachable: a hint others check (hints.py)
    reach: str = "unknown"  # can others dial it: public, private or unknown (dialback.py)

    @property
    def span(self) -> tuple[int, int]:
        return (self.start, self.end)

    @property
    def serves_blocks(self) -> bool:
        """False for a gateway-only node (empty span)."""
        return self.end > self.start

    def serves(self, block: int) -> bool:
        return self.start <= block < self.end


# --- time ------------------------------------------------------------------------------


def expires_at(ttl: float = RECORD_TTL, now: float | None = None) -> float:
    """The ``expires`` value for a record published now that should live ``ttl`` s."""
    return (time.time() if now is None else now) + ttl


def record_ttl(record: NodeRecord, now: float | None = None) -> float:
    """Seconds left before ``record`` expires (negative once it has)."""
    return record.expires - (time.time() if now is None else now)


def server_view(record: NodeRecord) -> ServerView:
    """What placement needs of a record (placement stays free of records and I/O)."""
    return ServerView(
        peer=record.peer,
        start=record.start,
        end=record.end,
        throughput=record.throughput,
        state=record.state,
        cache_tokens_free=record.cache_tokens_free,
        rtt_ms=dict(record.rtt),
        relayed=record.reach == "private",
    )


def record_json(record: NodeRecord, now: float | None = None) -> dict:
    """A record as plain JSON for people and dashboards (``/v1/swarm``, ``status --json``)."""
    return {
        "peer": record.peer,
        "addrs": list(record.addrs),
        "span": [record.start, record.end],
        "gateway": not record.serves_blocks,
        "state": record.state,
        "throughput": record.throughput,
        "cache_tokens_free": record.cache_tokens_free,
        "backend": record.backend,
        "device": record.device,
        "dtype": record.dtype,
        "api": record.api,
        "rtt_ms": dict(record.rtt),
        "version": record.version,
        "seq": record.seq,
        "expires_in": round(record_ttl(record, now), 1),
        "suspects": list(record.suspects),
        "reach": record.reach,
        "limits": dict(record.limits),
    }


# --- encoding --------------------------------------------------------------------------


def _body_map(record: NodeRecord) -> dict[str, Any]:
    nearest = sorted(record.rtt.items(), key=lambda kv: kv[1])[:MAX_RTT_ENTRIES]
    return {
        "peer": record.peer,
        "addrs": list(record.addrs),
        "model": record.model,
        "start": record.start,
        "end": record.end,
        "total_blocks": record.total_blocks,
        "state": record.state,
        "throughput": float(record.throughput),
        "cache_tokens_free": record.cache_tokens_free,
        "backend": record.backend,
        "device": record.device,
        "dtype": record.dtype,
        "rtt": {str(p): float(ms) for p, ms in nearest},
        "version": record.version,
        "seq": record.seq,
        "expires": float(record.expires),
        "api": record.api,
        "limits": {str(k): int(v) for k, v in record.limits.items()},
        **({"suspects": list(record.suspects)} if record.suspects else {}),
        **({"reach": record.reach} if record.reach != "unknown" else {}),
    }


def sign_record(record: NodeRecord, key_pair) -> bytes:
    """The signed envelope for ``record``, signed with ``key_pair`` (libp2p ed25519).

    Refuses (RecordError) to sign what :func:`verify_record` would reject for its shape
    or size, so a node finds out about a bad record at home, not from silent peers.
    Time is not checked here: a caller may legitimately sign an expired record in a test.
    """
    body = cbor2.dumps(_body_map(record), canonical=True)
    envelope = cbor2.dumps({"body": body, "sig": key_pair.private_key.sign(SIGNING_PREFIX + body)})
    if len(envelope) > MAX_RECORD_BYTES:  # first, as a receiver checks it first
        raise RecordError(RecordError.OVERSIZED, f"{len(envelope)} bytes > {MAX_RECORD_BYTES}")
    _parse_body(body)  # the same checks a receiver makes
    return envelope


def verify_record(
    data: bytes,
    *,
    now: float | None = None,
    expected_peer: str | None = None,
    expected_model: str | None = None,
) -> NodeRecord:
    """Decode and check a signed envelope; the record, or RecordError saying why not.

    Checks run cheapest first (size, shape, time, expectations) so that junk costs
    little; the signature is checked last. ``now`` defaults to the wall clock: records
    carry absolute times, so nodes need roughly synchronised clocks (NTP), well within
    a TTL.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise RecordError(RecordError.MALFORMED, f"expected bytes, got {type(data).__name__}")
    if len(data) > MAX_RECORD_BYTES:
        raise RecordError(RecordError.OVERSIZED, f"{len(data)} bytes > {MAX_RECORD_BYTES}")
    try:
        envelope = loads_plain(data)
    except PlainCborError as exc:
        raise RecordError(RecordError.MALFORMED, f"not plain CBOR ({exc})") from None
    if not isinstance(envelope, dict):
        raise RecordError(RecordError.MALFORMED, "envelope is not a map")
    body = envelope.get("body")
    if not isinstance(body, bytes):
        raise RecordError(RecordError.MALFORMED, "envelope has no body bytes")
    sig = envelope.get("sig")
    if sig is None:
        raise RecordError(RecordError.UNSIGNED, "envelope has no signature")
    if not isinstance(sig, bytes):
        raise RecordError(RecordError.MALFORMED, "signature is not bytes")

    record = _parse_body(body)

    now = time.time() if now is None else now
    if record.expires < now:
        raise RecordError(RecordError.EXPIRED, f"expired {now - record.expires:.1f} s ago")
    if record.expires > now + MAX_RECORD_LIFETIME:
        raise RecordError(
            RecordError.EXPIRY_TOO_FAR, f"expires in {record.expires - now:.0f} s > {MAX_RECORD_LIFETIME:.0f} s"
        )
    if expected_peer is not None and record.peer != expected_peer:
        raise RecordError(RecordError.WRONG_PEER, f"record is for {quote(record.peer)}, expected {expected_peer}")
    if expected_model is not None and record.model != expected_model:
        raise RecordError(RecordError.WRONG_MODEL, f"record is for {quote(record.model)}, expected {expected_model}")

    public_key = _public_key_of(record.peer)
    try:
        ok = public_key.verify(SIGNING_PREFIX + body, sig)
    except Exception:
        ok = False
    if not ok:
        raise RecordError(RecordError.BAD_SIGNATURE, f"not signed by {quote(record.peer)}")
    return record


def _public_key_of(peer: str):
    from libp2p.peer.id import ID

    try:
        public_key = ID.from_base58(peer).extract_public_key()
    except Exception as exc:
        raise RecordError(RecordError.MALFORMED, f"peer {quote(peer)} is not a peer id ({quote(str(exc), 120)})") from None
    if public_key is None:
        # e.g. RSA ids are a hash of the key: nothing to verify against without a lookup
        raise RecordError(RecordError.BAD_SIGNATURE, f"peer id {quote(peer)} does not embed its public key")
    return public_key


# --- strict decoding -------------------------------------------------------------------


def _parse_body(body: bytes) -> NodeRecord:
    try:
        m = loads_plain(body)
    except PlainCborError as exc:
        raise RecordError(RecordError.MALFORMED, f"body is not plain CBOR ({exc})") from None
    if not isinstance(m, dict):
        raise RecordError(RecordError.MALFORMED, "body is not a map")

    api = m.get("api")
    if api is not None and not isinstance(api, str):
        raise RecordError(RecordError.MALFORMED, "field 'api' must be a string or null")
    if api is not None:
        api = text(m, "api")
    peer = text(m, "peer")
    record = NodeRecord(
        peer=peer,
        addrs=tuple(addr_list(m, peer)),
        model=text(m, "model"),
        start=integer(m, "start"),
        end=integer(m, "end"),
        total_blocks=integer(m, "total_blocks"),
        state=text(m, "state"),
        throughput=number(m, "throughput"),
        cache_tokens_free=integer(m, "cache_tokens_free"),
        backend=text(m, "backend"),
        device=text(m, "device"),
        dtype=text(m, "dtype"),
        rtt=rtt_map(m),
        version=text(m, "version"),
        seq=integer(m, "seq"),
        expires=number(m, "expires"),
        api=api,
        limits=limits_map(m),
        suspects=tuple(suspect_list(m, peer)),
        reach=reachability(m),
    )
    if not record.peer:
        raise RecordError(RecordError.MALFORMED, "empty peer")
    if record.seq < 0 or record.cache_tokens_free < 0 or record.throughput < 0:
        raise RecordError(RecordError.MALFORMED, "seq, cache_tokens_free and throughput must be >= 0")
    if record.total_blocks > MAX_BLOCKS:
        raise RecordError(RecordError.BAD_SPAN, f"{record.total_blocks} blocks (at most {MAX_BLOCKS})")
    if not (0 <= record.start <= record.end <= record.total_blocks):
        raise RecordError(
            RecordError.BAD_SPAN, f"span [{record.start},{record.end}) outside [0,{record.total_blocks}]"
        )
    if record.state not in STATES:
        raise RecordError(RecordError.BAD_STATE, f"state {quote(record.state)} not in {STATES}")
    return record


def content_of(record: NodeRecord) -> NodeRecord:
    """``record`` with the fields that move on every refresh blanked (seq, expires, rtt).

    Two records with equal content say the same thing; the registry uses this to tell
    a real change (span, state, load, addresses...) from a heartbeat. RTTs are blanked
    because they jitter on every measurement and would make every heartbeat a "change".
    """
    return dataclasses.replace(record, seq=0, expires=0.0, rtt={})
