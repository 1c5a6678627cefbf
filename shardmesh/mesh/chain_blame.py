"""Whom an error frame on a gateway's chain blames, and what the gateway believes of it.

A chain's error frames come from two hops: the first (on its stream, its own errors and
those relayed back along the chain) and the last (on its attach stream). Each may name
the peer at fault, and each could lie to get an honest peer excluded; so what a frame
may blame is bounded by what its sender can know (docs/PROTOCOL.md 6.3). When no
frame comes at all, the gateway asks every hop whether it answers (:func:`first_silent`).
"""

from __future__ import annotations

from typing import Awaitable, Callable

import trio

from ..contract import BadRequest, CacheBudgetExceeded, ChainFailed, NonFiniteInput
from ..placement.routing import Hop
from .next_hop import relayed_error
from .reclaim import RECLAIMED, believable
from .wire import Frame

__all__ = ["failure_of", "first_silent"]


def failure_of(frame: Frame, sender: str, route: list[Hop], *, attach: bool = False, idle_for: float = 0.0) -> Exception:
    """The exception for an error frame from ``sender``: the first hop (its stream
    carries its own errors and those relayed from later hops) or, with ``attach``, the
    last hop on its attach stream. What the frame may blame is bounded by what its
    sender can know, so that no hop can get an honest one excluded (docs/PROTOCOL.md 6.3):

    * ``bad_request`` (the request cannot be sampled) is believed only straight from
      the last hop: :class:`BadRequest`, an HTTP 400 that blames no peer. Relayed by
      another hop it is unconfirmed (a middle hop could forge it to go unblamed) and
      blames nobody; the last hop sends it on its attach stream first anyway.
    * On the attach stream the last hop speaks only for itself: whoever it names, the
      blame is its own. The one exception is ``non_finite`` against the hop right before
      it (it received NaN or inf): one of the two is lying or broken and the gateway
      cannot tell which, so it blames neither.
    * On the first hop's stream the named peer must be on the route (each honest hop
      relaying it already refused blame of itself or earlier hops), else the first hop.
    * ``reclaimed`` (a hop ended an idle session to make room) blames nobody if the
      chain has in fact been idle that long (``idle_for`` s since we last sent on it);
      otherwise it is blamed like any other error.
    """
    # The frame's fields type-checked and cut short, as a relaying hop reads them.
    err = relayed_error(frame.header, sender)
    code, message, peer = err.code, err.message, err.peer
    last = route[-1].peer
    if code == CacheBudgetExceeded.code:
        return CacheBudgetExceeded(message)
    if code == RECLAIMED and believable(idle_for):
        return ChainFailed(None, code, f"{sender}: {message}")
    if code == BadRequest.code:
        if sender == last:
            return BadRequest(message)
        return ChainFailed(None, code, f"relayed by {sender}, not confirmed by the last hop: {message}")
    if attach:
        if code == NonFiniteInput.code and len(route) > 1 and peer == route[-2].peer:
            return ChainFailed(None, code, f"the last hop says the hop before it sent: {message}")
        return ChainFailed(last, code, message)
    on_route = {hop.peer for hop in route}
    return ChainFailed(peer if peer in on_route else sender, code, message)


async def first_silent(route: list[str], probe: Callable[[str], Awaitable[bool]]) -> str | None:
    """The first peer of ``route`` that does not answer ``probe`` (a frozen or vanished
    process answers nothing); None if all do. The peers are probed together, so this
    takes one probe's time."""
    answered: dict[str, bool] = {}

    async def ask(peer: str) -> None:
        answered[peer] = await probe(peer)

    async with trio.open_nursery() as nursery:
        for peer in set(route):
            nursery.start_soon(ask, peer)
    return next((peer for peer in route if not answered[peer]), None)
