"""Where draft tokens come from: what speculative decoding proposes for a chain to check.

A gateway's generation loop asks a :class:`DraftSource` for a source per generation,
then, before each decode step, for up to ``k`` tokens that may follow the text so far.
The chain checks them all in one trip (:meth:`~shardmesh.contract.chains.Chain.verify`).
Proposals only cost time when they are wrong, never correctness: the last hop keeps a
draft only if it is the token it would have drawn anyway. Sources: prompt lookup (no
model, :mod:`shardmesh.api.speculation`) and a small draft model run at the gateway
(:mod:`shardmesh.backends.draft_model`).
"""

from __future__ import annotations

from typing import Protocol, Sequence


class Drafts(Protocol):
    """One generation's proposals; the history it is given only ever grows at the end."""

    async def propose(self, history: Sequence[int], k: int) -> list[int]:
        """Up to ``k`` tokens that may follow ``history`` (prompt, then every token
        generated so far); fewer, or none, when it has no good guess."""
        ...

    async def close(self) -> None: ...


class DraftSource(Protocol):
    """Makes a :class:`Drafts` per generation."""

    def drafts(self) -> Drafts: ...
