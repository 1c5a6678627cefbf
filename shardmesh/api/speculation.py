"""Speculative decoding at the gateway: guess tokens, let the chain check them in one trip.

Over distance a token costs one trip around the chain, whatever the hops compute. If
the gateway can guess the next few tokens, one trip can check them all: every hop runs
the guesses as extra positions of one step, and the last hop keeps the longest run of
them that it would have drawn itself, plus one token of its own
(:meth:`~shardmesh.contract.chains.Chain.verify`). A right guess saves a trip; a wrong
one costs a little compute and nothing else, since what the client gets is exactly
what it would get without speculation.

:class:`PromptLookup` guesses with no model at all: where the last few tokens appeared
earlier in the prompt or the answer, it proposes what followed them there. Answers
that copy from their prompt (editing, quoting, code) and models that repeat themselves
are where it shines. :class:`DraftLength` adapts how many tokens to propose to how many
were accepted, and :class:`SpeculationStats` counts what it bought, for ``/metrics``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from ..contract import MAX_DRAFT_TOKENS

__all__ = ["DraftLength", "MAX_NGRAM", "PromptLookup", "PromptLookupSource", "SpeculationStats"]

MAX_NGRAM = 3  # the longest run of last tokens looked up: longer matches predict better
MIN_NGRAM = 1
START_K = 4  # tokens proposed at first
PROBE_EVERY = 8  # steps between single-token probes once proposals have stopped paying
MAX_K = 8  # the most per step by default (--draft-tokens): a longer run is rarely all right, and each costs compute


class PromptLookup:
    """One generation's n-gram index over its history, for prompt-lookup drafts.

    For each n from :data:`MAX_NGRAM` down to 1 it looks up the last n tokens; at the
    most recent earlier place they occurred, the tokens that followed are the
    proposal. The index grows with the history (each token is indexed once), so a
    proposal costs O(n) whatever the history's length.
    """

    def __init__(self) -> None:
        self._last_start: dict[tuple[int, ...], int] = {}  # an n-gram -> where it last began
        self._indexed = 0  # n-grams ending before this index are in the index

    def guess(self, history: Sequence[int], k: int) -> list[int]:
        """Up to ``k`` tokens that followed the longest repeat of ``history``'s tail."""
        end = len(history)
        # Index every n-gram that ends before the last token; the tail's own n-grams
        # stay out so that a lookup finds an earlier occurrence, not itself.
        for last in range(self._indexed, end - 1):
            for n in range(MIN_NGRAM, MAX_NGRAM + 1):
                if last - n + 1 >= 0:
                    self._last_start[tuple(history[last - n + 1 : last + 1])] = last - n + 1
        self._indexed = max(self._indexed, end - 1)
        if k <= 0:
            return []
        for n in range(MAX_NGRAM, MIN_NGRAM - 1, -1):
            if end > n and (start := self._last_start.get(tuple(history[end - n :]))) is not None:
                return list(history[start + n : start + n + k])
        return []

    async def propose(self, history: Sequence[int], k: int) -> list[int]:
        return self.guess(history, k)

    async def close(self) -> None:
        return None


class PromptLookupSource:
    """A :class:`~shardmesh.contract.DraftSource` of :class:`PromptLookup`."""

    def drafts(self) -> PromptLookup:
        return PromptLookup()


class DraftLength:
    """How many tokens to propose next, from how the last proposals fared.

    All accepted: propose two more next time; any rejected: one fewer, down to none. A
    run of good guesses so grows quickly towards ``most``, and a generation whose
    guesses keep failing stops paying for them: a wrong draft costs every hop compute,
    and a step of several tokens cannot share a batched forward with other sessions'
    one-token steps. At none, one token is still proposed every :data:`PROBE_EVERY`
    steps, so that text that starts to repeat itself is noticed.
    """

    def __init__(self, start: int = START_K, most: int = MAX_K) -> None:
        self.most = max(1, min(most, MAX_DRAFT_TOKENS))
        self.k = min(start, self.most)
        self._steps_at_none = 0

    def next(self) -> int:
        """How many to propose for the coming step."""
        if self.k:
            return self.k
        self._steps_at_none += 1
        return 1 if self._steps_at_none % PROBE_EVERY == 0 else 0

    def update(self, proposed: int, accepted: int) -> None:
        if proposed == 0:
            return
        self.k = min(self.k + 2, self.most) if accepted == proposed else max(0, self.k - 1)


@dataclass
class SpeculationStats:
    """What speculation did, over every generation of a gateway: decode ``trips``
    (steps that waited for tokens), the ``tokens`` they brought back, and the draft
    tokens ``proposed`` and ``accepted`` among them."""

    trips: int = 0
    tokens: int = 0
    proposed: int = 0
    accepted: int = 0

    @staticmethod
    def sum(stats: Iterable[SpeculationStats]) -> SpeculationStats:
        """Several gateways' (one per model) figures as one."""
        stats = list(stats)
        return SpeculationStats(sum(s.trips for s in stats), sum(s.tokens for s in stats), sum(s.proposed for s in stats),
                                sum(s.accepted for s in stats))

    def record(self, proposed: int, returned: int) -> None:
        self.trips += 1
        self.tokens += returned
        self.proposed += proposed
        self.accepted += returned - 1

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_trip(self) -> float:
        return self.tokens / self.trips if self.trips else 0.0
