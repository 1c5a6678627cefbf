"""py-libp2p calls under our deadlines, at most one of each kind in flight.

A publish, a DHT put or a provide must not be cancelled half-way (see
:func:`~.without_cancel.without_cancel`): past its deadline we stop waiting and the call ends in
the background. If that call is stuck, the next one of the same kind would pile up
behind it, and the next; refusing a second call of a kind while one still runs keeps
the number of stuck calls at one per kind.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

import trio

from .without_cancel import StillRunning, without_cancel


class OneAtATime:
    """Runs each call in ``nursery`` (where a call past its deadline finishes)."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._running: set[str] = set()  # kinds of call still running, maybe past their deadline

    async def call(self, kind: str, timeout: float, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """``await fn(*args)`` for up to ``timeout`` s; its result, or its exception.

        Raises :class:`~.host.StillRunning` when the deadline passes, or at once when
        the previous call of ``kind`` has not finished yet.
        """
        if kind in self._running:
            raise StillRunning(f"the previous {kind} is still running")
        self._running.add(kind)

        async def tracked(*a: Any) -> Any:
            try:
                return await fn(*a)
            finally:
                self._running.discard(kind)

        return await without_cancel(self._nursery, timeout, tracked, *args)
