"""node/heap.settle: garbage goes first, then what is alive leaves the collector's sight."""

from __future__ import annotations

import gc
import weakref

from shardmesh.node.heap import settle


class Cyclic:
    def __init__(self) -> None:
        self.me = self  # only the collector frees a cycle


def test_settle_collects_cycles_then_freezes_the_living_and_lets_them_go_again() -> None:
    try:
        garbage = Cyclic()
        gone = weakref.ref(garbage)
        del garbage
        kept = Cyclic()
        settle()
        assert gone() is None
        assert gc.get_freeze_count() > 0 and not any(o is kept for o in gc.get_objects())  # frozen: out of sight
        kept_ref = weakref.ref(kept)
        del kept
        gc.collect()
        assert kept_ref() is not None  # a frozen cycle outlives a collection...
        settle()
        assert kept_ref() is None  # ...until the next settle lets the collector see it
    finally:
        gc.unfreeze()
