"""Trunks: one connection from this hop to a next hop for the steps of many sessions.

Each session still opens its own stream to the next hop (``open`` with ``trunk: true``,
later ``close``, errors back), but its steps travel on the trunk, the steps of sessions
computed in one batch here as one ``steps`` frame (:mod:`.trunk_frame`,
docs/PROTOCOL.md 6.7). A trunk is a stream of ``/shardmesh/infer/1.0.0`` whose first
frame is ``trunk``, moved to a hop link like a session's stream when both ends offer
links.

The compute thread fills a trunk as a batch finishes: :meth:`Trunk.add` for each
session's output, then :meth:`Trunk.flush` once, which sends the frame at once when the
link has room (:meth:`~.link.HopLink.send_now`) and hands it to the trunk's writer task
otherwise, behind any frame still waiting (a session's steps stay in order). A session's
next step is computed only after :meth:`Trunk.written` says its frame is out, so a slow
next hop slows this hop as a stream would.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import trio

from .host import reset_quietly
from .link import HopLink
from .link_offers import Links, request_fields, upgrade_opener
from .trunk_frame import MAX_TRUNK_ITEMS, steps_frame
from .wire import RESULT, TRUNK, FrameStream, StreamEnded, WireError, encode_frame

log = logging.getLogger("shardmesh.mesh.trunk")

OPEN_WAIT = 10.0  # s for the next hop to answer a trunk
RETRY_AFTER = 60.0  # s before trying again to open a trunk to a peer that refused one

__all__ = ["Trunk", "TrunkBatch", "Trunks", "open_trunk"]


async def open_trunk(
    open_stream: Callable[[str], Awaitable[Any]], links: Links | None, max_payload: int, peer: str, **fields: Any
) -> FrameStream:
    """A stream to ``peer`` that it took as a trunk (``trunk`` with ``fields``), moved to
    a hop link where both ends can; raises if ``peer`` refuses or does not answer."""
    fs = FrameStream(await open_stream(peer), max_payload=max_payload)
    try:
        await fs.write({"t": TRUNK, **fields, **request_fields(links, fs, peer)})
        reply = await fs.read_frame(idle_timeout=OPEN_WAIT)
        if reply.type != RESULT or reply.header.get("ok") is not True:
            raise WireError("bad_frame", f"a trunk was answered with {reply.type}")
        await upgrade_opener(links, fs, reply.header, peer, TRUNK)
    except BaseException:
        await reset_quietly(fs.stream)
        raise
    return fs


@dataclass
class TrunkBatch:
    """The steps that leave in one frame."""

    steps: list[tuple[int, dict[str, Any], bytes]] = field(default_factory=list)
    tokens: int = 0
    sent: bool = False  # out, directly from the thread that flushed it
    failed: bool = False
    waiting: bool = False  # a task waits for it (:meth:`Trunk.written`): wake it when it is out
    written: trio.Event = field(default_factory=trio.Event)  # out (or failed) from the writer task


Build = Callable[[list[tuple[int, dict[str, Any], bytes]]], tuple[dict[str, Any], bytes]]


class Trunk:
    """The sending end of a trunk: this hop's steps to one next hop (open it with
    :meth:`Trunks.to`), or a last hop's tokens to one gateway (``build`` is then
    :func:`~.trunk_frame.results_frame`)."""

    def __init__(self, fs: FrameStream, peer: str, max_tokens: int, build: Build = steps_frame) -> None:
        self.fs = fs
        self.peer = peer
        self.max_tokens = max_tokens  # per frame: the next hop's limit for one step
        self.build = build
        self.alive = True
        self._token = trio.lowlevel.current_trio_token()
        self._trio_thread = threading.get_ident()
        self._lock = threading.Lock()
        self._open: TrunkBatch | None = None
        self._queued = 0  # frames handed to the writer task and not yet written
        self._send, self._receive = trio.open_memory_channel[TrunkBatch](math.inf)

    def add(self, start: int, header: dict[str, Any], payload: bytes = b"") -> TrunkBatch:
        """From any thread: put one session's ``step`` (``start``: the next hop's first
        block) or ``result`` into the frame being filled; the batch it will leave in."""
        n = header["shape"][0] if "shape" in header else 1
        with self._lock:
            batch = self._open
            if batch is not None and (len(batch.steps) >= MAX_TRUNK_ITEMS or batch.tokens + n > self.max_tokens):
                self._send_locked(batch)
                batch = None
            if batch is None:
                batch = self._open = TrunkBatch()
            batch.steps.append((start, header, payload))
            batch.tokens += n
            return batch

    def flush(self) -> None:
        """From any thread: send the frame being filled."""
        with self._lock:
            if self._open is not None:
                self._send_locked(self._open)

    def _send_locked(self, batch: TrunkBatch) -> None:
        self._open = None
        link = self.fs.stream if isinstance(self.fs.stream, HopLink) else None
        if not self.alive:
            batch.failed = True
            if batch.waiting:
                self._wake(batch)
        elif self._queued == 0 and link is not None and link.send_now(encode_frame(*self.build(batch.steps))):
            batch.sent = True
            if batch.waiting:  # one that used add_soon
                self._wake(batch)
        else:
            self._queued += 1
            try:
                self._token.run_sync_soon(self._enqueue, batch)
            except trio.RunFinishedError:
                self._queued -= 1
                batch.failed = True

    def _wake(self, batch: TrunkBatch) -> None:
        """Set ``batch.written``, which only trio's thread may do."""
        if threading.get_ident() == self._trio_thread:
            batch.written.set()
        else:
            try:
                self._token.run_sync_soon(batch.written.set)
            except trio.RunFinishedError:
                pass

    def _enqueue(self, batch: TrunkBatch) -> None:
        """In trio: hand ``batch`` to the writer task (or fail it, the trunk having ended)."""
        try:
            self._send.send_nowait(batch)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            with self._lock:
                self._queued -= 1
            batch.failed = True
            batch.written.set()

    async def written(self, batch: TrunkBatch) -> None:
        """Once ``batch`` is out; :class:`WireError` if the trunk failed first."""
        with self._lock:
            batch.waiting = not (batch.sent or batch.failed)
        if batch.waiting:
            await batch.written.wait()
        if batch.failed:
            raise WireError("peer_lost", f"the trunk to {self.peer} is gone", self.peer)

    async def run(self, watch: Callable[[], Awaitable[None]] | None = None) -> None:
        """The writer, and ``watch`` reading the trunk (by default: the other end sends
        nothing, so any frame or its end ends the trunk); returns once it has ended."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watching, watch or self._expect_nothing)
            await self._write_queued()

    async def _write_queued(self) -> None:
        async for batch in self._receive:
            try:
                if not self.alive:
                    raise WireError("stream_error", "the trunk has ended")
                await self.fs.write(*self.build(batch.steps))
            except WireError as exc:
                log.info("trunk to %s failed: %s", self.peer, exc.message)
                self._end()
                batch.failed = True
                await reset_quietly(self.fs.stream)  # which ends the watcher too
            finally:
                with self._lock:
                    self._queued -= 1
                batch.written.set()

    async def send(self, start: int, header: dict[str, Any], payload: bytes = b"") -> None:
        """In trio: :meth:`add`, :meth:`flush` and :meth:`written`, for an output that no
        batch on the compute thread took."""
        batch = self.add(start, header, payload)
        self.flush()
        await self.written(batch)

    def add_soon(self, start: int, header: dict[str, Any], payload: bytes = b"") -> TrunkBatch:
        """In trio: :meth:`add`, the frame sent once the tasks that can run now have run
        (a gateway's sessions, woken together by their tokens, step together)."""
        batch = self.add(start, header, payload)
        if len(batch.steps) == 1:
            self._token.run_sync_soon(self.flush)
        return batch

    async def _expect_nothing(self) -> None:
        await self.fs.read_frame()

    async def _watching(self, watch: Callable[[], Awaitable[None]]) -> None:
        try:
            await watch()
        except (StreamEnded, WireError):
            pass
        self._end()
        await reset_quietly(self.fs.stream)
        # Frames still queued fail now; the writer task is done once they have.
        self._send.close()

    def _end(self) -> None:
        with self._lock:
            self.alive = False


class Trunks:
    """This node's trunks, one per next hop, opened when a session first needs one.
    :meth:`run` must be running in a nursery."""

    def __init__(self, open_stream: Callable[[str], Awaitable[Any]], links: Links | None, max_payload: int, max_tokens: int) -> None:
        self._open_stream = open_stream
        self._links = links
        self._max_payload = max_payload
        self._max_tokens = max_tokens
        self._trunks: dict[str, Trunk] = {}
        self._opening: dict[str, trio.Lock] = {}
        self._refused: dict[str, float] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def to(self, peer: str) -> Trunk | None:
        """The trunk to ``peer``, opened if need be; None if it will not have one."""
        if self._nursery is None or self._refused.get(peer, 0.0) > time.monotonic():
            return None
        lock = self._opening.setdefault(peer, trio.Lock())
        async with lock:
            trunk = self._trunks.get(peer)
            if trunk is not None and trunk.alive:
                return trunk
            try:
                trunk = await self._open(peer)
            except Exception as exc:  # the next hop is old, busy or gone: steps go on each session's stream
                log.info("no trunk to %s: %s", peer, exc)
                self._refused[peer] = time.monotonic() + RETRY_AFTER
                return None
            self._trunks[peer] = trunk
            self._nursery.start_soon(self._keep, trunk)
            return trunk

    async def _open(self, peer: str) -> Trunk:
        stream = await open_trunk(self._open_stream, self._links, self._max_payload, peer)
        return Trunk(stream, peer, self._max_tokens)

    async def _keep(self, trunk: Trunk) -> None:
        try:
            await trunk.run()
        finally:
            if self._trunks.get(trunk.peer) is trunk:
                del self._trunks[trunk.peer]
