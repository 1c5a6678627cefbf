"""A private swarm by pre-shared key: ``--swarm-key FILE``, libp2p's ``pnet`` (v1).

Every node of a private swarm holds the same 32-byte key. Each new TCP connection, before
multistream-select and Noise, starts with both sides sending 24 random bytes (their
nonce); from then on every byte each side writes is XORed with the XSalsa20 keystream of
(key, its own nonce), and every byte it reads with the keystream of (key, the other's
nonce). A peer without the key reads noise where the protocol negotiation should be, and
the connection fails before it is authenticated: it cannot gossip a record, query the
DHT, ask for the swarm map or open a session. Hop links need nothing more, since their
token and key are handed out only inside such a connection (:mod:`.link`).

The key only admits; it does not authenticate a peer (anyone holding the file is in)
and it adds nothing to Noise's confidentiality. ``--allow-peers`` names the peers; both
can be used together.

py-libp2p 0.8.1 has no ``pnet``, so :func:`require_swarm_key` wraps the transport
upgrader of a host: the raw connection is protected first, then secured as usual. No
Python library at hand offers XSalsa20 itself, but it is HSalsa20 (a key derivation,
written out below; one call per connection) followed by plain Salsa20 with the derived
key and the nonce's last 8 bytes, which pycryptodome (a py-libp2p dependency) has in C.
This is the same stream as js-libp2p's ``@libp2p/pnet`` and go-libp2p's, and the same
key file format::

    /key/swarm/psk/1.0.0/
    /base16/
    <64 hex digits>

``shardmesh swarm-key FILE`` writes a new one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import trio
from Crypto.Cipher import Salsa20

from .read_exactly import read_exactly

__all__ = ["SwarmKey", "SwarmKeyError", "protect", "read_swarm_key", "require_swarm_key", "write_new_swarm_key"]

HEADER = "/key/swarm/psk/1.0.0/"
KEY_BYTES = 32
NONCE_BYTES = 24
MAX_KEY_FILE = 1024  # a key file is about 90 bytes; anything much larger is not one
HANDSHAKE_TIMEOUT = 10.0  # seconds for the nonces to cross, like a dial's whole budget


class SwarmKeyError(ValueError):
    """The key file cannot be used; the message says why."""


@dataclass(frozen=True)
class SwarmKey:
    psk: bytes

    def fingerprint(self) -> str:
        """A short digest to compare between machines without showing the key."""
        return hashlib.sha256(b"shardmesh swarm key\n" + self.psk).hexdigest()[:12]

    def __repr__(self) -> str:  # never print the key itself
        return f"SwarmKey(fingerprint={self.fingerprint()})"


def parse_swarm_key(data: bytes) -> SwarmKey:
    """The key in a v1 key file (``/base16/``, ``/base64/`` or ``/bin/`` encoding)."""
    if len(data) > MAX_KEY_FILE:
        raise SwarmKeyError(f"{len(data)} bytes; a swarm key file is about 90")
    header, _, rest = data.partition(b"\n")
    if header.strip() != HEADER.encode():
        raise SwarmKeyError(f"the first line must be {HEADER}")
    codec, _, body = rest.partition(b"\n")
    codec = codec.strip()
    try:
        if codec == b"/base16/":
            psk = binascii.unhexlify(body.strip())
        elif codec == b"/base64/":
            psk = base64.b64decode(body.strip(), validate=True)
        elif codec == b"/bin/":
            psk = body
        else:
            raise SwarmKeyError(f"unknown encoding {codec[:20]!r} on line 2 (use /base16/)")
    except (binascii.Error, ValueError) as exc:
        if isinstance(exc, SwarmKeyError):
            raise
        raise SwarmKeyError(f"line 3 is not valid {codec.decode(errors='replace')} ({exc})") from exc
    if len(psk) != KEY_BYTES:
        raise SwarmKeyError(f"the key is {len(psk)} bytes; it must be {KEY_BYTES}")
    return SwarmKey(psk)


def read_swarm_key(path: str | Path) -> SwarmKey:
    """The key in ``path``; SwarmKeyError names the file and what is wrong with it."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_FILE + 1)
    except OSError as exc:
        raise SwarmKeyError(f"--swarm-key {path}: cannot read it ({exc.strerror or exc})") from exc
    try:
        return parse_swarm_key(data)
    except SwarmKeyError as exc:
        raise SwarmKeyError(f"--swarm-key {path}: {exc}") from exc


def write_new_swarm_key(path: str | Path) -> SwarmKey:
    """Write a fresh random key to ``path`` (readable by its owner only); never overwrite."""
    psk = os.urandom(KEY_BYTES)
    text = f"{HEADER}\n/base16/\n{psk.hex()}\n".encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise SwarmKeyError(f"{path} exists; a new key would lock its holders out of their swarm") from exc
    except OSError as exc:
        raise SwarmKeyError(f"{path}: cannot create it ({exc.strerror or exc})") from exc
    with os.fdopen(fd, "wb") as f:
        f.write(text)
    return SwarmKey(psk)


# --- XSalsa20 -----------------------------------------------------------------------------

