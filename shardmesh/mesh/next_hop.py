"""The downstream side of a hop: opening the rest of the chain, and hearing back from it.

Each hop that is not the last opens a stream to the next one and forwards the ``open``
with the route shortened by one hop (docs/PROTOCOL.md, 6.2). While the session runs,
nothing flows back on that stream except an error, which is passed towards the gateway
with the peer it names, since that is who failed (docs/PROTOCOL.md, 6.3).

Both directions pass on only what they know. The ``open`` sent on is built by
:func:`~shardmesh.mesh.open_request.next_open` from the fields the protocol names, and
an error relayed back is rebuilt from its ``code``, ``message`` and ``peer``, each
type-checked and cut short (:func:`relayed_error`): a field a stranger added is never
re-encoded, and a value of the wrong type is never ``str``-ed or ``repr``-ed whole.
"""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable, Collection

import trio

from .cbor_plain import clip
from .deadlines import open_wait
from .hop_session import HopSession
from .host import close_quietly, reset_quietly
from .link_offers import Links, request_fields, upgrade_opener
from .open_request import MAX_PEER_ID, next_open
from .prefix_wire import fed_at_close, reported_cached
from .trunk import Trunk, Trunks
from .wire import CLOSE, ERROR, RESULT, Frame, FrameStream, StreamEnded, WireError

log = logging.getLogger("shardmesh.mesh.next_hop")

MAX_CODE = 32  # error codes are short words (docs/PROTOCOL.md 6.3)
MAX_MESSAGE = 1000  # characters of a relayed message; a human reads it, nothing parses it

__all__ = ["blamed_within", "open_next_hop", "pass_close", "relay_back", "relayed_error"]


def relayed_error(header: dict[str, Any], nxt: str) -> WireError:
    """The error a downstream ``error`` frame reports, rebuilt from the fields the
    protocol gives it: text of bounded length each, ``nxt`` (the next hop) where the
    ``peer`` it names is not a plausible peer id, and nothing else of the frame."""
    code, message, peer = header.get("code"), header.get("message"), header.get("peer")
    return WireError(
        code if isinstance(code, str) and 0 < len(code) <= MAX_CODE else "error",
        clip(message, MAX_MESSAGE) if isinstance(message, str) else "",
        peer if isinstance(peer, str) and 0 < len(peer) <= MAX_PEER_ID else nxt,
    )


def blamed_within(err: WireError, nxt: str, later: Collection[str]) -> WireError:
    """``err`` (from the next hop) blaming ``nxt`` itself or a peer after it on the route;
    blame of anyone else (this hop, an earlier one, a stranger) is put back on ``nxt``.

    The next hop cannot prove who failed; what it may claim is bounded by what it can
    see. It may name itself, or a peer further down (one it could not reach, or one that
    refused). Naming this hop or an earlier one would let a hostile hop get the honest
    hops before it excluded (docs/PROTOCOL.md 6.3), so such a frame blames its sender.
    """
    if err.peer == nxt or err.peer in later:
        return err
    return WireError(err.code, err.message, nxt)


async def open_next_hop(
    open_stream: Callable[[str], Awaitable[Any]],
    links: Links | None,
    max_payload: int,
    frame: Frame,
    route: list[dict],
    trunks: Trunks | None = None,
) -> tuple[FrameStream, Trunk | None, int]:
    """Open the rest of the chain; a :class:`WireError` naming the failed peer if not.

    ``frame`` is the ``open`` this hop received and ``route`` its validated route (this
    hop first). The session's steps go on a trunk to the next hop (``trunks``, returned)
    when both ends have one, else on its stream, which the next hop may move to a hop
    link (``links``). Last, the history tokens the rest of the chain says it holds
    (``cached``, docs/PROTOCOL.md 6.8).
    """
    nxt = route[1]["peer"]
    try:
        stream = await open_stream(nxt)
    except Exception as exc:
        raise WireError("peer_unreachable", f"cannot reach the next hop: {exc}", nxt) from exc
    downstream = FrameStream(stream, max_payload=max_payload)
    trunk = await trunks.to(nxt) if trunks is not None else None
    # The fields we know, from the header we validated; "trunk" and "link" are our own
    # wish, not the upstream's.
    wish = {"trunk": True} if trunk is not None else request_fields(links, downstream, nxt)
    header = {**next_open(frame.header, route), **wish}
    try:
        await downstream.write(header, frame.payload)
    except WireError as exc:
        await reset_quietly(stream)
        raise WireError("peer_lost", f"the next hop went away during open: {exc.message}", nxt) from exc
    try:
        # Shorter than what our upstream waits for us (deadlines.open_wait): if the rest
        # of the chain is silent, we are the one to say who.
        reply = await downstream.read_frame(idle_timeout=open_wait(len(route) - 1))
    except (StreamEnded, WireError) as exc:
        await reset_quietly(stream)
        raise WireError("peer_lost", f"the next hop did not answer open: {exc}", nxt) from exc
    if reply.type == ERROR:
        # Pass it on: it names the peer that refused.
        await close_quietly(stream)
        raise blamed_within(relayed_error(reply.header, nxt), nxt, {hop["peer"] for hop in route[1:]})
    if reply.type != RESULT or reply.header.get("ok") is not True:
        await reset_quietly(stream)
        raise WireError("bad_frame", f"the next hop answered open with {reply.type}")
    cached = reported_cached(reply.header, len(frame.payload) // 8)
    if trunk is not None:  # its steps go on the trunk, or (the next hop said no) on this stream
        return downstream, trunk if reply.header.get("trunk") is True else None, cached
    try:
        await upgrade_opener(links, downstream, reply.header, nxt, frame.header["session"])
    except WireError as exc:
        await reset_quietly(downstream.stream)
        raise WireError("peer_lost", f"the next hop went away during open: {exc.message}", nxt) from exc
    return downstream, None, cached


async def pass_close(session: HopSession, frame: Frame, downstream: FrameStream | None) -> None:
    """The upstream's ``close``: the session ends here, knowing what it was fed (its
    ids travel on, docs/PROTOCOL.md 6.8), and at the next hop too."""
    session.closing = True
    if session.prefix_scope is not None:
        session.fed = fed_at_close(session.fed, frame.payload, session.max_length)
    if downstream is not None:
        try:
            await downstream.write({"t": CLOSE, "session": session.session}, frame.payload)
        except WireError:
            pass


async def relay_back(
    session: HopSession, downstream: FrameStream, upstream: FrameStream, nxt: str, done: trio.Event, later: Collection[str] = ()
) -> None:
    """Errors from further down travel back towards the gateway, which then ends
    the session. The next hop closing its side is the normal end (after ours).
    Sets ``done`` when the next hop's stream has ended, whichever way. ``later``: the
    peers after ``nxt`` on the route, the only others an error from ``nxt`` may blame."""
    try:
        frame = await downstream.read_frame()
        if frame.type == ERROR:
            err = blamed_within(relayed_error(frame.header, nxt), nxt, later)
            await upstream.send_error(err.code, err.message, err.peer or nxt, session.session)
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
