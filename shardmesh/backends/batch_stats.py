"""What a node's batches cost: step latency, batch sizes, tokens computed.

A :class:`~.batcher.StepBatcher` records every batch it runs here (on the event loop,
after the compute thread is done with it). The figures are plain counts in fixed
buckets, so this room needs no metrics library; ``node/node_metrics.py`` shows them as
Prometheus histograms. One :class:`BatchStats` serves every stage a node loads over its
life, so a move to another span does not reset them.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

__all__ = ["BATCH_BUCKETS", "SECONDS_BUCKETS", "BatchStats", "Buckets"]

#: Upper bounds (seconds) of a batch's latency buckets: a decode step on a CPU to a long prefill.
SECONDS_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
#: Upper bounds of the batch-size buckets (sessions' steps in one computation).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


@dataclass
class Buckets:
    """A histogram: how many observations fell at or under each bound, and their sum."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # per bound, then one for +Inf
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, count)`` pairs as Prometheus writes them, +Inf last."""
        out, running = [], 0
        for bound, count in zip([*map(str, self.bounds), "+Inf"], self.counts):
            running += count
            out.append((bound, running))
        return out


@dataclass
class BatchStats:
    """Every batch a node's stages ran: latency, size and the tokens they computed."""

    seconds: Buckets = field(default_factory=lambda: Buckets(SECONDS_BUCKETS))
    sizes: Buckets = field(default_factory=lambda: Buckets(BATCH_BUCKETS))
    tokens: int = 0

    def record(self, steps: int, tokens: int, seconds: float) -> None:
        self.seconds.observe(seconds)
        self.sizes.observe(steps)
        self.tokens += tokens
