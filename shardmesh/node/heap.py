"""The garbage collector and a node's long-lived heap.

A node's process holds some 300,000 objects once torch, transformers' configs and
py-libp2p are imported and its blocks are loaded, and they live as long as the node.
CPython's full collection walks every tracked object: 75-95 ms here, taken whenever
enough new objects have piled up, that is in the middle of someone's step, in each
process of a chain (docs/PERFORMANCE.md 19). :func:`settle` collects once, then moves
everything alive into the permanent generation (``gc.freeze``), so that later full
collections walk only what was made since. It runs after start-up and after each load
of blocks; a load after a move first lets the frozen objects go back to the collector,
so the stage it replaced is collected too.
"""

from __future__ import annotations

import gc

__all__ = ["settle"]


def settle() -> None:
    """Collect what is garbage now, and keep what is alive out of later collections."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
