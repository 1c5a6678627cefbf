"""One long-lived thread for all of a process's torch work.

Why not ``trio.to_thread``: torch's CPU kernels parallelise with OpenMP, and OpenMP
keeps a team of helper threads *per calling thread*, spinning for a while after each
parallel region. Once a second thread has a team (the main thread after loading, or
another cached worker thread), both teams fight for the cores and every decode step
gets markedly slower (docs/PERFORMANCE.md, "One compute thread per process", has the
figures and the command that measures them). So every torch call of a process goes
through this one thread, and the event loop thread never runs torch at all.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable

import outcome
import trio

_Job = tuple[Callable[..., Any], tuple[Any, ...], Callable[[outcome.Outcome], None]]


class ComputeThread:
    """Runs submitted functions one at a time, in order, on a dedicated daemon thread."""

    def __init__(self, name: str = "shardmesh-compute") -> None:
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            fn, args, deliver = self._jobs.get()
            deliver(outcome.capture(fn, *args))

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Blocking call from a plain (non-trio) thread: scripts and benchmarks."""
        if threading.current_thread() is self._thread:
            return fn(*args)
        box: queue.SimpleQueue[outcome.Outcome] = queue.SimpleQueue()
        self._jobs.put((fn, args, box.put))
        return box.get().unwrap()

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Await ``fn(*args)`` computed on the compute thread.

        If the caller is cancelled the job still runs to completion (a half-run torch
        step cannot be interrupted); its result is dropped.
        """
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        result: list[outcome.Outcome] = []

        def deliver(o: outcome.Outcome) -> None:
            result.append(o)
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass  # the loop is gone; nobody is waiting any more

        self._jobs.put((fn, args, deliver))
        await done.wait()
        return result[0].unwrap()


_shared: ComputeThread | None = None
_shared_lock = threading.Lock()


def compute_thread() -> ComputeThread:
    """The process's compute thread, started on first use."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = ComputeThread()
        return _shared
