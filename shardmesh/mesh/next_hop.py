"""The downstream side of a hop: opening the rest of the chain, and hearing back from it.

Each hop that is not the last opens a stream to the next one and forwards the ``open``
with the route shortened by one hop (docs/PROTOCOL.md, 6.2). While the session runs,
nothing flows back on that stream except an error, which is passed towards the gateway
unchanged, since it already names the peer that failed (docs/PROTOCOL.md, 6.3).
"""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable

import trio

from .hop_session import HopSession
from .host import close_quietly, reset_quietly
from .link_offers import Links, request_fields, upgrade_opener
from .wire import ERROR, RESULT, Frame, FrameStream, StreamEnded, WireError

log = logging.getLogger("shardmesh.mesh.next_hop")

OPEN_TIMEOUT = 60.0  # the rest of the chain must open within this (loading is done already)

__all__ = ["OPEN_TIMEOUT", "open_next_hop", "relay_back"]


async def open_next_hop(
    open_stream: Callable[[str], Awaitable[Any]],
    links: Links | None,
    max_payload: int,
    frame: Frame,
    route: list[dict],
) -> FrameStream:
    """Open the rest of the chain; a :class:`WireError` naming the failed peer if not.

    ``frame`` is the ``open`` this hop received and ``route`` its validated route (this
    hop first). The next hop may move the session to a hop link (``links``).
    """
    nxt = route[1]["peer"]
    try:
        stream = await open_stream(nxt)
    except Exception as exc:
        raise WireError("peer_unreachable", f"cannot reach the next hop: {exc}", nxt) from exc
    downstream = FrameStream(stream, max_payload=max_payload)
    header = {k: v for k, v in frame.header.items() if k != "link"}  # the upstream's wish, not ours
    header.update(route=route[1:], **request_fields(links, downstream, nxt))
    try:
        await downstream.write(header, frame.payload)
    except WireError as exc:
        await reset_quietly(stream)
        raise WireError("peer_lost", f"the next hop went away during open: {exc.message}", nxt) from exc
    try:
        reply = await downstream.read_frame(idle_timeout=OPEN_TIMEOUT)
    except (StreamEnded, WireError) as exc:
        await reset_quietly(stream)
        raise WireError("peer_lost", f"the next hop did not answer open: {exc}", nxt) from exc
    if reply.type == ERROR:
        # Pass it on as it is: it names the peer that refused.
        await close_quietly(stream)
        h = reply.header
        raise WireError(str(h.get("code", "error")), str(h.get("message", "")), str(h.get("peer", nxt)))
    if reply.type != RESULT or reply.header.get("ok") is not True:
        await reset_quietly(stream)
        raise WireError("bad_frame", f"the next hop answered open with {reply.type}")
    try:
        await upgrade_opener(links, downstream, reply.header, nxt, frame.header["session"])
    except WireError as exc:
        await reset_quietly(downstream.stream)
        raise WireError("peer_lost", f"the next hop went away during open: {exc.message}", nxt) from exc
    return downstream


async def relay_back(session: HopSession, downstream: FrameStream, upstream: FrameStream, nxt: str, done: trio.Event) -> None:
    """Errors from further down travel back towards the gateway, which then ends
    the session. The next hop closing its side is the normal end (after ours).
    Sets ``done`` when the next hop's stream has ended, whichever way."""
    try:
        frame = await downstream.read_frame()
        if frame.type == ERROR:
            await upstream.write(frame.header)
        else:
            await upstream.send_error("bad_frame", f"unexpected {frame.type} from the next hop", nxt, session.session)
    except (StreamEnded, WireError) as exc:
        if not session.closing:
            log.debug("session %s: next hop %s went away: %r", session.id, nxt, exc)
            await upstream.send_error("peer_lost", f"the next hop went away: {exc!r}", nxt, session.session)
    except Exception as exc:  # a write to a vanished upstream: the session is over anyway
        log.debug("session %s: relaying back failed: %r", session.id, exc)
    finally:
        done.set()
