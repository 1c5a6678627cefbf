"""How fast one gateway may open sessions on this hop: a token bucket per identity.

Session counts bound what a gateway holds at once; this bounds how fast it churns
through them (every ``open`` costs a hop a signature check, a KV allocation and a
stream to the next hop). Each gateway identity (the one its ticket proves:
:mod:`.gateway_ticket`) gets a bucket of :data:`BURST` opens that refills at
:data:`RATE` per second. Identities are free, so this is a brake on one identity, not
on many; what many can hold is bounded by the hop's session and cache limits.

The table of buckets is bounded: past :data:`MAX_IDENTITIES` the least recently seen
is dropped (it comes back with a full bucket, which only ever errs on the side of
letting a gateway in). Pure: the clock is a parameter.
"""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["BURST", "MAX_IDENTITIES", "OpenRate", "RATE"]

RATE = 10.0  # opens per second a gateway may sustain on one hop: a busy public gateway's share
BURST = 50  # opens at once: a gateway starting up, or replaying many sessions after a failure
MAX_IDENTITIES = 4096


class OpenRate:
    """Per-identity token buckets: :meth:`allow` takes one token if there is one."""

    def __init__(self, rate: float = RATE, burst: int = BURST, max_identities: int = MAX_IDENTITIES) -> None:
        self.rate, self.burst, self.max_identities = rate, burst, max_identities
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # identity -> (tokens, at)

    def allow(self, identity: str, now: float) -> bool:
        tokens, at = self._buckets.pop(identity, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        allowed = tokens >= 1.0
        self._buckets[identity] = (tokens - 1.0 if allowed else tokens, now)
        while len(self._buckets) > self.max_identities:
            self._buckets.popitem(last=False)
        return allowed
