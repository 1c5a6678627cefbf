"""Giving a closed session's KV-cache memory back to the operating system.

On a CPU, torch allocates tensors with ``malloc``. glibc hands freed memory back to the
system only from the top of its heap, and after the first large block is freed it
raises its ``mmap`` threshold (up to 32 MB), so later caches come from the heap rather
than from their own mappings. A node whose sessions have closed therefore keeps its peak
RSS (docs/PERFORMANCE.md, "Memory after sessions end", has the figures and the test
that measures them). ``malloc_trim(0)`` returns every free page of the heap, from its
middle too. It costs a few milliseconds, so it runs after a session closed, on the
compute thread, at most once per :data:`MIN_INTERVAL`, and always when the last
session has gone.

Where there is no glibc (macOS, musl) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time

MIN_INTERVAL = 1.0  # s between two trims

__all__ = ["MIN_INTERVAL", "MemoryRelease"]


def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


class MemoryRelease:
    """Call :meth:`after_free` after freeing session memory; it trims the heap when due."""

    def __init__(self, min_interval: float = MIN_INTERVAL) -> None:
        self.min_interval = min_interval
        self._trim = _malloc_trim()
        self._last = -float("inf")
        self.trims = 0

    @property
    def available(self) -> bool:
        return self._trim is not None

    def after_free(self, force: bool = False) -> bool:
        """Trim now unless one ran within ``min_interval`` (``force``: even then, e.g.
        once nothing is left to free later); True if it ran."""
        now = time.monotonic()
        if self._trim is None or (not force and now - self._last < self.min_interval):
            return False
        self._last = now
        self._trim(0)
        self.trims += 1
        return True
