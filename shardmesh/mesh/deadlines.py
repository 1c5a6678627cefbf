"""How long the gateway and the hops wait for each other: bounds that follow the swarm.

A flat bound long enough for a 2,048-token prefill on a slow CPU (two minutes) lets a
peer that accepts a session and then says nothing (a black hole, or a frozen process)
hold a request that long, and a new identity costs its owner nothing. So:

* **Steps** are bounded by what this gateway has measured of its chains: a few times
  the median time per token of recent steps (:class:`StepTimes`), never less than
  :data:`STEP_FLOOR` (an honest hop may be busy with another session's prefill chunk
  or a garbage collection), never more than :data:`STEP_CAP`, and :data:`STEP_CAP`
  until enough steps have been measured.
* **A late token is looked into early**: after :meth:`StepTimes.probe_after` (a few
  times the median, at least :data:`PROBE_FLOOR`) the gateway pings every hop, and a
  hop that does not answer (frozen, or gone) is blamed then, long before the step's
  bound; if all answer, the step waits on to its bound. A busy hop still answers
  pings: its compute runs beside its event loop.
* **Opens** are bounded by the route's length (:func:`open_wait`). A hop waits for the
  next hop's answer a little less than the hop before it waits for its own, so the
  hop right before a silent one always speaks first and names it; each hop needs only
  :data:`HOP_ANSWER` for itself plus :data:`HOP_REACH` to reach the next.

Pure arithmetic and a ring of numbers: no I/O, no clock of its own.
"""

from __future__ import annotations

import statistics
from collections import deque

from .host import STREAM_OPEN_TIMEOUT

STEP_FLOOR = 15.0  # s: the shortest a step is ever given
PROBE_FLOOR = 3.0  # s: a late token is looked into (the hops pinged) no sooner than this
PROBE_FACTOR = 4.0  # times the median a token may be late before the hops are pinged
STEP_CAP = 120.0  # s: a step's bound before measurements (a long prefill on a slow CPU)
STEP_FACTOR = 8.0  # times the median a step may take before it counts as lost
SAMPLES = 64  # recent steps the median is taken over
MIN_SAMPLES = 3  # steps measured before the median is trusted

HOP_ANSWER = 10.0  # s a hop may take to check an open and answer for itself
HOP_REACH = STREAM_OPEN_TIMEOUT + 2.0  # s to dial the next hop and open a stream (host.py bounds it)

__all__ = ["HOP_ANSWER", "HOP_REACH", "PROBE_FLOOR", "STEP_CAP", "STEP_FLOOR", "StepTimes", "open_wait"]


def open_wait(hops: int) -> float:
    """Seconds to wait for the answer to an ``open`` sent to the first of ``hops`` hops.

    The last hop answers for itself (:data:`HOP_ANSWER`); each hop before it first
    reaches the next one and waits for its answer, so each level adds
    :data:`HOP_REACH` + :data:`HOP_ANSWER`. The gateway waits ``open_wait(len(route))``,
    a hop with ``n`` hops after it waits ``open_wait(n)`` for the next one: always
    shorter than the wait of the hop (or gateway) before it.
    """
    if hops < 1:
        raise ValueError(f"a route has at least one hop, not {hops}")
    return HOP_ANSWER + (hops - 1) * (HOP_REACH + HOP_ANSWER)


class StepTimes:
    """Times of recent steps through this gateway's chains, and the bound for the next.

    A step is measured from the moment its tokens are sent to the moment the token
    comes back; ``tokens`` counts every token sent since the previous token (a prefill
    sent in chunks is one measurement). Time per token is what is kept: decode steps
    and prefills then share one figure, and a prefill of ``n`` tokens is given ``n``
    times the per-token bound (prefill costs less per token than decode, so this is
    generous).
    """

    def __init__(self) -> None:
        self._per_token: deque[float] = deque(maxlen=SAMPLES)

    def record(self, tokens: int, seconds: float) -> None:
        if tokens > 0 and seconds >= 0:
            self._per_token.append(seconds / tokens)

    def probe_after(self, tokens: int) -> float:
        """Seconds after sending ``tokens`` tokens to ping the hops if no token came."""
        bound = self.deadline(tokens)
        if len(self._per_token) < MIN_SAMPLES:
            return min(bound, PROBE_FLOOR)
        return min(bound, max(PROBE_FLOOR, PROBE_FACTOR * statistics.median(self._per_token) * max(1, tokens)))

    def deadline(self, tokens: int) -> float:
        """Seconds to wait for the token after sending ``tokens`` tokens."""
        if len(self._per_token) < MIN_SAMPLES:
            return STEP_CAP
        bound = STEP_FACTOR * statistics.median(self._per_token) * max(1, tokens)
        return min(STEP_CAP, max(STEP_FLOOR, bound))
