"""Sessions and their KV-cache budget: the bookkeeping every backend's stage shares.

A stage keeps one cache per session, allocated as the session grows: what counts
against the stage's byte budget is the *allocated capacity*, not ``max_length``. A
request that allows 4k tokens but stops after 50 costs 256 tokens. Capacity starts at
:data:`MIN_CACHE_CHUNK` (or ``max_length`` if smaller), doubles as the session grows,
or grows just enough (a multiple of :data:`GROWTH_STEP`) when doubling does not fit.

The budget also holds finished sessions' prefixes (:mod:`.prefix_cache`): a new
session reuses the longest one its history starts with (:meth:`KVSessions.reuse_prefix`),
and a cleanly ended one leaves its own (:meth:`KVSessions.keep_prefix`). They are
evicted, least recently used first, whenever a session needs their room, so the free
room a node publishes counts them as free.

How the caches are stored is the backend's business (torch tensors, MLX ``KVCache``);
this module only needs each session to have ``capacity``, ``length``, ``max_length``,
``start``, ``end``, ``bytes_per_token`` and ``last_used``, and a backend that caches
prefixes to copy them (:meth:`KVSessions._copy_prefix`, :meth:`KVSessions._load_prefix`).
No torch, no MLX here.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Sequence

from ..contract import BadInput, CacheBudgetExceeded, UnknownSession
from ..contract.prefixes import PREFIX_BLOCK, prefix_names
from .prefix_cache import CachedPrefix, PrefixCache

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
    caches_prefixes = False  # the backend implements _copy_prefix and _load_prefix

    def _init_sessions(self, cache_budget_bytes: int, bytes_per_token_per_layer: int, context_limit: int | None) -> None:
        self.cache_budget_bytes = cache_budget_bytes
        self.bytes_per_token_per_layer = bytes_per_token_per_layer  # keys + values, one layer
        self.bytes_per_token = (self.end - self.start) * bytes_per_token_per_layer  # the whole span
        self.context_limit = context_limit
        self.sessions = {}
        self.prefixes = PrefixCache()
        self.prefix_tokens_reused = 0  # tokens sessions did not compute again, all told
        self._lock = threading.Lock()

    @property
    def cache_bytes_used(self) -> int:
        """Bytes of the budget in use: the sessions' caches and the cached prefixes."""
        return self._session_bytes() + self.prefixes.nbytes

    def _session_bytes(self) -> int:
        return sum(s.capacity * s.bytes_per_token for s in self.sessions.values())

    def _free_tokens(self, bytes_per_token: int) -> int:
        return max(0, self.cache_budget_bytes - self.cache_bytes_used) // max(1, bytes_per_token)

    @property
    def cache_tokens_free(self) -> int:
        """Tokens of the whole span that new sessions could hold: cached prefixes count
        as free, since any session that needs their room gets it."""
        return max(0, self.cache_budget_bytes - self._session_bytes()) // max(1, self.bytes_per_token)

    def _evict_for(self, nbytes: int) -> None:
        """Drop cached prefixes, oldest first, until ``nbytes`` more fit the budget."""
        while self.cache_budget_bytes - self.cache_bytes_used < nbytes and self.prefixes.evict_oldest():
            pass

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
        self._evict_for(first_chunk * bytes_per_token)
        free = self._free_tokens(bytes_per_token)
        if first_chunk > free:
            raise CacheBudgetExceeded(f"the KV cache is full: {free} tokens free, a new session needs {first_chunk}")
        return start, end, bytes_per_token

    def _capacity_for(self, session: Any, needed: int) -> int | None:
        """None if ``session`` already holds ``needed`` tokens; else the capacity to grow
        it to, or :class:`CacheBudgetExceeded` when none fits the budget."""
        if needed <= session.capacity:
            return None
        options = growth_options(session.capacity, session.max_length, needed)
        for evict in (False, True):
            if evict:  # only when no option fits as things are, and only for the snug one
                self._evict_for((options[-1] - session.capacity) * session.bytes_per_token)
            free = self._free_tokens(session.bytes_per_token) + session.capacity  # its own memory is reusable
            for capacity in options:
                if capacity <= free:
                    return capacity
        raise CacheBudgetExceeded(f"the KV cache is full: a session at {session.length} tokens cannot grow to {needed}")

    def close(self, session_id: str) -> None:
        with self._lock:
            self.sessions.pop(session_id, None)

    # -- cached prefixes ------------------------------------------------------------

    def _names(self, tokens: Sequence[int], scope: str, session: Any) -> list[bytes]:
        # The blocks a session runs here are part of the name: a prefix cached by a
        # session over [0, 4) says nothing of what one over [0, 2) would hold.
        return prefix_names(tokens, f"{scope}|{session.start}-{session.end}")

    def reuse_prefix(self, session_id: str, history: Sequence[int], scope: str) -> int:
        """Fill a just-opened session's cache with the longest cached prefix of
        ``history`` under ``scope`` (whose sessions may share prefixes: one gateway's);
        returns its length in tokens, 0 if none. At least the history's last token is
        left to compute, since its logits are what the next token is drawn from."""
        with self._lock:
            session = self.sessions.get(session_id)
            if session is None:
                raise UnknownSession(f"unknown session {session_id!r}")
            if not self.caches_prefixes or session.length or not self.prefixes:
                return 0
            usable = max(0, min(len(history) - 1, session.max_length)) // PREFIX_BLOCK * PREFIX_BLOCK
            entry, blocks = self.prefixes.longest(self._names(history[:usable], scope, session))
            if entry is None:
                return 0
            n = blocks * PREFIX_BLOCK
            try:
                capacity = self._capacity_for(session, n)  # may evict the entry too; we still hold it
            except CacheBudgetExceeded:
                return 0  # computing it is the session's own business, under its own checks
            self._load_prefix(session, entry.kv, n, capacity)
            session.length = n
            self.prefix_tokens_reused += n
            return n

    def keep_prefix(self, session_id: str, fed: Sequence[int], scope: str) -> int:
        """Before a close: cache the keys and values of the session's whole blocks.
        ``fed`` is every token the session was fed, in order (the gateway says so); only
        what the cache holds of them counts. Returns the tokens cached (0: none, or held
        already)."""
        with self._lock:
            session = self.sessions.get(session_id)
            if session is None or not self.caches_prefixes:
                return 0
            n = min(session.length, len(fed)) // PREFIX_BLOCK * PREFIX_BLOCK
            if n == 0:
                return 0
            names = self._names(fed[:n], scope, session)
            if self.prefixes.holds(names):
                return 0
            nbytes = n * session.bytes_per_token
            if nbytes > self.cache_budget_bytes - self._session_bytes() + session.capacity * session.bytes_per_token:
                return 0  # would not fit even with every other prefix gone
            entry = CachedPrefix(names, self._copy_prefix(session, n), nbytes)
            del self.sessions[session_id]
            self._evict_for(nbytes)
            self.prefixes.add(entry)
            return n

    def _copy_prefix(self, session: Any, n: int) -> Any:
        """The backend's copy of the first ``n`` tokens of a session's keys and values."""
        raise NotImplementedError

    def _load_prefix(self, session: Any, kv: Any, n: int, capacity: int | None) -> None:
        """Copy ``kv``'s first ``n`` tokens into an empty session, grown to ``capacity`` first (None: it holds ``n``)."""
        raise NotImplementedError

    def expire_idle(self, idle_seconds: float) -> list[str]:
        cutoff = time.monotonic() - idle_seconds
        with self._lock:
            stale = [sid for sid, s in self.sessions.items() if s.last_used < cutoff]
            for sid in stale:
                del self.sessions[sid]
        return stale
