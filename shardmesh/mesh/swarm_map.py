"""``/shardmesh/swarm/1.0.0``: hand a node's view of the swarm to whoever asks.

The exchange is one frame, server to client, then the server closes::

    client opens the stream (sends nothing)
    server ──▶ result{model, total_blocks} + CBOR [signed record bytes, ...]
    server closes its side

The payload is the *signed envelopes* of every live record in the server's registry
(its own included), not a summary it wrote itself. Records are self-certifying
(records.py), so the client verifies each one against the peer id it names: the peer
we asked can leave records out, but it cannot invent, alter or re-attribute one. What
it says in the header (model, block count) only selects which records are believed.

The serving side lives in :func:`swarm_map_handler`; the asking side is
:func:`fetch_swarm_map` (network) plus :func:`parse_swarm_map` (pure, testable). The
payload is decoded as plain CBOR (:mod:`~shardmesh.mesh.cbor_plain`) with its entry
count bounded *while* it is walked, so an array that claims a million entries is
refused from its first bytes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import cbor2
import trio

from .cbor_plain import PlainCborError, loads_plain, quote
from .host import Handler, MeshHost, close_quietly, reset_quietly
from .records import MAX_BLOCKS, NodeRecord, RecordError, verify_record
from .wire import RESULT, FrameStream, StreamEnded, WireError

log = logging.getLogger("shardmesh.mesh.swarm_map")

PROTOCOL = "/shardmesh/swarm/1.0.0"

MAX_MAP_BYTES = 16 << 20  # payload limit on the asking side: ~1,000 maximal records, ~20,000 real ones
MAX_MAP_RECORDS = 10_000  # entries looked at; beyond this the map is refused as junk
MAX_UNREACHABLE = 256  # liveness marks a map carries (each ~60 bytes of a 64 KiB header)


class SwarmMapError(Exception):
    """The peer did not give us a usable swarm map; the message says why."""


@dataclass
class SwarmMap:
    """A swarm as one peer showed it to us, after we verified every record ourselves."""

    model: str
    total_blocks: int
    records: list[NodeRecord]  # valid, one per peer (highest seq)
    dropped: list[RecordError] = field(default_factory=list)  # entries that failed verification
    envelopes: dict[str, bytes] = field(default_factory=dict)  # peer -> the signed bytes of its record above
    # peer -> seconds since the answering node found it unreachable (liveness.py): that
    # node's own word, unsigned, kept only for peers whose records are above
    unreachable: dict[str, float] = field(default_factory=dict)


# --- serving ------------------------------------------------------------------------------


def swarm_map_handler(registry) -> Handler:
    """A stream handler (for :meth:`MeshHost.set_handler`) that sends ``registry``'s view.

    ``registry`` is a :class:`~shardmesh.mesh.registry.Registry` (anything with
    ``model_id``, ``total_blocks()``, ``signed_records()`` and ``unreachable_for()``).
    The handler never raises: a failed write resets the stream, and the node goes on
    serving.
    """

    async def handle(stream) -> None:
        try:
            marks = sorted(registry.unreachable_for().items(), key=lambda kv: kv[1])[:MAX_UNREACHABLE]
            header = {"t": RESULT, "model": registry.model_id, "total_blocks": registry.total_blocks(),
                      "unreachable": {peer: round(ago, 1) for peer, ago in marks}}
            await FrameStream(stream).write(header, cbor2.dumps(registry.signed_records()))
        except Exception as exc:  # WireError, or anything else: the node goes on serving
            log.debug("sending the swarm map failed: %s: %s", type(exc).__name__, exc)
            await reset_quietly(stream)
            return
        await close_quietly(stream)  # the client reads our end of stream after the frame

    return handle


# --- asking -------------------------------------------------------------------------------


async def fetch_swarm_map(mesh: MeshHost, peer_id, timeout: float) -> SwarmMap:
    """Ask ``peer_id`` (already connected, or dialable from the peerstore) for its map.

    Opens the stream, reads the one frame within ``timeout`` seconds and verifies it
    with :func:`parse_swarm_map`. Raises :class:`SwarmMapError` on any failure.
    """
    deadline = trio.current_time() + timeout
    try:
        with trio.fail_after(timeout):
            stream = await mesh.open_stream(peer_id, PROTOCOL)
    except trio.TooSlowError:
        raise SwarmMapError(f"{peer_id} did not open {PROTOCOL} within {timeout:.0f} s") from None
    except Exception as exc:  # HostError, or the peer does not speak the protocol
        raise SwarmMapError(f"{peer_id} does not serve {PROTOCOL}: {exc}") from None
    try:
        frames = FrameStream(stream, max_payload=MAX_MAP_BYTES)
        frame = await frames.read_frame(idle_timeout=max(0.5, deadline - trio.current_time()))
    except StreamEnded:
        raise SwarmMapError(f"{peer_id} closed the stream without sending its map") from None
    except WireError as exc:
        raise SwarmMapError(f"bad answer from {peer_id}: {exc.message}") from None
    finally:
        await close_quietly(stream)
    return parse_swarm_map(frame.header, frame.payload)


def parse_swarm_map(header: dict[str, Any], payload: bytes, *, now: float | None = None) -> SwarmMap:
    """Decode a swarm-map frame and verify every record in it.

    A record is kept only if its signature is its peer's, it is for the header's
    model, it has not expired and it agrees on the block count; the rest are counted
    in ``dropped`` (with the reason), not fatal: one bad record must not hide the
    others. A header or payload of the wrong shape raises :class:`SwarmMapError`.
    """
    if header.get("t") != RESULT:
        raise SwarmMapError(f"expected a result frame, got {quote(header.get('t'))}")
    model, total = header.get("model"), header.get("total_blocks")
    if not isinstance(model, str) or not model:
        raise SwarmMapError("the map names no model")
    if not isinstance(total, int) or isinstance(total, bool) or not 0 <= total <= MAX_BLOCKS:
        raise SwarmMapError(f"bad block count {quote(total)}")
    try:
        # The array and its entries: one item more than the records it may hold. The
        # entries are byte strings; each is decoded (plain, again) by verify_record.
        entries = loads_plain(payload, max_depth=1, max_items=MAX_MAP_RECORDS + 1)
    except PlainCborError as exc:
        raise SwarmMapError(f"the map is not a plain CBOR list of at most {MAX_MAP_RECORDS} records ({exc})") from None
    if not isinstance(entries, list):
        raise SwarmMapError("the map is not a list of records")

    now = time.time() if now is None else now
    best: dict[str, NodeRecord] = {}
    envelopes: dict[str, bytes] = {}
    dropped: list[RecordError] = []
    for entry in entries:
        try:
            record = verify_record(entry, now=now, expected_model=model)
            if record.total_blocks != total:
                raise RecordError(RecordError.BAD_SPAN, f"{quote(record.peer)} says {record.total_blocks} blocks, not {total}")
        except RecordError as exc:
            dropped.append(exc)
            continue
        current = best.get(record.peer)
        if current is None or record.seq > current.seq:
            best[record.peer], envelopes[record.peer] = record, bytes(entry)
    return SwarmMap(model, total, list(best.values()), dropped, envelopes, _marks(header.get("unreachable"), best))


def _marks(value: Any, records: dict[str, NodeRecord]) -> dict[str, float]:
    """The header's liveness marks, for peers with a record here; anything malformed
    is left out (they are advisory: a map without them is still a map)."""
    if not isinstance(value, dict):
        return {}
    marks: dict[str, float] = {}
    for peer, ago in list(value.items())[:MAX_UNREACHABLE]:
        if peer in records and isinstance(ago, (int, float)) and not isinstance(ago, bool) and 0 <= ago < 1e9:
            marks[peer] = float(ago)
    return marks
