"""Deadlines that never cancel py-libp2p in the middle of a call.

py-libp2p cannot take a cancellation in the middle of a stream write or read: half a
Noise message or a lost window update, and the peer stalls or drops the whole
connection, with every inference session on it. :func:`without_cancel` waits for such
a call up to a deadline and then stops waiting, leaving the call to finish.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

import trio

__all__ = ["StillRunning", "without_cancel"]


class StillRunning(Exception):
    """A call given to :func:`without_cancel` had not finished by its deadline."""


async def without_cancel(nursery: trio.Nursery, timeout: float, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    """``await fn(*args)`` run in ``nursery``, waited for up to ``timeout`` seconds.

    py-libp2p cannot take a cancellation in the middle of a stream write or read: half
    a Noise message or a lost window update, and the peer stalls or drops the whole
    connection, with every inference session on it. So our deadlines never cancel its
    calls: past ``timeout`` we stop waiting (:class:`StillRunning`) and the call ends in
    the background, bounded by py-libp2p's own timeouts. Its result, or its exception.
    """
    done = trio.Event()
    outcome: list[tuple[bool, Any]] = []

    async def run() -> None:
        try:
            outcome.append((True, await fn(*args)))
        except Exception as exc:
            outcome.append((False, exc))
        finally:
            done.set()

    nursery.start_soon(run)
    with trio.move_on_after(timeout):
        await done.wait()
    if not outcome:
        raise StillRunning(f"{getattr(fn, '__name__', fn)} still running after {timeout:g} s")
    ok, value = outcome[0]
    if not ok:
        raise value
    return value
