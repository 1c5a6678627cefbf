"""How many blocks fit in a node's memory.

Blocks do not all weigh the same: the first stage also holds the token embeddings and
the last one the final norm and LM head (for small models these outweigh several
blocks). A node that may be placed anywhere must be able to hold any window of its
size, so its capacity is the largest ``n`` for which the heaviest window of ``n``
blocks, extras included, fits in its budget.
"""

from __future__ import annotations

from collections.abc import Sequence


def window_bytes(blocks: Sequence[int], embeddings: int, head: int, start: int, end: int) -> int:
    """Weight bytes of a stage serving ``[start, end)``."""
    extra = (embeddings if start == 0 else 0) + (head if end == len(blocks) else 0)
    return sum(blocks[start:end]) + extra


def blocks_that_fit(blocks: Sequence[int], embeddings: int, head: int, budget_bytes: int) -> int:
    """The largest n such that every window of n blocks fits in ``budget_bytes`` (0: none)."""
    total = len(blocks)
    best = 0
    for n in range(1, total + 1):
        heaviest = max(window_bytes(blocks, embeddings, head, s, s + n) for s in range(total - n + 1))
        if heaviest > budget_bytes:
            break
        best = n
    return best
