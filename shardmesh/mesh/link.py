"""Hop links: a session's own TCP connection to the next hop, keyed over libp2p.

Why: py-libp2p moves every frame through Yamux and Noise in pure Python, and a decode
step's small frame costs many times more that way than on a plain TCP socket with the
same encryption (docs/PERFORMANCE.md, "The network stack", has the figures and how to
measure them). A decode step crosses every hop of the chain, so that cost per hop was
most of what the mesh added to a token.

How: a session opens on a libp2p stream exactly as before (the peer is authenticated,
limits and routing checked, errors reported). Then, when both ends can, its frames move
to a link:

1. the opener's ``open`` (or ``attach``) header says ``"link": true``;
2. the answer's ``ok`` carries ``"link": {"port", "token", "key"}``: a fresh random
   16-byte token and 32-byte key. They are secret because they travel inside the
   Noise-encrypted stream, and authentic because that stream is bound to the peer id;
3. the opener dials TCP to the IP of its libp2p connection to that peer, on that port
   (by default the libp2p port itself: :mod:`.shared_port`), sends
   :data:`LINK_MAGIC` and the token, then a ``link`` frame on the libp2p stream, and
   closes that stream;
4. the answering node, on reading that frame, takes the connection, closes its side of
   the stream and confirms on the link (``{"t": "result", "linked": true}``); the opener
   sends nothing more until then, so no frame can go to the stream it has left;
5. from then on both ends read and write the session's frames on the link, each record
   sealed with ChaCha20-Poly1305 under the key.

Anyone can connect to the link port; without a live token the connection is dropped,
and without the key no record can be read, altered, replayed or forged. The frames on
a link are the same frames, with the same limits, as on the stream. A dial that fails
(a firewall, or a NAT that forwards only the libp2p port) leaves the session on its
libp2p stream, and that peer is not asked for a link again for a while.

A record::

    u32 big-endian length of the sealed bytes | ChaCha20-Poly1305(key, nonce, plaintext)

    nonce = u32 direction (0: dialer to listener, 1: listener to dialer) | u64 count

The count starts at 0 in each direction and goes up by one per record.

This module is the record layer (:class:`HopLink`) and the dial; offering, taking and
the upgrade of a session live in :mod:`.link_offers`.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from contextlib import asynccontextmanager
from typing import AsyncIterator

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305


TOKEN_BYTES = 16
LINK_MAGIC = b"/shardmesh/link\n"  # what a link connection starts with: 16 bytes, then its token
KEY_BYTES = 32
MAX_RECORD = 1 << 20  # plaintext bytes per record: a 3 MB prefill frame is 3 records
DIRECT_MAX = 64 << 10  # frames up to this size may be sent straight from the compute thread
SEAL_BYTES = 16  # the Poly1305 tag
DIAL_TIMEOUT = 2.0  # seconds to reach a link port; then the session stays on libp2p


class LinkError(Exception):
    """A link that failed: unreachable, a bad offer, or a record that does not open."""


class HopLink:
    """One end of a link, with the small stream interface :class:`~.wire.FrameStream`
    uses: ``read``, ``write``, ``close`` (our side is done: the peer reads an end of
    stream) and ``reset`` (drop the connection)."""

    def __init__(self, stream: trio.SocketStream, key: bytes, dialer: bool) -> None:
        self._stream = stream
        self._aead = ChaCha20Poly1305(key)
        self._send_prefix = struct.pack(">I", 0 if dialer else 1)
        self._recv_prefix = struct.pack(">I", 1 if dialer else 0)
        self._sent = 0
        self._received = 0
        self._raw = bytearray()
        self._plain = bytearray()
        self._send_lock = trio.Lock()  # one trio writer at a time
        self._lock = threading.Lock()  # the socket's writers: trio, or the compute thread
        self._busy = False  # a trio writer (or the tail of a send_now) holds the socket
        self._fd = stream.socket.fileno()
        self._token = trio.lowlevel.current_trio_token()
        self._eof_sent = False
        self._eof_seen = False
        self._closed = False

    # -- reading --------------------------------------------------------------------

    async def read(self, n: int | None = None) -> bytes:
        """Up to ``n`` bytes; ``b""`` once the peer has closed its side (or vanished)."""
        if not self._plain:
            record = await self._next_record()
            if record is None:
                return b""
            self._plain += record
        take = len(self._plain) if n is None else min(n, len(self._plain))
        out = bytes(self._plain[:take])
        del self._plain[:take]
        return out

    async def _next_record(self) -> bytes | None:
        if not await self._fill(4):
            return None
        (sealed,) = struct.unpack(">I", self._raw[:4])
        if not SEAL_BYTES < sealed <= MAX_RECORD + SEAL_BYTES:
            raise LinkError(f"a link record of {sealed} bytes")
        if not await self._fill(4 + sealed):
            raise LinkError("the link ended inside a record")
        nonce = self._recv_prefix + struct.pack(">Q", self._received)
        try:
            plain = self._aead.decrypt(nonce, bytes(self._raw[4 : 4 + sealed]), None)
        except InvalidTag as exc:
            raise LinkError("a link record failed authentication") from exc
        del self._raw[: 4 + sealed]
        self._received += 1
        return plain

    async def _fill(self, n: int) -> bool:
        """Buffer ``n`` raw bytes; False if the connection ended first."""
        while len(self._raw) < n:
            try:
                chunk = await self._stream.receive_some(max(n - len(self._raw), 1 << 16))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                chunk = b""
            if not chunk:
                self._eof_seen = True
                await self._release_if_done()
                return False
            self._raw += chunk
        return True

    # -- writing --------------------------------------------------------------------
    #
    # Two writers share the socket: trio tasks (``write``, ``close``), and the compute
    # thread, which sends a decode step's output the moment it exists (``send_now``)
    # instead of waking the event loop to do it, which would add a thread wake-up and a
    # write to every hop (docs/PERFORMANCE.md). ``_lock`` (a thread lock, never held across
    # an await) guards the record count and who may touch the socket; ``_busy`` says a
    # trio write (or the tail of a frame ``send_now`` began) is in flight, and then
    # ``send_now`` declines and other trio writers wait, so bytes never interleave.

    def _seal(self, data: bytes | bytearray | memoryview) -> bytes:
        """Records for ``data``; advances the count (call with ``_lock`` held)."""
        view = memoryview(data)
        parts = []
        for at in range(0, len(view), MAX_RECORD):
            nonce = self._send_prefix + struct.pack(">Q", self._sent)
            sealed = self._aead.encrypt(nonce, bytes(view[at : at + MAX_RECORD]), None)
            self._sent += 1
            parts += (struct.pack(">I", len(sealed)), sealed)
        return b"".join(parts)

    def send_now(self, data: bytes) -> bool:
        """From any thread: send ``data`` (1 to :data:`DIRECT_MAX` bytes) now, never
        waiting on a slow reader. False, having sent nothing, when a trio write is in
        flight, the link is closed, or the socket has no room: the caller then writes
        from trio. If only part of the frame fits, the rest is handed to a trio task,
        and every other writer waits until it is out."""
        if not data or len(data) > DIRECT_MAX:
            return False
        with self._lock:
            if self._busy or self._eof_sent or self._closed:
                return False
            count = self._sent
            out = memoryview(self._seal(data))
            try:
                written = os.write(self._fd, out)
            except BlockingIOError:
                written = 0
            except OSError:
                self._break()
                return True  # the frame is lost with the link; both ends see it end
            if written == 0:  # not a byte out: take the records back
                self._sent = count
                return False
            if written < len(out):
                self._busy = True  # the rest of the record must come next, from trio
                try:
                    self._token.run_sync_soon(trio.lowlevel.spawn_system_task, self._send_rest, bytes(out[written:]))
                except trio.RunFinishedError:
                    self._break()
            return True

    async def _send_rest(self, rest: bytes) -> None:
        """A system task (it must not raise): the tail of a frame ``send_now`` began."""
        try:
            await self._stream.send_all(rest)
        except Exception:
            self._break()
        finally:
            self._busy = False

    def _break(self) -> None:
        """Part of a record may be out: no byte may follow it. Both ends see the end."""
        self._eof_sent = True
        try:
            self._stream.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    @asynccontextmanager
    async def _holding_lock(self) -> AsyncIterator[None]:
        """``_lock`` from trio without blocking the event loop on the compute thread."""
        while not self._lock.acquire(blocking=False):
            await trio.sleep(0.0005)
        try:
            yield
        finally:
            self._lock.release()

    async def _claim_socket(self) -> None:
        """Become the socket's only writer: wait out ``send_now`` and a tail it left."""
        while True:
            async with self._holding_lock():
                if not self._busy:
                    self._busy = True
                    return
            await trio.sleep(0.0005)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        async with self._send_lock:
            await self._claim_socket()
            try:
                async with self._holding_lock():
                    if self._eof_sent or self._closed:
                        raise LinkError("the link is closed for writing")
                    sealed = self._seal(data)
                try:
                    await self._stream.send_all(sealed)
                except BaseException as exc:  # cut off by a deadline, or broken
                    self._break()
                    if isinstance(exc, (trio.BrokenResourceError, trio.ClosedResourceError)):
                        raise LinkError(f"the link broke: {exc}") from exc
                    raise
            finally:
                self._busy = False

    async def close(self) -> None:
        async with self._send_lock:
            await self._claim_socket()
            try:
                async with self._holding_lock():
                    if self._eof_sent or self._closed:
                        return
                    self._eof_sent = True
                try:
                    await self._stream.send_eof()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            finally:
                self._busy = False
        await self._release_if_done()

    async def reset(self) -> None:
        async with self._holding_lock():
            if self._closed:
                return
            self._closed = True
        try:
            # Linger 0: the peer gets a reset, not an orderly end.
            self._stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        await self._stream.aclose()

    async def _release_if_done(self) -> None:
        async with self._holding_lock():
            if not (self._eof_sent and self._eof_seen) or self._closed:
                return
            self._closed = True
        await self._stream.aclose()


async def dial(ip: str, offer: dict) -> HopLink:
    """Connect to the link ``offer`` (an ``ok`` header's ``link``) describes."""
    port, token, key = offer.get("port"), offer.get("token"), offer.get("key")
    if not (isinstance(port, int) and 0 < port < 65536):
        raise LinkError(f"bad link port {port!r}")
    if not (isinstance(token, bytes) and len(token) == TOKEN_BYTES and isinstance(key, bytes) and len(key) == KEY_BYTES):
        raise LinkError("a link offer needs a 16-byte token and a 32-byte key")
    stream = None
    try:
        with trio.fail_after(DIAL_TIMEOUT):
            stream = await trio.open_tcp_stream(ip, port)
            await stream.send_all(LINK_MAGIC + token)
    except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
        if stream is not None:
            await trio.aclose_forcefully(stream)
        raise LinkError(f"cannot reach link port {ip}:{port}: {exc}") from exc
    return HopLink(stream, key, dialer=True)
