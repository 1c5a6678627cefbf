"""Hop links: a session's own TCP connection to the next hop, keyed over libp2p.

Why: py-libp2p moves every frame through Yamux and Noise in pure Python. Measured on
this project's 2-core VM, a decode step's 1.5 KB frame took ~1 ms from one hop's write
to the next hop's read; a plain TCP socket with the same encryption takes ~0.08 ms. A
decode step crosses every hop of the chain, so that millisecond per hop was most of what
the mesh added to a token.

How: a session opens on a libp2p stream exactly as before (the peer is authenticated,
limits and routing checked, errors reported). Then, when both ends can, its frames move
to a link:

1. the opener's ``open`` (or ``attach``) header says ``"link": true``;
2. the answer's ``ok`` carries ``"link": {"port", "token", "key"}``: a fresh random
   16-byte token and 32-byte key. They are secret because they travel inside the
   Noise-encrypted stream, and authentic because that stream is bound to the peer id;
3. the opener dials TCP to the IP of its libp2p connection to that peer, on that port,
   sends the token, then sends a ``link`` frame on the libp2p stream and closes it;
4. from then on both ends read and write the session's frames on the link, each record
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
"""

from __future__ import annotations

import logging
import os
import select
import socket
import struct
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from .host import close_quietly
from .wire import LINK, FrameStream, WireError

log = logging.getLogger("shardmesh.mesh.link")

TOKEN_BYTES = 16
KEY_BYTES = 32
MAX_RECORD = 1 << 20  # plaintext bytes per record: a 3 MB prefill frame is 3 records
DIRECT_MAX = 64 << 10  # frames up to this size may be sent straight from the compute thread
SEAL_BYTES = 16  # the Poly1305 tag
DIAL_TIMEOUT = 2.0  # seconds to reach a link port; then the session stays on libp2p
TOKEN_TIMEOUT = 5.0  # a connection must show its token within this
OFFER_LIFETIME = 60.0  # seconds an offered token stays valid
ARRIVAL_WAIT = 5.0  # seconds the listener waits for a linked opener's connection
MAX_UNIDENTIFIED = 64  # connections waiting to show a token (past this, the oldest is dropped)
MAX_OFFERS = 4096
RETRY_AFTER = 300.0  # seconds before a peer whose link port we could not reach is tried again


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
        self._busy = False  # a trio write holds the socket
        self._fd = stream.socket.fileno()
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
    # instead of waking the event loop to do it: on a 2-core VM that wake-up and the
    # write after it cost ~0.5 ms per hop. ``_lock`` (a thread lock, never held across
    # an await) guards the record count and who may touch the socket; ``_busy`` says a
    # trio write is in flight, and then ``send_now`` declines so bytes never interleave.

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

    def send_now(self, data: bytes, timeout: float = 5.0) -> bool:
        """From any thread: send ``data`` (1 to :data:`DIRECT_MAX` bytes) now. False,
        having sent nothing, when a trio write is in flight or the link is closed: the
        caller then writes from trio. If the socket has no room for ``timeout`` s (or
        fails), the link is shut down: the frame is lost with it, and both ends see the
        link end."""
        if not data or len(data) > DIRECT_MAX:
            return False
        with self._lock:
            if self._busy or self._eof_sent or self._closed:
                return False
            out = memoryview(self._seal(data))
            deadline = time.monotonic() + timeout
            room = None
            while out:
                try:
                    out = out[os.write(self._fd, out) :]
                except BlockingIOError:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    if room is None:  # poll, not select: a busy node's fds go past 1024
                        room = select.poll()
                        room.register(self._fd, select.POLLOUT)
                    room.poll(left * 1000)
                except OSError:
                    break
            if out:
                self._eof_sent = True  # part of a record may be out: no byte may follow
                try:
                    self._stream.socket.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            return True

    @asynccontextmanager
    async def _holding_lock(self) -> AsyncIterator[None]:
        """``_lock`` from trio without blocking the event loop while ``send_now`` waits
        for room in the socket."""
        while not self._lock.acquire(blocking=False):
            await trio.sleep(0.0005)
        try:
            yield
        finally:
            self._lock.release()

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        async with self._send_lock:
            async with self._holding_lock():
                if self._eof_sent or self._closed:
                    raise LinkError("the link is closed for writing")
                sealed = self._seal(data)
                self._busy = True
            try:
                await self._stream.send_all(sealed)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise LinkError(f"the link broke: {exc}") from exc
            finally:
                self._busy = False

    async def close(self) -> None:
        async with self._send_lock:
            async with self._holding_lock():
                if self._eof_sent or self._closed:
                    return
                self._eof_sent = True
            try:
                await self._stream.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
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


