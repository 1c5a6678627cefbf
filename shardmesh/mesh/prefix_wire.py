"""The prefix cache on the wire (docs/PROTOCOL.md 6.8): what an ``open`` with ``cache``
lets a hop reuse, what its ``ok`` says it reused, and what a ``close`` says was fed.

A hop starts such a session with the longest cached prefix of its history that it
holds for the same *scope*, and answers ``cached``: the fewest tokens any hop from
here to the last one holds, since the gateway's prefill must start where every hop can
follow. At the end the gateway's ``close`` carries, as int64 ids, the tokens fed after
the open's history, so each hop can name the keys and values it keeps.

The scope is the gateway and the peer the steps come from: only sessions of one
gateway share prefixes (nobody can plant keys and values in another gateway's
answers, or time its cache), and only through the same upstream peer (an upstream hop
that sent bad hidden states once reaches no session that does not pass through it).
Pure: no streams, no trio.
"""

from __future__ import annotations

from array import array
from typing import Any, Mapping, Sequence

__all__ = ["cache_scope", "close_payload", "fed_at_close", "reported_cached"]


def cache_scope(gateway: str, upstream_peer: str) -> str:
    """Whose cached prefixes a session may reuse, and under which its own are kept."""
    return f"{gateway}|{upstream_peer}"


def reported_cached(header: Mapping[str, Any], at_most: int) -> int:
    """The ``cached`` of an ``ok`` reply, within ``[0, at_most]``; 0 for anything else
    (a hop that says nothing, or nonsense, holds nothing as far as we know)."""
    cached = header.get("cached", 0)
    if not isinstance(cached, int) or isinstance(cached, bool) or cached < 0:
        return 0
    return min(cached, at_most)


def close_payload(history_length: int, fed: Sequence[int]) -> bytes:
    """A ``close``'s payload: the ids fed after the open's history (none if ``fed`` is
    not longer than it)."""
    return array("q", fed[history_length:]).tobytes()


def fed_at_close(history: Sequence[int], payload: bytes, max_length: int) -> list[int]:
    """Every token a session was fed: the open's history, then the ``close``'s ids. A
    payload that is not whole int64 ids, or runs past ``max_length``, adds nothing."""
    if not payload or len(payload) % 8 or len(history) + len(payload) // 8 > max_length:
        return list(history)
    tail = array("q")
    tail.frombytes(payload)
    return [*history, *tail]
