"""Offering hop links and moving sessions onto them (steps 1 to 5 of :mod:`.link`).

The answering side: a :class:`LinkListener` accepts connections on the link port (or
takes them from the shared libp2p port) and hands each to the session hop whose
one-time token it shows; :func:`offer_fields` and
:func:`accept_link` are its part of the upgrade. The opening side:
:func:`request_fields` and :func:`upgrade_opener`. :class:`Links` is a node's state for
both (its listener, and the peers whose link port it could not reach lately).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import trio

from .host import close_quietly, remote_ip
from .link import KEY_BYTES, LINK_MAGIC, TOKEN_BYTES, HopLink, LinkError, dial
from .wire import ERROR, LINK, RESULT, FrameStream, StreamEnded, WireError

log = logging.getLogger("shardmesh.mesh.link_offers")

TOKEN_TIMEOUT = 5.0  # a connection must show its token within this
OFFER_LIFETIME = 60.0  # seconds an offered token stays valid
ARRIVAL_WAIT = 5.0  # seconds the listener waits for a linked opener's connection
MAX_UNIDENTIFIED = 64  # connections waiting to show a token (past this, the oldest is dropped)
MAX_OFFERS = 4096
RETRY_AFTER = 300.0  # seconds before a peer whose link port we could not reach is tried again
CONFIRM_WAIT = ARRIVAL_WAIT + 1.0  # seconds the opener waits for the other end to confirm


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

    def __init__(self, listeners: list[trio.SocketListener], port: int | None = None) -> None:
        self._listeners = listeners
        self.port: int = port if port is not None else listeners[0].socket.getsockname()[1]
        self._offers: dict[bytes, _Offer] = {}
        self._unidentified: list[trio.CancelScope] = []  # oldest first
        self._nursery: trio.Nursery | None = None

    @classmethod
    async def bind(cls, host: str, port: int = 0) -> "LinkListener":
        """Listening on ``host:port`` (0: any free port); raises OSError if it cannot."""
        return cls(await trio.open_tcp_listeners(port, host=host))

    @classmethod
    def on_shared_port(cls, port: int) -> "LinkListener":
        """No socket of its own: links come in on the libp2p port, handed over by
        :func:`.shared_port.share_port` through :meth:`adopt`."""
        return cls([], port)

    async def run(self) -> None:
        # Not trio.serve_listeners: it closes each connection when its handler returns,
        # and a link outlives the task that identified it.
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(trio.sleep_forever)  # adopted links arrive at any time
            for listener in self._listeners:
                nursery.start_soon(self._accept_loop, listener, nursery)

    def adopt(self, stream: trio.SocketStream) -> None:
        """A connection from the shared port that showed :data:`~.link.LINK_MAGIC`;
        its token comes next."""
        if self._nursery is None:
            stream.socket.close()
            return
        self._nursery.start_soon(self._accept, stream, LINK_MAGIC)

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
        except (trio.EndOfChannel, trio.ClosedResourceError) as exc:  # expired while waiting
            raise LinkError("the link offer has expired") from exc
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

    async def _accept(self, stream: trio.SocketStream, head: bytes = b"") -> None:
        try:
            await self._identify(stream, head)
        except Exception as exc:  # nothing a stranger sends may stop the listener
            log.warning("a link connection failed: %s: %s", type(exc).__name__, exc)
            await stream.aclose()

    async def _identify(self, stream: trio.SocketStream, head: bytes) -> None:
        """Read the greeting (:data:`~.link.LINK_MAGIC`, then a token; ``head`` is what
        was read of it already) and hand the connection to the offer it names."""
        # Connections still waiting to show a token are bounded; past the bound the
        # oldest is dropped, not the newest: an opener sends its token at once, so
        # strangers holding connections open cannot lock real links out.
        waiting = trio.CancelScope(deadline=trio.current_time() + TOKEN_TIMEOUT)
        self._unidentified.append(waiting)
        if len(self._unidentified) > MAX_UNIDENTIFIED:
            self._unidentified.pop(0).cancel()
        greeting = head
        size = len(LINK_MAGIC) + TOKEN_BYTES
        try:
            with waiting:
                while len(greeting) < size and LINK_MAGIC.startswith(greeting[: len(LINK_MAGIC)]):
                    chunk = await stream.receive_some(size - len(greeting))
                    if not chunk:
                        break
                    greeting += chunk
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            greeting = b""
        finally:
            if waiting in self._unidentified:
                self._unidentified.remove(waiting)
        token = greeting[len(LINK_MAGIC):]
        entry = self._offers.get(token) if greeting.startswith(LINK_MAGIC) and len(token) == TOKEN_BYTES else None
        if entry is None:
            await stream.aclose()
            return
        try:
            entry.arrived.send_nowait(stream)
        except (trio.WouldBlock, trio.ClosedResourceError):  # the token was used already
            await stream.aclose()


@dataclass
class Links:
    """A node's side of links: its listener (None: it offers none) and which peers it
    should not try to dial for a while."""

    listener: LinkListener | None = None
    dial_enabled: bool = True
    taken: int = 0  # session hops moved to a link, at either end (``/metrics``)
    _unreachable: dict[str, float] = field(default_factory=dict)

    def may_dial(self, peer: str) -> bool:
        return self.dial_enabled and self._unreachable.get(peer, 0.0) <= time.monotonic()

    def unreachable(self, peer: str) -> None:
        self._unreachable[peer] = time.monotonic() + RETRY_AFTER


# -- the upgrade, as the two ends of a libp2p stream see it ----------------------------


def request_fields(links: Links | None, fs: FrameStream, peer: str) -> dict:
    """Header fields for an ``open`` or ``attach`` that ask ``peer`` for a link."""
    if links is not None and links.may_dial(peer) and remote_ip(fs.stream) is not None:
        return {"link": True}
    return {}


async def upgrade_opener(links: Links | None, fs: FrameStream, ok: dict, peer: str, session: str) -> None:
    """The opener's step 3: dial the offered link and move ``fs`` onto it. Without an
    offer, or when the dial fails, ``fs`` stays on its libp2p stream."""
    offer = ok.get("link")
    ip = remote_ip(fs.stream)
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
        old = await fs.switch_to(link)
    except WireError:
        await link.reset()
        raise
    await close_quietly(old)
    # Nothing goes out until the other end has moved too: before that, what it writes
    # (a token, an error) would still go to the stream we just left. No confirmation
    # means the link is no use (the connection never reached the session, or the port
    # is not the node's): the session fails, and the next one stays on libp2p.
    try:
        reply = await fs.read_frame(idle_timeout=CONFIRM_WAIT)
    except (StreamEnded, WireError) as exc:
        links.unreachable(peer)
        raise WireError("link_failed", f"the link to {peer} was not confirmed: {exc}") from exc
    if reply.type == ERROR:
        raise WireError(str(reply.header.get("code", "error")), str(reply.header.get("message", "")))
    if reply.type != RESULT or reply.header.get("linked") is not True:
        raise WireError("bad_frame", f"a link was answered with {reply.type}")
    links.taken += 1


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


async def accept_link(links: Links | None, fs: FrameStream, offer: Offer | None, session: str) -> None:
    """The answering side's step 4, on reading a ``link`` frame: move ``fs`` onto the
    link the opener made for ``offer``, and confirm on it. Raises :class:`WireError` if
    there is none."""
    if offer is None or links is None or links.listener is None:
        raise WireError("bad_frame", "a link frame without a link offer")
    try:
        link = await links.listener.take(offer)
    except LinkError as exc:
        raise WireError("link_failed", str(exc)) from exc
    try:
        old = await fs.switch_to(link)
    except WireError:
        await link.reset()
        raise
    await close_quietly(old)
    links.taken += 1
    await fs.write({"t": RESULT, "session": session, "linked": True})