_SIGMA = struct.unpack("<4I", b"expand 32-byte k")
_ROUNDS = (  # (a, b, c, d) for b ^= (a + d) <<< 7 and so on: the columns, then the rows
    (0, 4, 8, 12), (5, 9, 13, 1), (10, 14, 2, 6), (15, 3, 7, 11),
    (0, 1, 2, 3), (5, 6, 7, 4), (10, 11, 8, 9), (15, 12, 13, 14),
)  # fmt: skip


def _rotl(v: int, n: int) -> int:
    return ((v << n) | (v >> (32 - n))) & 0xFFFFFFFF


def hsalsa20(key: bytes, nonce16: bytes) -> bytes:
    """The 32-byte key XSalsa20 derives from ``key`` and the first 16 bytes of its nonce."""
    k = struct.unpack("<8I", key)
    n = struct.unpack("<4I", nonce16)
    x = [_SIGMA[0], *k[:4], _SIGMA[1], *n, _SIGMA[2], *k[4:], _SIGMA[3]]
    for _ in range(10):
        for y0, y1, y2, y3 in _ROUNDS:
            x[y1] ^= _rotl((x[y0] + x[y3]) & 0xFFFFFFFF, 7)
            x[y2] ^= _rotl((x[y1] + x[y0]) & 0xFFFFFFFF, 9)
            x[y3] ^= _rotl((x[y2] + x[y1]) & 0xFFFFFFFF, 13)
            x[y0] ^= _rotl((x[y3] + x[y2]) & 0xFFFFFFFF, 18)
    return struct.pack("<8I", x[0], x[5], x[10], x[15], x[6], x[7], x[8], x[9])


def xsalsa20(key: bytes, nonce: bytes):
    """A stateful XSalsa20 keystream: ``.encrypt(data)`` XORs the next ``len(data)`` bytes."""
    if len(key) != KEY_BYTES or len(nonce) != NONCE_BYTES:
        raise ValueError("XSalsa20 takes a 32-byte key and a 24-byte nonce")
    return Salsa20.new(key=hsalsa20(key, nonce[:16]), nonce=nonce[16:])


# --- the protected connection --------------------------------------------------------------


class ProtectedStream:
    """A raw connection's byte stream with each direction XORed with its keystream.

    Each direction is encrypted and handed on under its own lock, so the keystream's
    order is the order of the bytes on the wire however many tasks write."""

    def __init__(self, inner, outgoing, incoming) -> None:
        self._inner = inner
        self._out = outgoing
        self._in = incoming
        self._write_lock = trio.Lock()
        self._read_lock = trio.Lock()

    async def write(self, data: bytes) -> None:
        async with self._write_lock:
            await self._inner.write(self._out.encrypt(bytes(data)))

    async def read(self, n: int | None = None) -> bytes:
        async with self._read_lock:
            data = await self._inner.read(n)
            return self._in.decrypt(data) if data else data

    async def close(self) -> None:
        await self._inner.close()

    def __getattr__(self, name: str):  # addresses and the like come from the socket
        return getattr(self._inner, name)


async def protect(stream, key: SwarmKey) -> ProtectedStream:
    """Exchange nonces on ``stream`` (a fresh connection) and return it protected.

    Raises trio.TooSlowError after HANDSHAKE_TIMEOUT, EOFError if the peer hangs up."""
    local = os.urandom(NONCE_BYTES)
    with trio.fail_after(HANDSHAKE_TIMEOUT):
        await stream.write(local)
        try:
            remote = await read_exactly(stream, NONCE_BYTES)
        except EOFError:
            raise EOFError("the peer closed the connection before sending its nonce") from None
    return ProtectedStream(stream, xsalsa20(key.psk, local), xsalsa20(key.psk, remote))


def require_swarm_key(host, key: SwarmKey) -> None:
    """Make every connection of ``host`` (a py-libp2p host) start with the key exchange.

    Outbound and inbound connections alike pass through the upgrader's
    ``upgrade_security``; the raw connection's stream is protected just before it."""
    from libp2p.transport.exceptions import SecurityUpgradeFailure

    upgrader = host.get_network().upgrader
    secure = upgrader.upgrade_security

    async def upgrade_security(raw_conn, is_initiator: bool, peer_id=None):
        if not hasattr(raw_conn, "stream"):  # fail closed on a transport we do not know
            raise SecurityUpgradeFailure(f"cannot protect a {type(raw_conn).__name__} with the swarm key")
        try:
            raw_conn.stream = await protect(raw_conn.stream, key)
        except Exception as exc:  # a timeout, a hang-up, a reset: no connection
            raise SecurityUpgradeFailure(f"swarm key exchange failed: {str(exc) or type(exc).__name__}") from exc
        try:
            return await secure(raw_conn, is_initiator, peer_id)
        except SecurityUpgradeFailure as exc:
            # With another key (or none) the peer's negotiation reads as noise.
            raise SecurityUpgradeFailure(f"{exc} (does the peer hold the same --swarm-key?)") from exc

    upgrader.upgrade_security = upgrade_security
