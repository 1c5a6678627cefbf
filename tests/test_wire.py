"""The frame codec of ``/shardmesh/infer/1.0.0`` (``shardmesh.mesh.wire``) on its own.

A frame is ``u32be header length | CBOR header | header["nbytes"] raw bytes``
(docs/PROTOCOL.md, section 6). These tests feed :class:`FrameStream` exact bytes over
trio's in-memory streams and check what comes out: whole frames in order, and a
:class:`WireError` with the protocol's code for everything else, raised *before* a
peer's claimed sizes are allocated or waited for. Every test runs on trio's mock clock
with autojump, so the 30 s frame deadline passes instantly, and a read that waits
where it should have refused shows up as a ``timeout`` instead of the expected code.
"""

from __future__ import annotations

import struct
from typing import Any, Awaitable, Callable

import cbor2
import pytest
import trio
import trio.testing
from libp2p.network.stream.exceptions import StreamEOF, StreamReset

from shardmesh.contract import DTYPE_SIZES, RawTensor
from shardmesh.mesh.wire import (
    FRAME_TIMEOUT,
    MAX_HEADER_BYTES,
    Frame,
    FrameStream,
    StreamEnded,
    WireError,
    encode_frame,
    tensor_fields,
    tensor_from_frame,
)


class TrioStream:
    """py-libp2p's stream interface (``read``, ``write``, ``close``, ``reset``) over a
    trio stream: the transport of these tests, not the thing under test.

    A libp2p stream that ended raises :class:`StreamEOF` (or :class:`StreamReset`)
    from ``read`` where a trio stream returns ``b""``; ``end`` picks which to show.
    """

    def __init__(self, stream: trio.abc.Stream, end: type[Exception] | None = None) -> None:
        self.stream = stream
        self.end = end

    async def read(self, n: int | None = None) -> bytes:
        data = await self.stream.receive_some(n)
        if not data and self.end is not None:
            raise self.end("stream ended")
        return data

    async def write(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def close(self) -> None:
        await self.stream.send_eof()

    async def reset(self) -> None:
        await self.stream.aclose()


def streams(end: type[Exception] | None = None, pair=trio.testing.memory_stream_pair, **limits: Any) -> tuple[FrameStream, TrioStream]:
    """A :class:`FrameStream` under test and the raw stream of the peer facing it."""
    ours, theirs = pair()
    return FrameStream(TrioStream(ours, end), **limits), TrioStream(theirs)


def run(main: Callable[[], Awaitable[None]]) -> None:
    """Run ``main`` on the autojump clock; a test that would hang fails instead."""

    async def bounded() -> None:
        with trio.fail_after(10 * FRAME_TIMEOUT):
            await main()

    trio.run(bounded, clock=trio.testing.MockClock(autojump_threshold=0))


def raw_frame(header: Any, payload: bytes = b"") -> bytes:
    """A frame whose header says exactly ``header`` (``encode_frame`` would fix ``nbytes``)."""
    head = cbor2.dumps(header)
    return struct.pack(">I", len(head)) + head + payload


async def refused(fs: FrameStream, code: str, **read: Any) -> WireError:
    with pytest.raises(WireError) as info:
        await fs.read_frame(**read)
    assert info.value.code == code, info.value.message
    assert info.value.message
    return info.value


STEP = {"t": "step", "session": "s", "position": 0, "want": False}
ENDS = [None, StreamEOF, StreamReset]  # a trio end of stream, and py-libp2p's two


# -- whole frames ----------------------------------------------------------------------


def test_encode_frame_layout() -> None:
    data = encode_frame({"t": "close", "session": "s"})
    (n,) = struct.unpack(">I", data[:4])
    assert len(data) == 4 + n and cbor2.loads(data[4:]) == {"t": "close", "session": "s"}  # no nbytes without payload

    data = encode_frame({**STEP, "nbytes": 999}, b"abc")  # the payload's real size wins
    (n,) = struct.unpack(">I", data[:4])
    assert cbor2.loads(data[4 : 4 + n])["nbytes"] == 3 and data[4 + n :] == b"abc"


def test_frames_round_trip_in_order_then_a_clean_end() -> None:
    sent = [
        ({"t": "open", "session": "s", "route": [{"peer": "p", "start": 0, "end": 4}]}, b"\x01" * 24),
        ({"t": "result", "session": "s", "ok": True}, b""),
        ({**STEP, "dtype": "int64", "shape": [2]}, bytearray(16)),
        ({"t": "error", "code": "x", "message": "y", "peer": "p"}, memoryview(b"zz")),
    ]

    async def main() -> None:
        fs, peer = streams()
        for header, payload in sent:
            await peer.write(encode_frame(header, payload))
        await peer.close()
        for header, payload in sent:
            frame = await fs.read_frame(idle_timeout=1)
            expected = {**header, "nbytes": len(payload)} if payload else header
            assert frame.header == expected and frame.payload == bytes(payload) and frame.type == header["t"]
        with pytest.raises(StreamEnded):
            await fs.read_frame()

    run(main)


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_frames_split_anywhere_are_reassembled(chunk: int) -> None:
    """Transport reads carry no frame boundaries: a frame may come a byte at a time,
    and one read may hold the end of one frame and the start of the next."""
    frames = [encode_frame({**STEP, "position": i}, bytes([i]) * (i * 5)) for i in range(6)]
    data = b"".join(frames)

    async def main() -> None:
        fs, peer = streams()

        async def dribble() -> None:
            for i in range(0, len(data), chunk):
                await peer.write(data[i : i + chunk])
                await trio.sleep(0.001)
            await peer.close()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(dribble)
            for i in range(6):
                frame = await fs.read_frame()
                assert frame.header["position"] == i and frame.payload == bytes([i]) * (i * 5)
            with pytest.raises(StreamEnded):
                await fs.read_frame()

    run(main)


@pytest.mark.parametrize("dtype", sorted(DTYPE_SIZES))
@pytest.mark.parametrize("shape", [(3,), (2, 5)])
def test_tensor_round_trip(dtype: str, shape: tuple[int, ...]) -> None:
    numel = shape[0] * (shape[1] if len(shape) > 1 else 1)
    raw = RawTensor(dtype, shape, bytes((i * 7) % 256 for i in range(numel * DTYPE_SIZES[dtype])))

    async def main() -> None:
        fs, peer = streams()
        await peer.write(encode_frame({**STEP, **tensor_fields(raw)}, raw.data))
        frame = await fs.read_frame()
        assert frame.header["dtype"] == dtype and frame.header["shape"] == list(shape)
        got = tensor_from_frame(frame, max_elements=numel)
        assert (got.dtype, got.shape, bytes(got.data)) == (dtype, shape, bytes(raw.data))

    run(main)


# -- limits, checked before anything is allocated or awaited --------------------------------


@pytest.mark.parametrize("length", [0, MAX_HEADER_BYTES + 1, 2**32 - 1])
def test_a_header_length_out_of_bounds_is_refused_from_the_prefix(length: int) -> None:
    """Only the four length bytes arrive: the refusal must not wait for the header
    (which would end in ``timeout`` here) nor buffer what it claims."""

    async def main() -> None:
        fs, peer = streams()
        await peer.write(struct.pack(">I", length))
        await refused(fs, "too_large")
        assert len(fs._buf) == 0

    run(main)


def test_a_header_of_exactly_the_limit_is_read() -> None:
    header = {**STEP, "pad": ""}
    header["pad"] = "x" * (MAX_HEADER_BYTES - len(cbor2.dumps(header)) - 2)  # the text's length prefix grows by 2
    assert len(cbor2.dumps(header)) == MAX_HEADER_BYTES

    async def main() -> None:
        fs, peer = streams()
        await peer.write(encode_frame(header))
        assert (await fs.read_frame()).header == header

    run(main)


def test_a_payload_over_the_limit_is_refused_from_the_header() -> None:
    async def main() -> None:
        fs, peer = streams(max_payload=1000)
        await peer.write(raw_frame({**STEP, "nbytes": 1001}))  # and never the payload
        await refused(fs, "too_large")
        await peer.write(raw_frame({**STEP, "nbytes": 1000}, b"\x07" * 1000))
        assert (await fs.read_frame()).payload == b"\x07" * 1000  # the limit itself is fine

    run(main)


def test_check_sees_the_header_before_the_payload_is_read() -> None:
    seen: list[dict] = []

    def check(header: dict) -> None:
        seen.append(header)
        if header["position"] == 1:
            raise WireError("too_large", "a step of more tokens than this peer takes")

    async def main() -> None:
        fs, peer = streams()
        await peer.write(raw_frame({**STEP, "position": 0, "nbytes": 4}, b"abcd"))
        assert (await fs.read_frame(check=check)).payload == b"abcd"
        await peer.write(raw_frame({**STEP, "position": 1, "nbytes": 1 << 20}))  # no payload follows
        await refused(fs, "too_large", check=check)
        assert [h["position"] for h in seen] == [0, 1]

    run(main)


@pytest.mark.parametrize("nbytes", [-1, 2.0, "8", None, [8]])
def test_a_bad_nbytes_is_bad_frame(nbytes: Any) -> None:
    async def main() -> None:
        fs, peer = streams()
        await peer.write(raw_frame({**STEP, "nbytes": nbytes}, b"\0" * 8))
        await refused(fs, "bad_frame")

    run(main)


# -- truncation ----------------------------------------------------------------------


FRAME = encode_frame({**STEP, "dtype": "int64", "shape": [2]}, struct.pack("<2q", 5, 6))
HEAD_END = 4 + struct.unpack(">I", FRAME[:4])[0]
CUTS = {"in the length": 2, "after the length": 4, "in the header": HEAD_END - 3, "after the header": HEAD_END, "in the payload": len(FRAME) - 1}


@pytest.mark.parametrize("end", ENDS, ids=["eof", "StreamEOF", "StreamReset"])
@pytest.mark.parametrize("cut", list(CUTS))
def test_a_stream_that_ends_inside_a_frame_is_truncated(cut: str, end: type[Exception] | None) -> None:
    """py-libp2p reports a peer that died exactly like a clean close: only the framing
    can tell that a short tensor is short, so none may come out."""

    async def main() -> None:
        fs, peer = streams(end)
        await peer.write(FRAME + FRAME[: CUTS[cut]])
        await peer.close()
        assert (await fs.read_frame()).payload == struct.pack("<2q", 5, 6)
        await refused(fs, "truncated")

    run(main)


@pytest.mark.parametrize("end", ENDS, ids=["eof", "StreamEOF", "StreamReset"])
def test_a_stream_that_ends_between_frames_has_ended(end: type[Exception] | None) -> None:
    async def main() -> None:
        fs, peer = streams(end)
        await peer.close()
        with pytest.raises(StreamEnded):
            await fs.read_frame(idle_timeout=5)

    run(main)


def test_a_transport_failure_is_a_stream_error() -> None:
    class Failing:
        async def read(self, n: int) -> bytes:
            raise OSError("connection refused")

        async def write(self, data: bytes) -> None:
            raise trio.BrokenResourceError("gone")

    async def main() -> None:
        fs = FrameStream(Failing())
        await refused(fs, "stream_error")
        with pytest.raises(WireError) as info:
            await fs.write({"t": "close", "session": "s"})
        assert info.value.code == "stream_error"

    run(main)


# -- headers that are not what they should be -------------------------------------------


@pytest.mark.parametrize(
    "head",
    [
        b"\xff\xfe\xfd",  # not CBOR
        cbor2.dumps({"t": "step", "session": "s"})[:-1],  # CBOR cut short inside its length
        cbor2.dumps(["step", "s"]),  # not a map
        cbor2.dumps("step"),
        cbor2.dumps({"session": "s"}),  # no frame type
        cbor2.dumps({"t": "hello"}),  # unknown frame type
        cbor2.dumps({"t": 1}),
        cbor2.dumps({"t": None}),
    ],
    ids=["garbage", "cut-cbor", "array", "text", "no-t", "unknown-t", "int-t", "null-t"],
)
def test_a_header_that_is_not_a_frame_is_bad_frame(head: bytes) -> None:
    async def main() -> None:
        fs, peer = streams()
        await peer.write(struct.pack(">I", len(head)) + head)
        await refused(fs, "bad_frame")

    run(main)


@pytest.mark.parametrize(
    "fields, payload, code",
    [
        ({"dtype": "float64", "shape": [2]}, b"\0" * 16, "bad_input"),
        ({"dtype": None, "shape": [2]}, b"\0" * 16, "bad_input"),
        ({"dtype": 4, "shape": [1]}, b"\0" * 4, "bad_input"),
        ({"shape": [2]}, b"\0" * 16, "bad_input"),  # no dtype
        ({"dtype": "int64"}, b"\0" * 16, "bad_input"),  # no shape
        ({"dtype": "int64", "shape": "2"}, b"\0" * 16, "bad_input"),
        ({"dtype": "int64", "shape": []}, b"", "bad_input"),
        ({"dtype": "int64", "shape": [0]}, b"", "bad_input"),
        ({"dtype": "int64", "shape": [-2]}, b"\0" * 16, "bad_input"),
        ({"dtype": "int64", "shape": [2.0]}, b"\0" * 16, "bad_input"),
        ({"dtype": "int64", "shape": ["2"]}, b"\0" * 16, "bad_input"),
        ({"dtype": "float32", "shape": [1, 2, 2]}, b"\0" * 16, "bad_input"),  # three dimensions
        ({"dtype": "int64", "shape": [2]}, b"\0" * 15, "bad_input"),  # a byte short
        ({"dtype": "int64", "shape": [2]}, b"\0" * 17, "bad_input"),  # a byte over
        ({"dtype": "bfloat16", "shape": [3, 2]}, b"\0" * 24, "bad_input"),  # float32's size, not bfloat16's
        ({"dtype": "float32", "shape": [65, 64]}, b"", "too_large"),  # over the limit, before the size
    ],
)
def test_tensor_from_frame_refuses_a_header_that_lies(fields: dict, payload: bytes, code: str) -> None:
    with pytest.raises(WireError) as info:
        tensor_from_frame(Frame({**STEP, **fields}, payload), max_elements=64 * 64)
    assert info.value.code == code, info.value.message


# -- deadlines -------------------------------------------------------------------------


def test_idle_timeout_bounds_the_wait_for_a_frame_to_begin() -> None:
    async def main() -> None:
        fs, peer = streams()
        began = trio.current_time()
        await refused(fs, "timeout", idle_timeout=5)
        assert trio.current_time() - began == pytest.approx(5)

    run(main)


def test_without_idle_timeout_a_reader_waits_for_the_next_frame() -> None:
    async def main() -> None:
        fs, peer = streams()

        async def late() -> None:
            await trio.sleep(5 * FRAME_TIMEOUT)
            await peer.write(FRAME)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(late)
            assert (await fs.read_frame()).payload == struct.pack("<2q", 5, 6)

    run(main)


def test_a_begun_frame_must_complete_within_the_frame_timeout() -> None:
    """The idle timeout covers only the wait for a first byte; then the frame has
    ``FRAME_TIMEOUT`` to arrive whole, however long the idle timeout is."""

    async def main() -> None:
        fs, peer = streams()

        async def slowly(pause: float) -> None:
            await peer.write(FRAME[:1])
            await trio.sleep(pause)
            await peer.write(FRAME[1:])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slowly, FRAME_TIMEOUT - 1)
            assert (await fs.read_frame(idle_timeout=1)).payload == struct.pack("<2q", 5, 6)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(slowly, FRAME_TIMEOUT + 1)
            began = trio.current_time()
            await refused(fs, "timeout", idle_timeout=10 * FRAME_TIMEOUT)
            assert trio.current_time() - began == pytest.approx(FRAME_TIMEOUT)

    run(main)