@dataclass
class _Offer:
    key: bytes
    expires: float
    arrived: trio.MemorySendChannel
    waiting: trio.MemoryReceiveChannel


@dataclass
class Offer:
    """What an ``ok`` header carries (``fields``) and what the listener waits on."""

    token: bytes
    fields: dict


class LinkListener:
    """Accepts the links this node offered. :meth:`run` must be running in a nursery."""

    def __init__(self, listeners: list[trio.SocketListener]) -> None:
        self._listeners = listeners
        self.port: int = listeners[0].socket.getsockname()[1]
        self._offers: dict[bytes, _Offer] = {}
        self._unidentified: list[trio.CancelScope] = []  # oldest first

    @classmethod
    async def bind(cls, host: str, port: int = 0) -> "LinkListener":
        """Listening on ``host:port`` (0: any free port); raises OSError if it cannot."""
        return cls(await trio.open_tcp_listeners(port, host=host))

    async def run(self) -> None:
        # Not trio.serve_listeners: it closes each connection when its handler returns,
        # and a link outlives the task that identified it.
        async with trio.open_nursery() as nursery:
            for listener in self._listeners:
                nursery.start_soon(self._accept_loop, listener, nursery)

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:  # out of file descriptors, for one: wait, then go on
                log.warning("link listener: %s", exc)
                await trio.sleep(0.1)
                continue
            nursery.start_soon(self._accept, stream)

    def offer(self) -> Offer:
        """A fresh token and key for one session hop."""
        now = time.monotonic()
        for token in [t for t, o in self._offers.items() if o.expires < now]:
            self._drop(token)
        if len(self._offers) >= MAX_OFFERS:
            raise LinkError("too many link offers outstanding")
        token, key = os.urandom(TOKEN_BYTES), os.urandom(KEY_BYTES)
        arrived, waiting = trio.open_memory_channel[trio.SocketStream](1)
        self._offers[token] = _Offer(key, now + OFFER_LIFETIME, arrived, waiting)
        return Offer(token, {"port": self.port, "token": token, "key": key})

    async def take(self, offer: Offer) -> HopLink:
        """The connection the opener made for ``offer``, once it has arrived."""
        entry = self._offers.get(offer.token)
        if entry is None:
            raise LinkError("the link offer has expired")
        try:
            with trio.move_on_after(ARRIVAL_WAIT):
                stream = await entry.waiting.receive()
                return HopLink(stream, entry.key, dialer=False)
            raise LinkError(f"the opener's link connection did not arrive within {ARRIVAL_WAIT:.0f} s")
        finally:
            self._drop(offer.token)

    def withdraw(self, offer: Offer) -> None:
        """The session ended without taking its link."""
        self._drop(offer.token)

    def _drop(self, token: bytes) -> None:
        entry = self._offers.pop(token, None)
        if entry is None:
            return
        entry.arrived.close()
        try:
            stream = entry.waiting.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel):
            return
        # Arrived but never claimed: its socket is closed outright.
        stream.socket.close()

    async def _accept(self, stream: trio.SocketStream) -> None:
        try:
            await self._identify(stream)
        except Exception as exc:  # nothing a stranger sends may stop the listener
            log.warning("a link connection failed: %s: %s", type(exc).__name__, exc)
            await stream.aclose()

    async def _identify(self, stream: trio.SocketStream) -> None:
        # Connections still waiting to show a token are bounded; past the bound the
        # oldest is dropped, not the newest: an opener sends its token at once, so
        # strangers holding connections open cannot lock real links out.
        waiting = trio.CancelScope(deadline=trio.current_time() + TOKEN_TIMEOUT)
        self._unidentified.append(waiting)
        if len(self._unidentified) > MAX_UNIDENTIFIED:
            self._unidentified.pop(0).cancel()
        token = b""
        try:
            with waiting:
                while len(token) < TOKEN_BYTES:
                    chunk = await stream.receive_some(TOKEN_BYTES - len(token))
                    if not chunk:
                        break
                    token += chunk
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            token = b""
        finally:
            if waiting in self._unidentified:
                self._unidentified.remove(waiting)
        entry = self._offers.get(token) if len(token) == TOKEN_BYTES else None
        if entry is None:
            await stream.aclose()
            return
        try:
            entry.arrived.send_nowait(stream)
        except (trio.WouldBlock, trio.ClosedResourceError):  # the token was used already
            await stream.aclose()


