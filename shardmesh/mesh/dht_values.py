"""What this node's DHT stores under ``/shardmesh/``: which values, and for how long.

:class:`RecordValidator` is the namespace's validator (docs/PROTOCOL.md, section 4.2);
:class:`ExpiringValues` removes each stored value when its record expires, since
py-libp2p would keep and serve it for 24 h. Both are re-exported by :mod:`.dht`.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import trio
from libp2p.records.validator import Validator

from .record_keys import record_key
from .records import NodeRecord, RecordError, verify_record

__all__ = ["ExpiringValues", "RecordValidator"]


class RecordValidator(Validator):
    """KadDHT validator for the ``/shardmesh/`` namespace.

    ``validate``: the value is a signed NodeRecord, not expired, for ``model_id`` (the
    model this node serves; None accepts any, for tools), and the key is the one derived
    from the record's own model and peer, so a node can write only its own key (the
    DHT's own signatures say who *stored* a value, not who wrote it). A node stores
    records of its own model only: it has no use for others', and a stranger must not
    be able to fill its store with them. ``on_valid(key, record)`` is told of each value
    that passed, so that the store can drop it at the record's expiry.

    ``select``: index of the best value: valid records beat invalid or expired ones,
    then the highest ``seq``; ties keep the earlier index. Ranking by content makes it
    indifferent to the order py-libp2p passes values in, and lets a restarted node
    (fresh record) replace its stale one even if the stale one had a higher seq.
    """

    def __init__(
        self,
        model_id: str | None = None,
        on_valid: Callable[[str, NodeRecord], None] | None = None,
        allowed: Callable[[str], bool] | None = None,
    ) -> None:
        self.model_id = model_id
        self._on_valid = on_valid
        self._allowed = allowed  # a private swarm's list: nobody else's records are stored

    def validate(self, key: str, value: bytes) -> None:
        record = self._check(key, value)
        if self._on_valid is not None:
            self._on_valid(key, record)

    def select(self, key: str, values: list[bytes]) -> int:
        best, best_seq = 0, -1
        for i, value in enumerate(values):
            try:
                seq = self._check(key, value).seq
            except RecordError:
                continue
            if seq > best_seq:
                best, best_seq = i, seq
        return best

    def _check(self, key: str, value: bytes) -> NodeRecord:
        record = verify_record(value, expected_model=self.model_id)
        expected = record_key(record.model, record.peer)
        if key != expected:
            raise RecordError(RecordError.WRONG_KEY, f"record of {record.peer} stored under {key}, not {expected}")
        if self._allowed is not None and not self._allowed(record.peer):
            raise RecordError(RecordError.WRONG_PEER, f"{record.peer} is not in this private swarm")
        return record


class ExpiringValues:
    """Drops ``/shardmesh/`` values from py-libp2p's value store at their record's expiry.

    py-libp2p keeps every stored value for 24 h and answers ``GET_VALUE`` from its store
    without validating again, so a record would be served for a day after it expired.
    The validator tells :meth:`track` the expiry of every value it passed; :meth:`run`
    sleeps until the earliest one and removes what is stored under that key if its
    record has expired by then (a refreshed value stays: its own put tracked it anew).
    At most ``max_tracked`` keys are stored (strangers choose how many keys they put,
    one per free identity): past that, :meth:`track` refuses a new key, the validator
    with it, and py-libp2p does not store the value.
    """

    def __init__(self, max_tracked: int = 4096) -> None:
        self.max_tracked = max_tracked
        self.value_store: Any = None  # py-libp2p ValueStore, set by run()
        self._due: dict[str, float] = {}  # key -> latest expiry seen for it (unix s)
        self._wake = trio.Event()

    def track(self, key: str, record: NodeRecord) -> None:
        if key not in self._due and len(self._due) >= self.max_tracked:
            raise RecordError(RecordError.NO_ROOM, f"this node already stores {self.max_tracked} records")
        self._due[key] = max(self._due.get(key, 0.0), record.expires)
        self._wake.set()

    def drop_expired(self, now: float) -> int:
        """Remove the stored values whose tracked expiry has passed; how many went."""
        dropped = 0
        for key in [k for k, t in self._due.items() if t < now]:
            del self._due[key]
            stored = self.value_store.get(key.encode()) if self.value_store is not None else None
            if stored is None:
                continue
            try:
                verify_record(stored.value, now=now)
            except RecordError:
                self.value_store.remove(key.encode())
                dropped += 1
        return dropped

    async def run(self, value_store: Any) -> None:
        self.value_store = value_store
        while True:
            self.drop_expired(time.time())
            self._wake = trio.Event()
            wait = min(self._due.values(), default=math.inf) - time.time()
            with trio.move_on_after(max(0.0, wait) + 0.01):
                await self._wake.wait()
