"""Circuit relay v2 on the wire: the libp2p messages, read with bounds.

Circuit relay v2 is libp2p's standard way to reach a node nobody can dial: the node
keeps a connection to a relay and *reserves* a slot there (``RESERVE`` on the hop
protocol); a dialler asks the relay to ``CONNECT`` it to that node; the relay opens
the stop protocol to the node, and from then on splices the two streams together.
Over that spliced stream the two ends run an ordinary libp2p connection (Noise,
Yamux), so the relay sees only ciphertext and cannot pose as either end.

Both protocols send protobuf messages, each after its length as an unsigned varint.
py-libp2p ships the message classes (what this module uses) and its own relay, which
we do not run: it trusts the peer id a ``RESERVE`` names, leaks a circuit slot when a
circuit hits its byte limit, and reads without deadlines (docs/PROTOCOL.md, section
9). A message here is at most :data:`MAX_MESSAGE` bytes, read within
:data:`READ_TIMEOUT` seconds, or the stream is given up.
"""

from __future__ import annotations

import trio
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage, Limit, PeerId as Peer, Reservation, Status, StopMessage

from .read_exactly import read_exactly

__all__ = [
    "HOP",
    "MAX_MESSAGE",
    "STOP",
    "HopMessage",
    "Limit",
    "Peer",
    "RelayWireError",
    "Reservation",
    "Status",
    "StopMessage",
    "peer_id_from",
    "read_message",
    "write_message",
]

HOP = "/libp2p/circuit/relay/0.2.0/hop"
STOP = "/libp2p/circuit/relay/0.2.0/stop"
MAX_MESSAGE = 4096  # bytes of one message (the spec's bound; ours carry a few addresses)
READ_TIMEOUT = 10.0  # s the other end has to send a whole message


class RelayWireError(Exception):
    """A message that is too long, cut short, late or not protobuf."""


async def read_message(stream, kind: type[HopMessage] | type[StopMessage], timeout: float = READ_TIMEOUT):
    """One length-prefixed ``kind`` message from ``stream``, bounded in size and time."""
    try:
        with trio.fail_after(timeout):
            length = await _read_varint(stream)
            if length > MAX_MESSAGE:
                raise RelayWireError(f"a {length}-byte message (at most {MAX_MESSAGE})")
            data = await _read_exactly(stream, length)
    except trio.TooSlowError:
        raise RelayWireError(f"no whole message within {timeout:g} s") from None
    try:
        return kind.FromString(data)
    except Exception as exc:  # google.protobuf.message.DecodeError
        raise RelayWireError(f"not a {kind.__name__} ({exc})") from None


def peer_id_from(raw: bytes):
    """The py-libp2p peer ID in a message's ``peer.id``, or None unless it is one: a
    sha2-256 multihash (34 bytes) or an identity multihash of a key of at most 42 bytes."""
    from libp2p.peer.id import ID

    sha256 = len(raw) == 34 and raw[:2] == b"\x12\x20"
    identity = 2 < len(raw) <= 44 and raw[0] == 0 and raw[1] == len(raw) - 2
    return ID(raw) if sha256 or identity else None


async def write_message(stream, message: HopMessage | StopMessage) -> None:
    data = message.SerializeToString()
    await stream.write(_varint(len(data)) + data)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


async def _read_varint(stream) -> int:
    value = 0
    for shift in range(0, 21, 7):  # three bytes cover every length up to 2 MiB
        byte = (await _read_exactly(stream, 1))[0]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value
    raise RelayWireError("a length prefix longer than three bytes")


async def _read_exactly(stream, n: int) -> bytes:
    try:
        return await read_exactly(stream, n)
    except EOFError:
        raise RelayWireError("the stream ended early") from None
    except Exception as exc:  # StreamEOF, StreamReset: the other end is gone
        raise RelayWireError(f"the stream ended ({type(exc).__name__})") from None