async def dial(ip: str, offer: dict) -> HopLink:
    """Connect to the link ``offer`` (an ``ok`` header's ``link``) describes."""
    port, token, key = offer.get("port"), offer.get("token"), offer.get("key")
    if not (isinstance(port, int) and 0 < port < 65536):
        raise LinkError(f"bad link port {port!r}")
    if not (isinstance(token, bytes) and len(token) == TOKEN_BYTES and isinstance(key, bytes) and len(key) == KEY_BYTES):
        raise LinkError("a link offer needs a 16-byte token and a 32-byte key")
    try:
        with trio.fail_after(DIAL_TIMEOUT):
            stream = await trio.open_tcp_stream(ip, port)
            await stream.send_all(token)
    except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
        raise LinkError(f"cannot reach link port {ip}:{port}: {exc}") from exc
    return HopLink(stream, key, dialer=True)


@dataclass
class Links:
    """A node's side of links: its listener (None: it offers none) and which peers it
    should not try to dial for a while."""

    listener: LinkListener | None = None
    dial_enabled: bool = True
    _unreachable: dict[str, float] = field(default_factory=dict)

    def may_dial(self, peer: str) -> bool:
        return self.dial_enabled and self._unreachable.get(peer, 0.0) <= time.monotonic()

    def unreachable(self, peer: str) -> None:
        self._unreachable[peer] = time.monotonic() + RETRY_AFTER


# -- the upgrade, as the two ends of a libp2p stream see it ----------------------------


def _remote_ip(stream) -> str | None:
    """The IP of the libp2p connection under ``stream`` (None for the in-process pipe)."""
    address = getattr(stream, "get_remote_address", lambda: None)()
    return address[0] if address else None


def request_fields(links: Links | None, fs: FrameStream, peer: str) -> dict:
    """Header fields for an ``open`` or ``attach`` that ask ``peer`` for a link."""
    if links is not None and links.may_dial(peer) and _remote_ip(fs.stream) is not None:
        return {"link": True}
    return {}


async def upgrade_opener(links: Links | None, fs: FrameStream, ok: dict, peer: str, session: str) -> None:
    """The opener's step 3: dial the offered link and move ``fs`` onto it. Without an
    offer, or when the dial fails, ``fs`` stays on its libp2p stream."""
    offer = ok.get("link")
    ip = _remote_ip(fs.stream)
    if links is None or not isinstance(offer, dict) or ip is None:
        return
    try:
        link = await dial(ip, offer)
    except LinkError as exc:
        log.info("no link to %s (%s); staying on libp2p for %.0f s", peer, exc, RETRY_AFTER)
        links.unreachable(peer)
        return
    try:
        await fs.write({"t": LINK, "session": session})
    except WireError:
        await link.reset()
        raise
    await close_quietly(await fs.switch_to(link))


def offer_fields(links: Links | None, request: dict) -> tuple[Offer | None, dict]:
    """The answering side's step 2: an offer for an ``ok`` header, if one was asked for."""
    if request.get("link") is not True or links is None or links.listener is None:
        return None, {}
    try:
        offer = links.listener.offer()
    except LinkError as exc:
        log.warning("offering no link: %s", exc)
        return None, {}
    return offer, {"link": offer.fields}


def withdraw(links: Links | None, offer: Offer | None) -> None:
    """The session hop ended: its offer, if still open, can no longer be taken."""
    if offer is not None and links is not None and links.listener is not None:
        links.listener.withdraw(offer)


async def accept_link(links: Links | None, fs: FrameStream, offer: Offer | None) -> None:
    """The answering side's step 4, on reading a ``link`` frame: move ``fs`` onto the
    link the opener made for ``offer``. Raises :class:`WireError` if there is none."""
    if offer is None or links is None or links.listener is None:
        raise WireError("bad_frame", "a link frame without a link offer")
    try:
        link = await links.listener.take(offer)
    except LinkError as exc:
        raise WireError("link_failed", str(exc)) from exc
    await close_quietly(await fs.switch_to(link))
