"""A gateway's trunks: steps into first hops, tokens back from last hops, many sessions a frame.

Under many concurrent chats a gateway sends one step per session into each first hop
and reads one token per session from each last hop. With trunks (docs/PROTOCOL.md 6.7)
both go many sessions to a frame: steps on the same :class:`~.trunk.Trunks` a hop uses
towards its next hop, and tokens on a **results trunk** that the gateway opens to each
last hop (``trunk`` with ``results: true``) and that the last hop writes. A session asks
for it in its ``attach`` (``trunk: true``); its tokens then arrive here, and
:class:`ResultTrunks` hands each to the session's chain (:mod:`.chain_client`), which
checks it exactly as one read from its attach stream.

A results trunk speaks only for its own peer: a token for a session whose route does
not end at that peer, or for no open session, is dropped and counted.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Protocol

import trio

from .host import reset_quietly
from .link_offers import Links
from .trunk import RETRY_AFTER, Trunks, open_trunk
from .trunk_frame import split_results
from .wire import RESULTS, Frame, FrameStream, StreamEnded, WireError

log = logging.getLogger("shardmesh.mesh.result_trunks")

__all__ = ["ChainTrunks", "ResultCounts", "ResultTrunks"]


class ResultReader(Protocol):
    """What a results trunk hands a token to: a chain waiting for it."""

    def deliver(self, frame: Frame) -> None: ...

    def lost(self, peer: str) -> None:
        """The results trunk from ``peer`` ended: no token will come that way."""
        ...


@dataclass
class ResultCounts:
    """What this gateway's results trunks brought in (``/metrics``)."""

    frames: int = 0
    results: int = 0
    dropped: int = 0  # for no open session, or for one whose route ends elsewhere

    def totals(self) -> tuple[int, int]:
        """Frames and the tokens' results in them."""
        return self.frames, self.results


class ResultTrunks:
    """This gateway's results trunks, one per last hop, opened when a session first
    needs one. :meth:`run` must be running in a nursery."""

    def __init__(self, open_stream: Callable[[str], Awaitable[Any]], links: Links | None, max_payload: int) -> None:
        self._open_stream = open_stream
        self._links = links
        self._max_payload = max_payload
        self._open: dict[str, FrameStream] = {}
        self._opening: dict[str, trio.Lock] = {}
        self._refused: dict[str, float] = {}
        self._readers: dict[str, tuple[str, ResultReader]] = {}  # session id -> (its last hop, its chain)
        self._nursery: trio.Nursery | None = None
        self.counts = ResultCounts()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def to(self, peer: str) -> bool:
        """Whether a results trunk from ``peer`` is open (opening one if need be)."""
        if self._nursery is None or self._refused.get(peer, 0.0) > time.monotonic():
            return False
        async with self._opening.setdefault(peer, trio.Lock()):
            if peer in self._open:
                return True
            try:
                fs = await open_trunk(self._open_stream, self._links, self._max_payload, peer, results=True)
            except Exception as exc:  # an old node, or gone: tokens come on attach streams
                log.info("no results trunk from %s: %s", peer, exc)
                self._refused[peer] = time.monotonic() + RETRY_AFTER
                return False
            self._open[peer] = fs
            self._nursery.start_soon(self._read, peer, fs)
            return True

    def expect(self, session: str, last: str, reader: ResultReader) -> None:
        """Tokens for ``session`` from ``last`` go to ``reader`` from now on."""
        self._readers[session] = (last, reader)

    def forget(self, session: str) -> None:
        self._readers.pop(session, None)

    async def _read(self, peer: str, fs: FrameStream) -> None:
        """Never cancelled (see hop_server): it ends when the trunk ends."""
        try:
            while True:
                frame = await fs.read_frame()
                if frame.type != RESULTS:
                    raise WireError("bad_frame", f"a results trunk carries results frames, not {frame.type}")
                results = split_results(frame)
                self.counts.frames += 1
                self.counts.results += len(results)
                for result in results:
                    self.deliver(peer, result)
        except (StreamEnded, WireError) as exc:
            log.info("the results trunk from %s ended: %s", peer, exc)
        finally:
            if self._open.get(peer) is fs:
                del self._open[peer]
            for last, reader in list(self._readers.values()):
                if last == peer:
                    reader.lost(peer)
            await reset_quietly(fs.stream)

    def deliver(self, peer: str, result: Frame) -> None:
        """``result`` (from ``peer``'s results trunk) to its session's chain, if that
        session is open here and its route ends at ``peer``."""
        last, reader = self._readers.get(result.header["session"], (None, None))
        if reader is None or last != peer:
            self.counts.dropped += 1
            return
        reader.deliver(result)


@dataclass
class ChainTrunks:
    """What a gateway's chains send and read on: steps into first hops (``steps``, the
    node's own trunks) and tokens back from last hops (``results``)."""

    steps: Trunks
    results: ResultTrunks
