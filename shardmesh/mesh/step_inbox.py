"""Where a trunked session's frames meet, in the order the hop should see them.

A session whose upstream hop sends its steps on a trunk (:mod:`.trunk`) still has its
own stream: ``close`` comes there, and errors go back there. The hop server reads the
session from one :class:`StepInbox` instead of the stream: the trunk's reader
:meth:`~StepInbox.deliver`\\ s each step, and :meth:`~StepInbox.pump` moves the stream's
frames in. :meth:`~StepInbox.read_frame` behaves as a stream's does (a deadline, the end
of the stream as :class:`~.wire.StreamEnded`).

The trunk's reader never waits on one session: its steps are queued up to
:data:`MAX_QUEUED_STEPS`, and an upstream that queues more has that session ended
(``too_many_steps``) while the trunk's other sessions go on.
"""

from __future__ import annotations

from typing import Any, Callable

import trio

from .host import reset_quietly
from .wire import CLOSE, Frame, FrameStream, StreamEnded, WireError

MAX_QUEUED_STEPS = 256  # a pipelined prefill of a long prompt queues a few dozen chunks

__all__ = ["MAX_QUEUED_STEPS", "StepInbox"]


class _Ended:
    """The session's stream ended cleanly."""


class StepInbox:
    """One trunked session's incoming frames."""

    def __init__(self, size: int = MAX_QUEUED_STEPS) -> None:
        self._send, self._receive = trio.open_memory_channel[Any](size)
        self.overflowed = False
        self.pumped = trio.Event()  # the stream's reader is done

    def deliver(self, frame: Frame) -> None:
        """From the trunk's reader: queue a step, never waiting. A full queue ends the
        session (its reader sees the end once it has taken what is queued)."""
        try:
            self._send.send_nowait(frame)
        except trio.WouldBlock:
            self.overflowed = True
            self._send.close()
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # the session has ended, or overflowed already

    async def pump(self, fs: FrameStream) -> None:
        """Move the session's own stream into the inbox until it ends: ``close`` (any
        other frame there is an error: its steps come on the trunk), or its end."""
        try:
            while True:
                try:
                    frame = await fs.read_frame()
                    if frame.type != CLOSE:
                        raise WireError("bad_frame", f"a trunked session's stream carries close only, not {frame.type}")
                    item: Any = frame
                except StreamEnded:
                    item = _Ended()
                except WireError as exc:
                    item = exc
                try:
                    await self._send.send(item)
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    return
                if not isinstance(item, Frame):
                    return
        finally:
            self.pumped.set()

    async def read_frame(self, idle_timeout: float | None = None, check: Callable[[dict[str, Any]], None] | None = None) -> Frame:
        """The next frame, as :meth:`FrameStream.read_frame` gives one."""
        with trio.move_on_after(idle_timeout if idle_timeout is not None else float("inf")) as idle:
            try:
                item = await self._receive.receive()
            except trio.EndOfChannel:
                raise WireError("too_many_steps", f"more than {MAX_QUEUED_STEPS} steps queued for one session") from None
        if idle.cancelled_caught:
            raise WireError("timeout", f"no frame within {idle_timeout:.0f} s")
        if isinstance(item, _Ended):
            raise StreamEnded()
        if isinstance(item, WireError):
            raise item
        if check is not None:
            check(item.header)
        return item

    async def end(self, fs: FrameStream, nursery: trio.Nursery | None, grace: float) -> None:
        """The session has ended: what still arrives is dropped, and the stream's reader
        is given ``grace`` s (in ``nursery``) to see the upstream close its side."""
        self._receive.close()
        try:
            if nursery is not None:
                nursery.start_soon(self._reap, fs, grace)
                return
        except RuntimeError:  # the node is stopping: no time to wait
            pass
        await reset_quietly(fs.stream)

    async def _reap(self, fs: FrameStream, grace: float) -> None:
        """After the session ended and this hop closed its side: the upstream closes
        its side in turn, ending :meth:`pump`; a stream still open after ``grace`` s is
        reset (which ends it too)."""
        with trio.move_on_after(grace):
            await self.pumped.wait()
        if not self.pumped.is_set():
            await reset_quietly(fs.stream)
