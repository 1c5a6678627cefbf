"""When the gateway audits a step, whom it trusts, and whom it has banned.

Auditing every step would double the swarm's work, auditing none lets a peer answer
what it likes. The policy in between:

* **A new peer is shadowed.** Until a peer has passed :attr:`AuditPolicy.shadow`
  audits, the first token of every chain through it is audited before the client sees
  it, so a peer that lies from the start never gets a wrong token to a client.
* **Then every token has the same small chance**, :attr:`AuditPolicy.rate` (the
  ``--audit-rate`` flag), of a spot check, at most one per chain: an audit re-runs the
  whole history, so one per answer bounds its cost by one prefill. Spot checks run
  beside the answer instead of holding it up (:mod:`.audited_chains`). The hops
  cannot tell an audited step from another: every step of an audited gateway asks
  for the same top-``k`` logprobs, and the decision is taken after the token came
  back. A peer lying on every token of ``n``-token answers is spot-checked in about
  ``1 - (1 - rate) ** n`` of them.
* **A dispute nobody can settle** (two chains disagree and no third one decides) makes
  every suspect new again: their chains are shadowed until they pass again.
* **A caught peer is banned** from this gateway's routes for :attr:`AuditPolicy.ban_s`.

The tables are bounded: past :data:`MAX_PEERS` entries the least useful go first
(expired bans; peers with the fewest passes). Time is passed in; the random draws come
from a :class:`random.Random` the caller may seed.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["AuditPolicy", "DEFAULT_RATE", "MAX_PEERS"]

DEFAULT_RATE = 0.05  # share of steps audited once a chain's peers are trusted
MAX_PEERS = 4096  # peers whose passes (and bans) this gateway remembers


@dataclass
class AuditPolicy:
    rate: float = DEFAULT_RATE
    shadow: int = 3  # audits a peer passes before its chains are audited at ``rate`` only
    ban_s: float = 3600.0  # how long a caught peer stays out of this gateway's routes
    rng: random.Random = field(default_factory=random.Random)
    passes: dict[str, int] = field(default_factory=dict)
    banned_until: dict[str, float] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def trusted(self, peer: str) -> bool:
        return self.passes.get(peer, 0) >= self.shadow

    def shadowed(self, peers: Iterable[str], answers_so_far: int) -> bool:
        """Check this token before it is sent? The first token (``answers_so_far`` 0)
        of a chain through a peer that is not trusted yet."""
        return self.enabled and answers_so_far == 0 and not all(self.trusted(p) for p in peers)

    def spot_check(self) -> bool:
        """Spot-check this token (a chain that has had none yet)?"""
        return self.enabled and self.rng.random() < self.rate

    def passed(self, peers: Iterable[str]) -> None:
        """``peers`` answered as an independent chain did."""
        for peer in peers:
            self.passes[peer] = self.passes.get(peer, 0) + 1
        self._bound(self.passes)

    def disputed(self, peers: Iterable[str]) -> None:
        """An unsettled disagreement: shadow these peers again."""
        for peer in peers:
            self.passes[peer] = 0

    def ban(self, peer: str, now: float) -> None:
        self.banned_until[peer] = now + self.ban_s
        self.passes.pop(peer, None)
        if len(self.banned_until) > MAX_PEERS:
            for p in [p for p, until in self.banned_until.items() if until <= now]:
                del self.banned_until[p]
            self._bound(self.banned_until)

    def banned(self, now: float) -> set[str]:
        return {p for p, until in self.banned_until.items() if until > now}

    @staticmethod
    def _bound(table: dict[str, float] | dict[str, int]) -> None:
        """Keep at most :data:`MAX_PEERS` entries, dropping the smallest values."""
        if len(table) > MAX_PEERS:
            for peer, _ in sorted(table.items(), key=lambda kv: kv[1])[: len(table) - MAX_PEERS]:
                del table[peer]
