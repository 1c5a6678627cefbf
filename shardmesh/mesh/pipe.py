"""An in-process stream pair, for the one hop libp2p cannot make: a node to itself.

A gateway that also serves blocks appears in its own routes. libp2p cannot dial its
own peer id, so the chain's stream to itself is this pipe instead, and the stage server
handles it exactly like a network stream. It has the small part of the libp2p stream
interface that :class:`~shardmesh.mesh.wire.FrameStream` uses.
"""

from __future__ import annotations

import trio


class PipeEnd:
    """One end: ``write`` goes to the other end's ``read``."""

    def __init__(self, send: trio.MemorySendChannel[bytes], receive: trio.MemoryReceiveChannel[bytes]) -> None:
        self._send = send
        self._receive = receive
        self._pending = b""

    async def read(self, n: int | None = None) -> bytes:
        """Up to ``n`` bytes; ``b""`` once the other end has closed."""
        if not self._pending:
            try:
                self._pending = await self._receive.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                return b""
        if n is None or n >= len(self._pending):
            out, self._pending = self._pending, b""
        else:
            out, self._pending = self._pending[:n], self._pending[n:]
        return out

    async def write(self, data: bytes) -> None:
        try:
            await self._send.send(bytes(data))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise EOFError("the other end of the pipe is closed") from exc

    async def close(self) -> None:
        await self._send.aclose()

    async def reset(self) -> None:
        await self._send.aclose()
        await self._receive.aclose()


def pipe_pair() -> tuple[PipeEnd, PipeEnd]:
    # Bounded, like a network stream's window: a slow reader slows the writer down.
    a_send, b_receive = trio.open_memory_channel[bytes](16)
    b_send, a_receive = trio.open_memory_channel[bytes](16)
    return PipeEnd(a_send, a_receive), PipeEnd(b_send, b_receive)
