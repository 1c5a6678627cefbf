"""Frames on ``/shardmesh/infer/1.0.0``: length-prefixed CBOR header, then raw bytes.

::

    u32 big-endian header length | CBOR map (the header) | header["nbytes"] raw bytes

The header always has ``t`` (the frame type). Tensors travel as raw bytes described by
``dtype`` and ``shape`` in the header; bfloat16 is its 2-byte pattern. Nothing is ever
pickled. Why length prefixes matter here: py-libp2p reports a peer that died mid-stream
exactly like a clean close (``StreamEOF``), so only the framing tells a truncated tensor
from a whole one.

Every read has a deadline, and every limit (header size, payload size) is checked
*before* anything is allocated. A header is decoded by :mod:`~shardmesh.mesh.cbor_plain`
(plain CBOR only: no tags, definite lengths, bounded depth and item count), so what a
peer sends costs what it weighs. A violation raises :class:`WireError`, which the
caller turns into an ``error`` frame and a stream reset; its message names a bad
value by :func:`~shardmesh.mesh.cbor_plain.quote`, never by its whole ``repr``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Callable

import cbor2
import trio
from libp2p.network.stream.exceptions import StreamEOF, StreamReset

from ..contract import DTYPE_SIZES, RawTensor
from .cbor_plain import PlainCborError, loads_plain, quote

PROTOCOL = "/shardmesh/infer/1.0.0"

MAX_HEADER_BYTES = 64 << 10  # a header is a few hundred bytes; a route of 100 hops ~20 KiB
FRAME_TIMEOUT = 30.0  # seconds to receive the rest of a frame once it has begun

# Frame types (the header's "t").
OPEN = "open"  # gateway -> hop -> next hop: start a session over the rest of the route
ATTACH = "attach"  # gateway -> last hop: send this session's tokens on this stream
STEP = "step"  # token ids (first hop) or hidden states, pushed down the chain
RESULT = "result"  # "ok" acknowledgements, and sampled tokens from the last hop
ERROR = "error"  # {code, message, peer}: flows back towards the gateway
CLOSE = "close"  # end the session (flows down the chain)
LINK = "link"  # opener -> hop: the rest of this session goes over the offered link (link.py)
TRUNK = "trunk"  # hop -> next hop: this stream carries steps of many sessions (trunk.py)
STEPS = "steps"  # on a trunk: the steps of several sessions in one frame (trunk_frame.py)
RESULTS = "results"  # on a gateway's results trunk: several sessions' tokens in one frame
FRAME_TYPES = frozenset({OPEN, ATTACH, STEP, RESULT, ERROR, CLOSE, LINK, TRUNK, STEPS, RESULTS})


class WireError(Exception):
    """A frame we refuse. ``code`` travels in the error frame sent back."""

    def __init__(self, code: str, message: str, peer: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.peer = peer  # who failed, when it is not the peer raising this


class StreamEnded(Exception):
    """The remote closed (or reset) the stream between frames."""


@dataclass
class Frame:
    header: dict[str, Any]
    payload: bytes = b""

    @property
    def type(self) -> str:
        return self.header["t"]


def encode_frame(header: dict[str, Any], payload: bytes | bytearray | memoryview = b"") -> bytes:
    header = {**header, "nbytes": len(payload)} if payload else header
    head = cbor2.dumps(header)
    return b"".join((struct.pack(">I", len(head)), head, payload))


def tensor_fields(raw: RawTensor) -> dict[str, Any]:
    return {"dtype": raw.dtype, "shape": list(raw.shape)}


def tensor_from_frame(frame: Frame, max_elements: int) -> RawTensor:
    """The payload as a tensor; raises :class:`WireError` when the header lies about it."""
    dtype, shape = frame.header.get("dtype"), frame.header.get("shape")
    if dtype not in DTYPE_SIZES:
        raise WireError("bad_input", f"unsupported dtype {quote(dtype)}")
    if not isinstance(shape, list) or not shape or len(shape) > 2 or not all(type(d) is int and d > 0 for d in shape):  # bool is an int subclass: `true` is no size
        raise WireError("bad_input", f"bad tensor shape {_shape_text(shape)}")
    numel = 1
    for d in shape:
        numel *= d
    if numel > max_elements:
        raise WireError("too_large", f"tensor of {numel} elements exceeds this peer's limit of {max_elements}")
    if numel * DTYPE_SIZES[dtype] != len(frame.payload):
        raise WireError("bad_input", f"payload of {len(frame.payload)} bytes does not hold {dtype} {shape}")
    return RawTensor(dtype, tuple(shape), frame.payload)


@dataclass
class FrameStream:
    """A libp2p stream (or an in-process pipe) seen as a sequence of frames.

    Writes are serialised by a lock: on a hop, the task relaying errors back upstream
    and the task answering steps may both write to the same stream.
    """

    stream: Any
    max_payload: int = 64 << 20
    _buf: bytearray = field(default_factory=bytearray)
    _write_lock: trio.Lock = field(default_factory=trio.Lock)

    async def _fill(self, n: int, frame_start: bool = False) -> bool:
        """Buffer at least ``n`` bytes. False on a clean end of stream before a frame's
        first byte (``frame_start``); anywhere else an end of stream is a truncation."""
        start_len = len(self._buf)
        while len(self._buf) < n:
            try:
                chunk = await self.stream.read(max(n - len(self._buf), 1 << 16))
            except (StreamEOF, StreamReset, EOFError):
                chunk = b""
            except Exception as exc:
                raise WireError("stream_error", f"stream failed: {type(exc).__name__}: {exc}") from exc
            if not chunk:
                if frame_start and len(self._buf) == 0 and start_len == 0:
                    return False
                raise WireError("truncated", f"stream ended inside a frame ({len(self._buf)} of {n} bytes)")
            self._buf += chunk
        return True

    def _take(self, n: int) -> bytes:
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def read_frame(
        self, idle_timeout: float | None = None, check: Callable[[dict[str, Any]], None] | None = None
    ) -> Frame:
        """The next frame. Waits up to ``idle_timeout`` for it to begin (None: forever)
        and :data:`FRAME_TIMEOUT` for the rest. Raises :class:`StreamEnded` on a clean
        end between frames, :class:`WireError` on anything malformed. ``check`` sees the
        header before the payload is read, so limits hold before anything is allocated."""
        with trio.move_on_after(idle_timeout if idle_timeout is not None else float("inf")) as idle:
            began = await self._fill(1, frame_start=True)
        if idle.cancelled_caught:
            raise WireError("timeout", f"no frame within {idle_timeout:.0f} s")
        if not began:
            raise StreamEnded()
        try:
            with trio.fail_after(FRAME_TIMEOUT):
                await self._fill(4)
                (head_len,) = struct.unpack(">I", self._take(4))
                if head_len == 0 or head_len > MAX_HEADER_BYTES:
                    raise WireError("too_large", f"frame header of {head_len} bytes (limit {MAX_HEADER_BYTES})")
                await self._fill(head_len)
                header = _decode_header(self._take(head_len))
                nbytes = header.get("nbytes", 0)
                if type(nbytes) is not int or nbytes < 0:  # not a bool either
                    raise WireError("bad_frame", f"bad nbytes {quote(nbytes)}")
                if nbytes > self.max_payload:
                    raise WireError("too_large", f"payload of {nbytes} bytes exceeds this peer's limit of {self.max_payload}")
                if check is not None:
                    check(header)
                if nbytes:
                    await self._fill(nbytes)
                return Frame(header, self._take(nbytes))
        except trio.TooSlowError as exc:
            raise WireError("timeout", f"frame not complete within {FRAME_TIMEOUT:.0f} s") from exc

    async def write(self, header: dict[str, Any], payload: bytes | bytearray | memoryview = b"") -> None:
        """Send one frame. Shielded from cancellation: a write cut off half way would
        leave half a Noise message on the connection (or skip a nonce), and the peer
        would drop the whole connection with every other session on it. A write that
        stalls for :data:`FRAME_TIMEOUT` still gives up."""
        data = encode_frame(header, payload)
        async with self._write_lock:
            with trio.CancelScope(shield=True):
                try:
                    with trio.fail_after(FRAME_TIMEOUT):
                        await self.stream.write(data)
                except trio.TooSlowError as exc:
                    raise WireError("timeout", f"write not done within {FRAME_TIMEOUT:.0f} s") from exc
                except Exception as exc:
                    raise WireError("stream_error", f"write failed: {type(exc).__name__}: {exc}") from exc

    async def switch_to(self, stream: Any) -> Any:
        """Carry the following frames on ``stream`` (a hop link); returns the old stream.
        Only between frames, and only when the old stream has nothing more to give."""
        async with self._write_lock:
            if self._buf:
                raise WireError("bad_frame", "data after a link frame")
            old, self.stream = self.stream, stream
            return old

    async def send_error(self, code: str, message: str, peer: str, session: str | None = None) -> None:
        """Best effort: the stream may already be gone."""
        header = {"t": ERROR, "code": code, "message": message, "peer": peer}
        if session is not None:
            header["session"] = session
        try:
            with trio.move_on_after(2):
                await self.write(header)
        except WireError:
            pass


def _shape_text(shape: Any) -> str:
    """A shape for an error message: short lists of ints as they are, the rest by type."""
    if isinstance(shape, list) and len(shape) <= 4 and all(type(d) is int for d in shape):
        return "[" + ", ".join(quote(d) for d in shape) + "]"
    return quote(shape)


def _decode_header(data: bytes) -> dict[str, Any]:
    try:
        header = loads_plain(data)
    except PlainCborError as exc:
        raise WireError("bad_frame", f"header is not plain CBOR: {exc}") from None
    if not isinstance(header, dict) or header.get("t") not in FRAME_TYPES:
        raise WireError("bad_frame", "header must be a CBOR map with a known frame type 't'")
    return header
