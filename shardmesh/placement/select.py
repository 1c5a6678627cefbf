"""Select: which span a joining node should serve.

A node joins with room for ``capacity`` blocks and must pick one contiguous window of
``n = min(capacity, total_blocks)`` of them. It picks where the swarm is weakest, by
these keys in order:

1. **Gaps first.** A block nobody serves makes the whole model unservable, so the window
   covering the most such blocks wins outright.
2. **Then the weakest block.** The swarm's rate is its bottleneck, the smallest per-block
   throughput (spans.py), and the only way one node raises it is by covering that
   block. So the window whose weakest block is weakest wins.
3. **Then the weakest window** (smallest summed throughput). Many windows hold the
   weakest block; the one whose other blocks are thin too helps with what will be the
   *next* bottleneck.
4. **Then the lowest start**, so that nodes seeing the same swarm pick the same window.

What counts is *planned* throughput: online servers and joining ones. A joining node
has announced its span and is loading its weights; counting it keeps the next newcomer
from rushing into the same gap. A draining node is leaving and counts as gone already.

The work is done by :func:`best_start` on two per-block lists (how many planned servers
hold each block, and their summed throughput) in one pass, with prefix sums and a
sliding-window minimum. The simulator (sim.py) keeps those lists up to date itself and
calls the very same function, so what it simulates is what nodes run.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence

from .spans import JOINING, ONLINE, ServerView, valid_span

PLANNED = (ONLINE, JOINING)


def _close(a: float, b: float) -> bool:
    # Per-block sums of the same servers added in another order can differ in the last
    # bits; such windows are equal, and the lowest start must settle them, not noise.
    return abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b))


def best_start(counts: Sequence[int], throughput: Sequence[float], n: int) -> int:
    """The start of the best window of ``n`` blocks, by the keys in the module docstring.

    ``counts[b]`` is how many servers hold block b (0: a gap), ``throughput[b]`` their
    summed per-block throughput. O(total_blocks), whatever ``n``.
    """
    total = len(throughput)
    if len(counts) != total:
        raise ValueError(f"{len(counts)} counts for {total} blocks")
    if not 1 <= n <= total:
        raise ValueError(f"a window of {n} blocks does not fit in {total}")
    # Prefix sums: uncovered[i] / summed[i] cover blocks [0, i), so a window's figure is
    # one subtraction.
    uncovered, summed = [0], [0.0]
    for c, t in zip(counts, throughput):
        uncovered.append(uncovered[-1] + (c <= 0))
        summed.append(summed[-1] + t)
    best_key: tuple[int, float, float] | None = None
    best = 0
    # Sliding minimum: the indices in `rising` have increasing throughput, so the front
    # is the window's weakest block; a block that enters evicts the stronger ones behind
    # it, which can never again be a window's minimum.
    rising: deque[int] = deque()
    for last in range(total):
        while rising and throughput[rising[-1]] >= throughput[last]:
            rising.pop()
        rising.append(last)
        start = last - n + 1
        if start < 0:
            continue
        if rising[0] < start:
            rising.popleft()
        key = (uncovered[last + 1] - uncovered[start], throughput[rising[0]],
               summed[last + 1] - summed[start])
        if best_key is None or _better(key, best_key):
            best_key, best = key, start
    return best


def _better(key: tuple[int, float, float], best: tuple[int, float, float]) -> bool:
    """More gaps covered, else a weaker weakest block, else a weaker window; ties lose."""
    if key[0] != best[0]:
        return key[0] > best[0]
    for mine, theirs in ((key[1], best[1]), (key[2], best[2])):
        if not _close(mine, theirs):
            return mine < theirs
    return False  # a tie keeps the earlier, lower start


def one_per_peer(servers: Iterable[ServerView]) -> list[ServerView]:
    """One view per peer, a later view replacing an earlier one, as a newer record would."""
    return list({s.peer: s for s in servers}.values())


def planned(servers: Iterable[ServerView]) -> list[ServerView]:
    """Servers that count for placement: online and joining ones, not draining.

    A joining node has announced its span and will serve it soon, so others must not
    rush into the same gap. One view per peer: a later view replaces an earlier one.
    """
    return [s for s in one_per_peer(servers) if s.state in PLANNED]


def planned_blocks(
    servers: Iterable[ServerView], total_blocks: int, *, without: str | None = None
) -> tuple[list[int], list[float]]:
    """Per block: how many planned servers hold it, and their summed throughput.

    Views with an impossible span are skipped; a broken throughput (not > 0) still holds
    its blocks but adds nothing, as in spans.block_throughput. ``without``: leave this
    peer out.
    """
    counts = [0] * max(total_blocks, 0)
    throughput = [0.0] * max(total_blocks, 0)
    for s in planned(servers):
        if s.peer == without or not valid_span(s, total_blocks):
            continue
        add = s.throughput if s.throughput > 0 else 0.0  # NaN > 0 is False
        for b in range(s.start, s.end):
            counts[b] += 1
            throughput[b] += add
    return counts, throughput


def window_size(capacity: int, total_blocks: int) -> int:
    """How many blocks a node with room for ``capacity`` serves: all it can, at most the model."""
    if capacity < 1:
        raise ValueError(f"capacity must be at least 1 block, not {capacity}")
    if total_blocks < 1:
        raise ValueError(f"a model needs at least 1 block, not {total_blocks}")
    return min(capacity, total_blocks)


def choose_span(
    servers: Iterable[ServerView], total_blocks: int, capacity: int, *, without: str | None = None
) -> tuple[int, int]:
    """The window ``(start, start + n)`` a node joining with ``capacity`` blocks should serve.

    ``n = min(capacity, total_blocks)``; ValueError if capacity < 1. Gaps first, then the
    weakest planned throughput, ties to the lowest start (see the module docstring).
    ``without``: leave this peer's own record out, for a serving node asking where it
    would go instead.
    """
    n = window_size(capacity, total_blocks)
    counts, throughput = planned_blocks(servers, total_blocks, without=without)
    start = best_start(counts, throughput, n)
    return start, start + n
