"""One step of one session on this hop: check it, compute it, send its output on.

The output of a middle hop is a ``step`` frame of hidden states for the next hop; the
last hop's is a ``result`` frame with the sampled token for the gateway's attach stream
(docs/PROTOCOL.md 6.2). Where that stream has moved to a hop link, the compute thread
sends the frame itself the moment the step is done, without a trip through the event
loop. What is wrong with the step raises a :class:`~shardmesh.mesh.wire.WireError` or
the stage's error; the hop server turns either into an error frame.
"""

from __future__ import annotations

from typing import Any

import trio

from .hop_session import HopSession
from .link import HopLink
from .wire import RESULT, STEP, Frame, FrameStream, WireError, encode_frame, tensor_fields, tensor_from_frame

ATTACH_WAIT = 30.0  # s the last hop waits for the gateway's attach stream before giving up

__all__ = ["ATTACH_WAIT", "run_step"]


async def run_step(session: HopSession, frame: Frame, downstream: FrameStream | None, max_elements: int) -> None:
    """Run ``frame`` (a ``step``) through ``session``'s blocks and send the output on."""
    position, want = frame.header.get("position"), frame.header.get("want", False)
    spent = frame.header.get("spent", 0.0)
    if not isinstance(position, int) or position < 0 or not isinstance(want, bool):
        raise WireError("bad_input", "step needs an integer position >= 0 and a boolean want")
    if isinstance(spent, bool) or not isinstance(spent, (int, float)) or not 0 <= spent < 1e6:
        raise WireError("bad_input", "spent must be a number of seconds >= 0")
    inputs = tensor_from_frame(frame, max_elements)
    sampler = session.sampler if (session.is_last and want) else None

    def frame_for(value: Any, seconds: float) -> tuple[dict[str, Any], bytes]:
        """The frame this step's output travels in (next hop: a step; gateway: a result)."""
        head = {"session": session.session, "position": position, "spent": spent + seconds}
        if downstream is not None:
            return {"t": STEP, **head, "want": want, **tensor_fields(value)}, value.data
        return {"t": RESULT, **head, **value}, b""

    # Where the output goes over a hop link, the compute thread sends it itself.
    target = downstream if downstream is not None else (session.attach if want else None)
    link = target.stream if target is not None and isinstance(target.stream, HopLink) else None

    def send_now(value: Any, seconds: float) -> bool:
        assert link is not None
        return link.send_now(encode_frame(*frame_for(value, seconds)))

    done = await session.served.step(session.id, inputs, position, sampler, send_now if link is not None else None)
    if done.sent or (downstream is None and not want):
        return
    if downstream is None:
        with trio.move_on_after(ATTACH_WAIT):
            await session.attached.wait()
        if session.attach is None:
            raise WireError("gateway_gone", "the gateway's result stream is gone")
        target = session.attach
    assert target is not None
    await target.write(*frame_for(done.value, done.seconds))
