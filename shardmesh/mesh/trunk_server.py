"""The far end of a trunk: ``steps`` frames cut back into each session's steps, and a
gateway's results trunk, on which this node (a last hop) sends it tokens.

A trunk belongs to the peer that opened it (the libp2p stream it began on is bound to
that peer's identity). It may carry steps only for sessions that the same peer opened
here with ``trunk: true``; an item for any other session (unknown, ended, opened by
someone else, or not trunked) is dropped and counted, and costs the sender only what it
sent. Each step goes to its session's :class:`~.step_inbox.StepInbox`, and the session's
own task runs it as if it had come on its stream, so a step that is wrong for its
session ends that session alone. A frame that is wrong as a whole ends the trunk
(docs/PROTOCOL.md 6.7).

A peer has one steps trunk at a time here (its :class:`~.trunk.Trunks` keeps one per
next hop, and opens another only when that one has ended): a newer one ends the older,
so trunks cost a stranger's peer id one stream at most.

A trunk opened with ``results: true`` runs the other way: the gateway that opened it
reads, and the sessions it attaches here with ``trunk: true`` send their tokens on it,
those sampled in one batch as one ``results`` frame. A gateway has one at a time here;
a newer one ends the older.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, MutableMapping

from .hop_session import HopSession
from .host import reset_quietly
from .link_offers import Links, Offer, accept_link, offer_fields, withdraw
from .trunk import Trunk
from .trunk_frame import check_steps_header, results_frame, split_steps
from .wire import LINK, RESULT, STEPS, TRUNK, Frame, FrameStream, WireError

__all__ = ["TrunkCounts", "serve_trunk"]


@dataclass
class TrunkCounts:
    """What this node's trunks carried in (``/metrics``)."""

    frames: int = 0  # steps frames received
    steps: int = 0  # steps in them
    dropped: int = 0  # steps for sessions the trunk may not feed

    def totals(self) -> tuple[int, int]:
        """Frames and the steps in them."""
        return self.frames, self.steps


async def serve_trunk(
    sessions: Mapping[str, HopSession], links: Links | None, fs: FrameStream, frame: Frame, upstream_peer: str,
    max_tokens: int, idle_timeout: float, counts: TrunkCounts, to_gateways: MutableMapping[str, Trunk],
    steps_from: MutableMapping[str, FrameStream],
) -> None:
    """Serve ``frame`` (a ``trunk`` from ``upstream_peer``) until the trunk ends; it is
    kept meanwhile, by that peer's id, in ``to_gateways`` (a results trunk) or
    ``steps_from``."""
    offer, link_fields = offer_fields(links, frame.header)
    await fs.write({"t": RESULT, "ok": True, **link_fields})
    if frame.header.get("results") is True:
        await _serve_results(links, fs, offer, upstream_peer, max_tokens, to_gateways)
        return
    older = steps_from.get(upstream_peer)
    steps_from[upstream_peer] = fs
    if older is not None:
        await reset_quietly(older.stream)
    try:
        while True:
            got = await fs.read_frame(idle_timeout=idle_timeout, check=lambda h: _check(h, max_tokens))
            if got.type == LINK:
                await accept_link(links, fs, offer, TRUNK)
                offer = None
                continue
            if got.type != STEPS:
                raise WireError("bad_frame", f"a trunk carries steps frames, not {got.type}")
            steps = split_steps(got, max_tokens)
            counts.frames += 1
            counts.steps += len(steps)
            for key, step in steps:
                session = sessions.get(key)
                if session is None or session.inbox is None or session.upstream_peer != upstream_peer:
                    counts.dropped += 1
                    continue
                session.inbox.deliver(step)
    finally:
        withdraw(links, offer)
        if steps_from.get(upstream_peer) is fs:
            del steps_from[upstream_peer]


def _check(header: dict, max_tokens: int) -> None:
    if header["t"] == STEPS:
        check_steps_header(header, max_tokens)


async def _serve_results(
    links: Links | None, fs: FrameStream, offer: Offer | None, gateway: str, max_tokens: int, to_gateways: MutableMapping[str, Trunk]
) -> None:
    """A gateway's results trunk, until it ends. The gateway sends nothing on it but,
    perhaps, the ``link`` frame that moves it to a hop link; it attaches no session to it
    before that move is done, so no token is written to the stream it leaves."""
    trunk = Trunk(fs, gateway, max_tokens, build=results_frame)
    older = to_gateways.get(gateway)
    to_gateways[gateway] = trunk
    if older is not None:
        await reset_quietly(older.fs.stream)

    async def watch() -> None:
        nonlocal offer
        while True:
            got = await fs.read_frame()
            if got.type != LINK:
                raise WireError("bad_frame", f"a gateway sends nothing on a results trunk but link, not {got.type}")
            await accept_link(links, fs, offer, TRUNK)
            offer = None

    try:
        await trunk.run(watch)
    finally:
        withdraw(links, offer)
        if to_gateways.get(gateway) is trunk:
            del to_gateways[gateway]
