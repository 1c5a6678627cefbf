"""One port for libp2p and hop links: a new connection's first bytes say which.

Behind a NAT a user forwards one port, as for any libp2p program. So by default hop
links (:mod:`.link`) are accepted on the libp2p listening port: every connection a
link opener makes starts with :data:`~.link.LINK_MAGIC`, 16 fixed bytes, and nothing
libp2p sends starts so (multistream-select's first byte is its length, 0x13; in a
private swarm the first 24 bytes are a random nonce, equal to the magic once in 2^128).

:func:`share_port` wraps the handler of each of the host's TCP listeners: it reads a
new connection's first bytes, as many as it takes to tell (one, for libp2p), and hands
the connection to the link listener or, with those bytes put back in front, to
py-libp2p. At most :data:`MAX_UNDECIDED` connections wait to show their first bytes,
each for at most :data:`HEAD_TIMEOUT` seconds; past that bound a new connection goes
to py-libp2p at once, whose own limits then apply.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Callable

import trio

from .link import LINK_MAGIC

log = logging.getLogger("shardmesh.mesh.shared_port")

__all__ = ["HEAD_TIMEOUT", "MAX_UNDECIDED", "PeekedStream", "share_port"]

HEAD_TIMEOUT = 10.0  # s a new connection has to show its first bytes
MAX_UNDECIDED = 64  # connections waiting to show them


class PeekedStream:
    """A py-libp2p TCP stream with the bytes already read put back in front."""

    def __init__(self, inner, head: bytes) -> None:
        self._inner = inner
        self._head = head

    async def read(self, n: int | None = None) -> bytes:
        if self._head:
            size = len(self._head) if n is None or n <= 0 else n
            out, self._head = self._head[:size], self._head[size:]
            return out
        return await self._inner.read(n)

    def __getattr__(self, name: str):  # write, close, get_remote_address, ...
        return getattr(self._inner, name)


def _detached(tcp_stream) -> trio.SocketStream:
    """A socket stream of its own on the same connection: py-libp2p closes its stream
    when its handler returns, and a link outlives the handler."""
    fd = os.dup(tcp_stream.stream.socket.fileno())
    return trio.SocketStream(trio.socket.from_stdlib_socket(socket.socket(fileno=fd)))


async def _first_bytes(tcp_stream) -> bytes:
    """Up to ``len(LINK_MAGIC)`` bytes, stopping at the first that differs from it."""
    head = b""
    with trio.move_on_after(HEAD_TIMEOUT):
        while len(head) < len(LINK_MAGIC) and LINK_MAGIC.startswith(head):
            chunk = await tcp_stream.read(len(LINK_MAGIC) - len(head))
            if not chunk:
                break
            head += chunk
    return head


def share_port(py_host, adopt: Callable[[trio.SocketStream], None]) -> int:
    """Send link connections arriving on ``py_host``'s TCP listeners to ``adopt`` (the
    magic already read, the token next); the rest to py-libp2p. Returns how many
    listeners now share their port."""
    undecided = [0]
    shared = 0
    for listener in py_host.get_network().listeners.values():
        original = getattr(listener, "handler", None)
        if original is None:  # not a TCP listener
            continue

        async def demultiplexed(tcp_stream, original=original) -> None:
            if undecided[0] >= MAX_UNDECIDED:
                await original(tcp_stream)
                return
            undecided[0] += 1
            try:
                head = await _first_bytes(tcp_stream)
            except Exception as exc:  # noqa: BLE001 - the stranger hung up: nothing to hand on
                log.debug("a new connection failed before its first bytes: %r", exc)
                return
            finally:
                undecided[0] -= 1
            if head == LINK_MAGIC:
                adopt(_detached(tcp_stream))
                return
            await original(PeekedStream(tcp_stream, head))

        listener.handler = demultiplexed
        shared += 1
    return shared
