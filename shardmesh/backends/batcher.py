"""Runs a :class:`Stage` off the trio event loop and batches concurrent steps.

Every session that wants a step calls :meth:`StepBatcher.step` and waits. One loop takes
whatever has queued up since the last batch started and runs it as a single batched
``stage.step`` on the compute thread (:mod:`.compute_thread`). Under load, batches form
by themselves: while one batch computes, the next one gathers. A single waiting session
costs one thread hop.

A request may carry ``then``, called on the compute thread with the result and the
compute seconds it took: the hop server uses it to send a decode step's output to the
next hop at once, without waiting for the event loop to wake up (mesh/link.py).

On the last stage each request's ``after`` samples its session's token. Given
``draw_together`` (:func:`~.sampler_state.draw_greedy_together`), the batch's plain greedy
sessions are drawn in one call instead, the rest one by one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import trio

from ..contract import RawTensor, Stage, StepOutput, StepRequest
from .batch_stats import BatchStats
from .compute_thread import compute_thread
from .memory_release import MemoryRelease

log = logging.getLogger("shardmesh.backends.batcher")

# (each request's ``after``, the batch's outputs) -> some requests' results, by index
DrawTogether = Callable[[list[Any], list[RawTensor]], dict[int, Any]]


@dataclass
class _Pending:
    request: StepRequest
    after: Callable[[RawTensor], Any] | None
    then: Callable[[Any, float], bool] | None = None
    flush: Callable[[], None] | None = None
    done: trio.Event = field(default_factory=trio.Event)
    result: Any = None
    error: BaseException | None = None
    seconds: float = 0.0
    sent: bool = False


class StepBatcher:
    """Owns one stage; :meth:`run` must be running in a nursery for steps to complete."""

    def __init__(
        self, stage: Stage, max_batch: int = 32, draw_together: DrawTogether | None = None, stats: BatchStats | None = None,
    ) -> None:
        self.stage = stage
        self.stats = stats if stats is not None else BatchStats()  # what its batches cost (batch_stats.py)
        self.max_batch = max_batch
        self.draw_together = draw_together
        self._queue: list[_Pending] = []
        self._wakeup = trio.Event()
        self._compute = compute_thread()  # one thread runs every stage call, in order
        self.memory = MemoryRelease()
        self.batches = 0
        self.batched_requests = 0

    async def open(
        self, session_id: str, max_length: int, start: int | None = None, end: int | None = None,
        history: Sequence[int] = (), scope: str | None = None,
    ) -> int:
        """Open a session; with a ``scope``, reuse the longest cached prefix of ``history``
        (:meth:`Stage.reuse_prefix`). Returns the tokens the session holds."""
        return await self._compute.run(self._open_and_reuse, session_id, max_length, start, end, history, scope)

    def _open_and_reuse(self, session_id: str, max_length: int, start: int | None, end: int | None,
                        history: Sequence[int], scope: str | None) -> int:  # fmt: skip
        self.stage.open(session_id, max_length, start, end)
        return self.stage.reuse_prefix(session_id, history, scope) if scope is not None and history else 0

    async def close(self, session_id: str, fed: Sequence[int] = (), scope: str | None = None) -> None:
        """Close a session; with a ``scope``, cache its prefix of ``fed`` first (:meth:`Stage.keep_prefix`)."""
        await self._compute.run(self._close_and_release, session_id, fed, scope)

    def _close_and_release(self, session_id: str, fed: Sequence[int] = (), scope: str | None = None) -> None:
        """Close on the compute thread, then give freed memory back (memory_release.py):
        when due, and always once the stage holds no session at all."""
        if scope is not None and fed:
            self.stage.keep_prefix(session_id, fed, scope)
        self.stage.close(session_id)
        self.memory.after_free(force=not getattr(self.stage, "sessions", True))

    async def expire_idle(self, idle_seconds: float) -> list[str]:
        return await self._compute.run(self.stage.expire_idle, idle_seconds)

    async def step(self, request: StepRequest, after: Callable[[RawTensor], Any] | None = None) -> Any:
        """One step of one session; returns the output, or ``after(output)`` computed in
        the compute thread (the last stage samples there, keeping the loop free)."""
        return (await self.step_timed(request, after)).value

    async def step_timed(
        self, request: StepRequest, after: Callable[[RawTensor], Any] | None = None,
        then: Callable[[Any, float], bool] | None = None, flush: Callable[[], None] | None = None,
    ) -> StepOutput:
        """:meth:`step`, with its compute seconds; then ``then(result, seconds)`` runs on
        the compute thread, and what it returns (True: it sent the result on) is ``sent``.
        ``flush()`` runs there once after the ``then`` of every request in the batch (the
        same ``flush`` of several requests, once)."""
        pending = _Pending(request, after, then, flush)
        self._queue.append(pending)
        self._wakeup.set()
        await pending.done.wait()
        if pending.error is not None:
            raise pending.error
        return StepOutput(pending.result, pending.seconds, pending.sent)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            while self._queue:
                batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
                began = time.perf_counter()
                await self._compute.run(self._step_batch, batch)
                self.stats.record(len(batch), sum(p.request.inputs.shape[0] for p in batch), time.perf_counter() - began)
                self.batches += 1
                self.batched_requests += len(batch)
                for pending in batch:
                    pending.done.set()

    def _drawn_together(self, batch: list[_Pending], outputs: list[RawTensor]) -> dict[int, Any]:
        if self.draw_together is None or len(batch) < 2:
            return {}
        try:
            return self.draw_together([p.after for p in batch], outputs)
        except Exception:  # each request's own ``after`` then draws it, or says what is wrong
            log.exception("drawing a batch's tokens together failed")
            return {}

    def _step_batch(self, batch: list[_Pending]) -> None:
        """Compute thread: the batched step, then each request's ``after``."""
        began = time.perf_counter()
        try:
            outputs = self.stage.step([p.request for p in batch])
        except Exception as exc:
            # A refused request, or a failure such as running out of memory on one
            # session's long prefill: retry each alone, so that only the culprit fails.
            # Safe because a stage advances its caches only when a whole step succeeds.
            if len(batch) == 1:
                batch[0].error = exc
            else:
                for pending in batch:
                    self._step_batch([pending])
            return
        together = self._drawn_together(batch, outputs)
        for i, (pending, output) in enumerate(zip(batch, outputs)):
            try:
                if i in together:
                    pending.result = together[i]
                else:
                    pending.result = pending.after(output) if pending.after else output
            except Exception as exc:
                pending.error = exc
                continue
            pending.seconds = time.perf_counter() - began
            if pending.then is not None:
                try:
                    pending.sent = bool(pending.then(pending.result, pending.seconds))
                except Exception:  # sending is best effort: the event loop sends instead
                    log.exception("sending a step's output from the compute thread failed")
        for flush in dict.fromkeys(p.flush for p in batch if p.flush is not None and p.sent):
            try:
                flush()
            except Exception:
                log.exception("flushing a batch's outputs failed")