def test_a_write_nobody_reads_gives_up_after_the_frame_timeout() -> None:
    async def main() -> None:
        fs, _ = streams(pair=trio.testing.lockstep_stream_pair)  # a write waits for its reader
        began = trio.current_time()
        with pytest.raises(WireError) as info:
            await fs.write({"t": "close", "session": "s"})
        assert info.value.code == "timeout" and trio.current_time() - began == pytest.approx(FRAME_TIMEOUT)

    run(main)


# -- writes ----------------------------------------------------------------------------


def test_a_cancelled_write_still_sends_the_whole_frame() -> None:
    """Half a frame would corrupt the stream for every later frame (and, under Noise,
    the whole connection): cancellation waits until the write is done."""
    payload = bytes(range(256)) * 400

    async def main() -> None:
        fs, peer = streams(pair=trio.testing.lockstep_stream_pair)
        reader = FrameStream(peer)

        async def read_late(got: list[Frame]) -> None:
            await trio.sleep(5)
            got.append(await reader.read_frame())

        got: list[Frame] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_late, got)
            with trio.move_on_after(1) as scope:
                await fs.write({**STEP, "dtype": "int64", "shape": [len(payload) // 8]}, payload)
            assert scope.cancel_called and trio.current_time() >= 5  # cancelled at 1 s, done when read at 5 s
        assert got[0].payload == payload

    run(main)


def test_concurrent_writes_do_not_interleave() -> None:
    """A hop relays errors upstream while it answers steps on the same stream."""
    sizes = [70_000, 50_000, 90_000]

    async def main() -> None:
        fs, peer = streams(pair=trio.testing.lockstep_stream_pair)
        reader = FrameStream(peer)
        async with trio.open_nursery() as nursery:
            for i, size in enumerate(sizes):
                nursery.start_soon(fs.write, {**STEP, "position": i}, bytes([i]) * size)
            got = [await reader.read_frame() for _ in sizes]
        assert sorted((f.header["position"], f.payload) for f in got) == [(i, bytes([i]) * s) for i, s in enumerate(sizes)]

    run(main)


def test_send_error_writes_the_error_frame_and_never_raises() -> None:
    async def main() -> None:
        fs, peer = streams()
        await fs.send_error("bad_input", "position 3 is not 2", "peer-a", session="s")
        await fs.send_error("internal", "oops", "peer-a")
        reader = FrameStream(peer)
        assert (await reader.read_frame()).header == {"t": "error", "code": "bad_input", "message": "position 3 is not 2", "peer": "peer-a", "session": "s"}
        assert (await reader.read_frame()).header == {"t": "error", "code": "internal", "message": "oops", "peer": "peer-a"}
        await fs.stream.reset()  # our own side is gone: writes fail
        await fs.send_error("internal", "nobody hears this", "peer-a")

    run(main)


# -- moving to another stream (hop links) ---------------------------------------------------


def test_switch_to_carries_the_next_frames_on_the_new_stream() -> None:
    async def main() -> None:
        fs, old_peer = streams()
        new_ours, new_peer = trio.testing.memory_stream_pair()
        await old_peer.write(encode_frame({"t": "result", "session": "s", "ok": True}))
        assert (await fs.read_frame()).header["ok"] is True
        original = fs.stream
        assert await fs.switch_to(TrioStream(new_ours)) is original
        await new_peer.send_all(FRAME)
        assert (await fs.read_frame()).payload == struct.pack("<2q", 5, 6)
        await fs.write({"t": "close", "session": "s"})
        assert cbor2.loads((await new_peer.receive_some())[4:]) == {"t": "close", "session": "s"}

    run(main)


def test_switch_to_refuses_while_the_old_stream_left_bytes_behind() -> None:
    async def main() -> None:
        fs, peer = streams()
        await peer.write(encode_frame({"t": "link", "session": "s"}) + FRAME[:3])  # more after the last frame
        await fs.read_frame()
        with pytest.raises(WireError) as info:
            await fs.switch_to(TrioStream(trio.testing.memory_stream_pair()[0]))
        assert info.value.code == "bad_frame"

    run(main)
