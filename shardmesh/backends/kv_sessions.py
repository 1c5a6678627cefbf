"""Sessions and their KV-cache budget: the bookkeeping every backend's stage shares.

A stage keeps one cache per session, allocated as the session grows: what counts
against the stage's byte budget is the *allocated capacity*, not ``max_length``. A
request that allows 4k tokens but stops after 50 costs 256 tokens. Capacity starts at
:data:`MIN_CACHE_CHUNK` (or ``max_length`` if smaller), doubles as the session grows,
or grows just enough (a multiple of :data:`GROWTH_STEP`) when doubling does not fit.

How the caches are stored is the backend's business (torch tensors, MLX ``KVCache``);
this module only needs each session to have ``capacity``, ``length``, ``max_length``,
``bytes_per_token`` and ``last_used``. No torch, no MLX here.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from ..contract import BadInput, CacheBudgetExceeded

DEFAULT_CACHE_BUDGET = 2 << 30  # bytes of KV cache per stage unless told otherwise
MIN_CACHE_CHUNK = 256  # tokens a session's cache starts with (or its max_length if smaller)
GROWTH_STEP = 64  # when doubling does not fit the budget, grow to a multiple of this


def growth_options(capacity: int, max_length: int, needed: int) -> list[int]:
    """Capacities that would hold ``needed`` tokens, most generous first."""
    doubled = min(max_length, max(needed, 2 * capacity, MIN_CACHE_CHUNK))
    snug = min(max_length, -(-needed // GROWTH_STEP) * GROWTH_STEP)
    return [doubled, snug] if snug < doubled else [doubled]


class KVSessions:
    """The session table of a stage over blocks ``[start, end)``, with its budget.

    A stage calls :meth:`_init_sessions` in its constructor, :meth:`_admit` (holding
    ``self._lock``) before it creates a session, and :meth:`_capacity_for` before a step
    writes past a session's capacity.
    """

    start: int
    end: int
    sessions: dict[str, Any]

    def _init_sessions(self, cache_budget_bytes: int, bytes_per_token_per_layer: int, context_limit: int | None) -> None:
        self.cache_budget_bytes = cache_budget_bytes
        self.bytes_per_token_per_layer = bytes_per_token_per_layer  # keys + values, one layer
        self.bytes_per_token = (self.end - self.start) * bytes_per_token_per_layer  # the whole span
        self.context_limit = context_limit
        self.sessions = {}
        self._lock = threading.Lock()

    @property
    def cache_bytes_used(self) -> int:
        return sum(s.capacity * s.bytes_per_token for s in self.sessions.values())

    def _free_tokens(self, bytes_per_token: int) -> int:
        return max(0, self.cache_budget_bytes - self.cache_bytes_used) // max(1, bytes_per_token)

    @property
    def cache_tokens_free(self) -> int:
        return self._free_tokens(self.bytes_per_token)

    def _admit(self, session_id: str, max_length: int, start: int | None, end: int | None) -> tuple[int, int, int]:
        """Check a new session over ``[start, end)`` (default: the whole span); returns
        ``(start, end, bytes_per_token)``. Admitted if its first chunk of cache fits the
        budget now. Nothing is reserved beyond that: a later step that needs more room
        raises :class:`CacheBudgetExceeded` and changes nothing, and the caller decides
        (end the answer, or continue it on another chain). Call it holding ``_lock``.
        """
        start = self.start if start is None else start
        end = self.end if end is None else end
        if not self.start <= start < end <= self.end:
            raise BadInput(f"blocks [{start}, {end}) are not inside this stage's [{self.start}, {self.end})")
        if max_length <= 0:
            raise BadInput("max_length must be positive")
        if self.context_limit and max_length > self.context_limit:
            raise BadInput(f"max_length {max_length} exceeds the model's context of {self.context_limit} tokens")
        if session_id in self.sessions:
            raise BadInput(f"session {session_id!r} is already open")
        first_chunk = min(max_length, MIN_CACHE_CHUNK)
        bytes_per_token = (end - start) * self.bytes_per_token_per_layer
        free = self._free_tokens(bytes_per_token)
        if first_chunk > free:
            raise CacheBudgetExceeded(f"the KV cache is full: {free} tokens free, a new session needs {first_chunk}")
        return start, end, bytes_per_token

    def _capacity_for(self, session: Any, needed: int) -> int | None:
        """None if ``session`` already holds ``needed`` tokens; else the capacity to grow
        it to, or :class:`CacheBudgetExceeded` when none fits the budget."""
        if needed <= session.capacity:
            return None
        free = self._free_tokens(session.bytes_per_token) + session.capacity  # its own memory is reusable
        for capacity in growth_options(session.capacity, session.max_length, needed):
            if capacity <= free:
                return capacity
        raise CacheBudgetExceeded(f"the KV cache is full: a session at {session.length} tokens cannot grow to {needed}")

    def close(self, session_id: str) -> None:
        with self._lock:
            self.sessions.pop(session_id, None)

    def expire_idle(self, idle_seconds: float) -> list[str]:
        cutoff = time.monotonic() - idle_seconds
        with self._lock:
            stale = [sid for sid, s in self.sessions.items() if s.last_used < cutoff]
            for sid in stale:
                del self.sessions[sid]
        return stale
