"""The keys and values of finished sessions' prefixes, kept for the sessions that
start the same way.

A chat's next turn sends the whole conversation again; its start is what the hop
computed last turn. When a session ends cleanly the stage copies the keys and values
of its whole blocks (:mod:`shardmesh.contract.prefixes`) into a :class:`CachedPrefix`,
and a new session whose history starts with named blocks we hold copies them into its
own cache and starts its prefill after them.

Each entry is found by any of its block names, so a history that shares only the
first blocks of an entry still reuses them. An entry whose names are the start of a
newer one is dropped when the newer one arrives (the next turn of a chat supersedes
the last). Entries are evicted least recently used; what they hold counts against the
stage's KV budget (:mod:`.kv_sessions`), and a session that needs the room always
wins over a cached prefix. No tensors here: ``kv`` is whatever the backend copied.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

__all__ = ["CachedPrefix", "PrefixCache"]


@dataclass(eq=False)
class CachedPrefix:
    """The keys and values of ``len(names)`` whole blocks, as the backend copied them."""

    names: list[bytes]
    kv: Any
    nbytes: int


class PrefixCache:
    """Cached prefixes by block name, least recently used first."""

    def __init__(self) -> None:
        self._entries: OrderedDict[bytes, CachedPrefix] = OrderedDict()  # by last name; LRU first
        # Any block name -> the entries that hold it, newest last. A name fixes its
        # block's place, so it is the same number of blocks into each of them.
        self._by_name: dict[bytes, list[CachedPrefix]] = {}
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def longest(self, names: list[bytes]) -> tuple[CachedPrefix | None, int]:
        """The entry holding the longest start of ``names``, and how many blocks of it
        match (0: none). The entry becomes the most recently used."""
        for blocks in range(len(names), 0, -1):
            holders = self._by_name.get(names[blocks - 1])
            if holders:
                entry = holders[-1]
                self._entries.move_to_end(entry.names[-1])
                return entry, blocks
        return None, 0

    def holds(self, names: list[bytes]) -> bool:
        """Whether every block of ``names`` is cached already (then marked recently used)."""
        return bool(names) and self.longest(names)[1] == len(names)

    def add(self, entry: CachedPrefix) -> None:
        """Keep ``entry``; entries it extends go (it holds all they held)."""
        for name in entry.names:
            older = self._entries.get(name)
            if older is not None:
                self._drop(older)
        self._entries[entry.names[-1]] = entry
        for name in entry.names:
            self._by_name.setdefault(name, []).append(entry)
        self.nbytes += entry.nbytes

    def evict_oldest(self) -> bool:
        """Drop the least recently used entry; False if there was none."""
        if not self._entries:
            return False
        self._drop(next(iter(self._entries.values())))
        return True

    def _drop(self, entry: CachedPrefix) -> None:
        del self._entries[entry.names[-1]]
        self.nbytes -= entry.nbytes
        for name in entry.names:
            holders = self._by_name[name]
            holders.remove(entry)
            if not holders:
                del self._by_name[name]
