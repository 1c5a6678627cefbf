"""Reading exactly n bytes from a stream that may return fewer per read."""

from __future__ import annotations

__all__ = ["read_exactly"]


async def read_exactly(stream, n: int) -> bytes:
    """``n`` bytes from ``stream`` (anything with ``async read(n)``); EOFError if it
    ends first. The caller bounds ``n`` and the time: a stranger chooses neither."""
    data = b""
    while len(data) < n:
        chunk = await stream.read(n - len(data))
        if not chunk:
            raise EOFError("the stream ended early")
        data += chunk
    return data
