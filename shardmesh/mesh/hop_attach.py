"""The gateway's result stream on the last hop: ``attach`` (docs/PROTOCOL.md 6.2).

The last hop of a chain has no next hop; the gateway opens a second stream to it and
attaches to the session, and the last hop sends each sampled token there. Only the
session's own gateway may attach, and only once. The gateway only listens on this
stream (after moving it to a hop link, if it asked for one): it ends the session through
the chain, and here the hop only notices it leaving. A gateway with a results trunk here
(trunk_server.py) may attach with ``trunk: true``: the tokens then go on that trunk, and
this stream carries only errors.
"""

from __future__ import annotations

import logging
from typing import Iterable, Mapping

import trio

from .hop_session import HopSession
from .host import reset_quietly
from .link_offers import Links, accept_link, offer_fields, withdraw
from .trunk import Trunk
from .wire import CLOSE, LINK, RESULT, Frame, FrameStream, StreamEnded, WireError

log = logging.getLogger("shardmesh.mesh.hop_attach")

RELAY_GRACE = 5.0  # seconds the other end gets to close its side after ours

__all__ = ["RELAY_GRACE", "reap_attach", "serve_attach"]


async def serve_attach(
    sessions: Iterable[HopSession], links: Links | None, fs: FrameStream, frame: Frame, upstream_peer: str,
    to_gateways: Mapping[str, Trunk] | None = None,
) -> None:
    """Serve ``frame`` (an ``attach`` from ``upstream_peer``) for one of ``sessions``, until
    the gateway leaves; a :class:`WireError` if it may not attach. ``to_gateways``: the
    results trunks that gateways opened here, by peer id."""
    sid = frame.header.get("session")
    session = next((s for s in sessions if s.session == sid and s.is_last), None)
    if session is None:
        raise WireError("unknown_session", "no such session ends here")
    if upstream_peer != session.gateway or session.attached.is_set():
        raise WireError("forbidden", "only the session's gateway may attach, once")
    trunk = (to_gateways or {}).get(upstream_peer) if frame.header.get("trunk") is True else None
    if trunk is not None and trunk.alive:
        session.results_trunk, offer, link_fields = trunk, None, {"trunk": True}
    else:
        offer, link_fields = offer_fields(links, frame.header)
    session.attach = fs
    session.attached.set()  # before the write: a second attach must find it taken
    await fs.write({"t": RESULT, "session": session.session, "ok": True, **link_fields})
    try:
        while True:
            got = await fs.read_frame()
            if got.type == CLOSE:
                break
            if got.type == LINK:
                await accept_link(links, fs, offer, session.session)
                offer = None
    except (StreamEnded, WireError) as exc:
        log.debug("session %s: the gateway's attach stream ended: %r", session.id, exc)
    finally:
        session.attach_done.set()
        withdraw(links, offer)
    session.attach = None


async def reap_attach(session: HopSession) -> None:
    """After the session ended and we closed its attach stream: the gateway closes its
    side in turn; one that does not within :data:`RELAY_GRACE` is reset."""
    with trio.move_on_after(RELAY_GRACE):
        await session.attach_done.wait()
    if not session.attach_done.is_set() and session.attach is not None:
        await reset_quietly(session.attach.stream)
