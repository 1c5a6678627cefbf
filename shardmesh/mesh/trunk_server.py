"""The receiving end of a trunk: ``steps`` frames cut back into each session's steps.

A trunk belongs to the peer that opened it (the libp2p stream it began on is bound to
that peer's identity). It may carry steps only for sessions that the same peer opened
here with ``trunk: true``; an item for any other session (unknown, ended, opened by
someone else, or not trunked) is dropped and counted, and costs the sender only what it
sent. Each step goes to its session's :class:`~.step_inbox.StepInbox`, and the session's
own task runs it as if it had come on its stream, so a step that is wrong for its
session ends that session alone. A frame that is wrong as a whole ends the trunk
(docs/PROTOCOL.md 6.7).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from .hop_session import HopSession
from .link_offers import Links, accept_link, offer_fields, withdraw
from .trunk_frame import check_steps_header, split_steps
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
    max_tokens: int, idle_timeout: float, counts: TrunkCounts,
) -> None:
    """Serve ``frame`` (a ``trunk`` from ``upstream_peer``) until the trunk ends."""
    offer, link_fields = offer_fields(links, frame.header)
    await fs.write({"t": RESULT, "ok": True, **link_fields})
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


def _check(header: dict, max_tokens: int) -> None:
    if header["t"] == STEPS:
        check_steps_header(header, max_tokens)
