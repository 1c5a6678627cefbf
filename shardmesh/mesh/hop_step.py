"""One step of one session on this hop: check it, compute it, send its output on.

The output of a middle hop is a ``step`` frame of hidden states for the next hop; the
last hop's is a ``result`` frame with the sampled token for the gateway's attach stream
(docs/PROTOCOL.md 6.2). Where that stream has moved to a hop link, the compute thread
sends the frame itself the moment the step is done, without a trip through the event
loop. Where the session's steps (or, on the last hop, its tokens) go on a trunk
(trunk.py), the compute thread puts the output into the trunk's frame, which leaves
once the whole batch is done. What is wrong with the step raises a
:class:`~shardmesh.mesh.wire.WireError` or the stage's error; the hop server turns
either into an error frame.
"""

from __future__ import annotations

from typing import Any

import trio

from ..contract import MAX_DRAFT_TOKENS
from .hop_session import HopSession
from .link import HopLink
from .trunk import Trunk
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
    drafts = drafts_of(frame.header, inputs.shape[0], want)
    sampler = session.sampler if (session.is_last and want) else None

    def frame_for(value: Any, seconds: float) -> tuple[dict[str, Any], bytes]:
        """The frame this step's output travels in (next hop: a step; gateway: a result)."""
        head = {"session": session.session, "position": position, "spent": spent + seconds}
        if downstream is not None:
            more = {"draft": drafts} if drafts else {}
            return {"t": STEP, **head, "want": want, **more, **tensor_fields(value)}, value.data
        return {"t": RESULT, **head, **value}, b""

    trunk = session.trunk if downstream is not None else (session.results_trunk if want else None)
    if trunk is not None:
        await _step_to_trunk(session, trunk, inputs, position, sampler, drafts, frame_for)
        return
    # Where the output goes over a hop link, the compute thread sends it itself.
    target = downstream if downstream is not None else (session.attach if want else None)
    link = target.stream if target is not None and isinstance(target.stream, HopLink) else None

    def send_now(value: Any, seconds: float) -> bool:
        assert link is not None
        return link.send_now(encode_frame(*frame_for(value, seconds)))

    done = await session.served.step(session.id, inputs, position, sampler, send_now if link is not None else None, drafts)
    if done.sent or (downstream is None and not want):
        return
    if downstream is None:
        with trio.move_on_after(ATTACH_WAIT):
            await session.attached.wait()
        if session.attach is None:
            raise WireError("gateway_gone", "the gateway's result stream is gone")
        if session.results_trunk is not None:  # attached with a trunk while this step ran
            await session.results_trunk.send(0, *frame_for(done.value, done.seconds))
            return
        target = session.attach
    assert target is not None
    await target.write(*frame_for(done.value, done.seconds))


async def _step_to_trunk(
    session: HopSession, trunk: Trunk, inputs: Any, position: int, sampler: Any, drafts: list[int], frame_for: Any
) -> None:
    """Compute the step and put its output (hidden states for the next hop, whose part
    starts where ours ends, or the token for the gateway) into the trunk's next frame;
    returns once that frame is out (a slow reader slows this session, as a stream would)."""
    batches = []

    def to_trunk(value: Any, seconds: float) -> bool:
        batches.append(trunk.add(session.end, *frame_for(value, seconds)))
        return True

    done = await session.served.step(session.id, inputs, position, sampler, to_trunk, drafts, flush=trunk.flush)
    if done.sent:
        await trunk.written(batches[0])
    else:
        await trunk.send(session.end, *frame_for(done.value, done.seconds))


def drafts_of(header: dict[str, Any], n: int, want: bool) -> list[int]:
    """The step's ``draft`` field: the token ids proposed as its last inputs, checked
    (at most ``MAX_DRAFT_TOKENS``, fewer than the step's ``n`` tokens, only where a
    token is wanted); empty when absent. The first hop sees the ids themselves and the
    stage checks them against the vocabulary; the last hop compares what it draws with
    them, so a wrong id there is only a rejected draft."""
    drafts = header.get("draft", [])
    if not isinstance(drafts, list) or not all(type(t) is int and 0 <= t < 2**32 for t in drafts):
        raise WireError("bad_input", "draft must be a list of token ids")
    if len(drafts) > min(n - 1, MAX_DRAFT_TOKENS) or (drafts and not want):
        raise WireError("bad_input", f"a step of {n} tokens may carry 0 to {min(n - 1, MAX_DRAFT_TOKENS)} draft tokens, and only with want")
    return drafts
