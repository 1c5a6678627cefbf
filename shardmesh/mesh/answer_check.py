"""Do two chains give the same answer? And if not, which one peer explains it?

An audit (:mod:`.audited_chains`) runs the same history through a second chain and
compares what the two last hops report for the same position: the log-probabilities of
the top ``k`` tokens of the *raw* logits (before penalties and temperature, so every
chain reports the same numbers whatever the request's sampling), plus the token each
chain picked. Honest hops differ only by arithmetic (bfloat16 against float32, CPU
against GPU, torch against MLX); a hop that computes something else, wrong weights or
made-up hidden states, moves them further. How far each goes, and why the lists are
long and the tolerance tight, is measured in docs/SECURITY.md ("Answers are audited",
with the test that reproduces it).

A top-``k`` list says nothing exact about the tokens outside it, only that their
logprob is at most the list's lowest (its *floor*). So two answers *agree* when some
pair of full distributions within :data:`TOLERANCE` of each other fits both lists:
every token in both lists differs by at most the tolerance, and a token one list holds
and the other does not sits at most the tolerance above the other's floor. A greedy
answer must also have picked a token that the other chain ranks within the tolerance
of its best.

When chains disagree, :func:`suspects` names every peer that alone would explain what
was seen: the chains without it agree with each other, and at least one chain with it
does not agree with them. That is the single-liar hypothesis; two peers lying together
can stay unexplained, and then no one is blamed (docs/SECURITY.md). Pure functions on
plain values: no clock, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..contract import MAX_TOP_LOGPROBS, SampledToken

__all__ = ["AUDIT_TOP", "TOLERANCE", "Answer", "agree", "suspects"]

AUDIT_TOP = MAX_TOP_LOGPROBS  # alternatives compared per audited token
TOLERANCE = 0.5  # nats two honest chains may differ by on one token's logprob


@dataclass(frozen=True)
class Answer:
    """What one chain answered for the audited position, and which peers computed it."""

    peers: frozenset[str]
    token: SampledToken


def _entries(t: SampledToken, top: int) -> tuple[dict[int, float], float] | None:
    """Token -> logprob for the listed tokens (the picked one included) and the list's
    floor; None for a malformed answer (wrong length, non-finite or positive values,
    duplicate ids), which agrees with nothing."""
    if len(t.top_logprobs) != top or t.logprob is None:
        return None
    values = dict(t.top_logprobs)
    if len(values) != top:
        return None
    if abs(values.setdefault(t.token_id, t.logprob) - t.logprob) > 1e-4:
        return None  # the picked token listed with another logprob than its own
    if any(not math.isfinite(v) or v > 1e-3 for v in values.values()):
        return None
    return values, min(lp for _, lp in t.top_logprobs)


def _fits(a: tuple[dict[int, float], float], b: tuple[dict[int, float], float], tol: float) -> bool:
    """Every token ``a`` lists is where ``b`` allows it: within ``tol`` of ``b``'s
    value, or at most ``tol`` above ``b``'s floor where ``b`` does not list it."""
    values_b, floor_b = b
    for token, lp in a[0].items():
        if token in values_b:
            if abs(lp - values_b[token]) > tol:
                return False
        elif lp > floor_b + tol:
            return False
    return True


def _near_best(token: int, other: tuple[dict[int, float], float], tol: float) -> bool:
    """Could ``token`` be the argmax of the distribution ``other`` describes?"""
    values, floor = other
    return values.get(token, floor) >= max(values.values()) - tol


def agree(a: SampledToken, b: SampledToken, *, top: int, greedy: bool, tol: float = TOLERANCE) -> bool:
    """True when ``a`` and ``b`` could both be honest answers for the same position.

    ``top`` is how many alternatives each was asked for; ``greedy`` checks the picked
    tokens too (only meaningful for argmax decoding without penalties).
    """
    ea, eb = _entries(a, top), _entries(b, top)
    if ea is None or eb is None:
        return False
    if not (_fits(ea, eb, tol) and _fits(eb, ea, tol)):
        return False
    return not greedy or (_near_best(a.token_id, eb, tol) and _near_best(b.token_id, ea, tol))


def suspects(answers: Sequence[Answer], agreeing: Iterable[tuple[int, int]]) -> set[str]:
    """The peers that, each alone lying, explain ``answers``.

    ``agreeing`` lists the index pairs ``(i, j)`` of answers that agree (either order);
    every other pair disagrees. A peer is a suspect when the answers of chains without
    it all agree with one another and some chain with it disagrees with one of them (or,
    if every chain holds it, when some two answers disagree).
    """
    ok = {frozenset(pair) for pair in agreeing}

    def agrees(i: int, j: int) -> bool:
        return i == j or frozenset((i, j)) in ok

    found: set[str] = set()
    for peer in set().union(*(a.peers for a in answers)):
        clean = [i for i, a in enumerate(answers) if peer not in a.peers]
        dirty = [i for i, a in enumerate(answers) if peer in a.peers]
        if not all(agrees(i, j) for i in clean for j in clean):
            continue
        if clean:
            if any(not agrees(i, j) for i in dirty for j in clean):
                found.add(peer)
        elif any(not agrees(i, j) for i in dirty for j in dirty):
            found.add(peer)
    return found
