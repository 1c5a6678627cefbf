"""Chains whose answers the gateway spot-checks against other peers.

A peer that serves blocks can return anything: hidden states from other weights, or,
as the last hop, tokens of its choosing. Nothing in one chain can tell. So the gateway
audits: for a step the policy picks (:mod:`.audit_policy`), it sends the same history
through a second chain that avoids the first one's peers, as a fresh session that
prefills it all, and compares the two answers for that position (:mod:`.answer_check`).

* They agree: the peers of each chain that the other did not hold have passed an audit.
* They disagree: more chains, each avoiding the peers still suspected, until a single
  peer explains everything seen (:func:`~.answer_check.suspects`), or
  :data:`MAX_EXTRA_CHAINS` were tried. Where two suspects remain and only one of them
  has a history of passed audits, the new one is the liar. The one found is banned from
  this gateway's routes; if it was on the request's own chain, the step fails with
  ``audit_failed`` against it, and the request replays on a chain without it.
  Undecided suspects are shadowed again.

Two kinds of audit. A *shadow* audit (a new peer's first token) holds the token until
it is checked, so a liar caught there never gets a wrong token to the client. A *spot
check* (the ``--audit-rate`` draw, at most one per chain) runs beside the answer,
which goes on meanwhile: if it catches a peer of the chain, the answer's next step
replays without it, and the tokens sent in between stay sent. At most
:data:`MAX_SPOT_CHECKS` run at once, so a gateway's users cannot make it audit more.

Peers are never audited against themselves: this gateway's own blocks are trusted, and
a chain that could only be rebuilt from the same peers is not audited. Every chain asks
its last hop for at least :data:`~.answer_check.AUDIT_TOP` alternatives on every step
(so an audited step looks like any other); what the client did not ask for is cut off
before the token leaves this module. Audit chains are best effort: one that cannot be
routed or fails leaves the request alone.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Callable, Sequence

import trio

from ..contract import ChainFailed, SampledToken, SamplingParams, StageError
from ..placement.claims import MeasuredSpeeds
from ..placement.routing import Hop
from .answer_check import AUDIT_TOP, Answer, agree, suspects
from .audit_policy import AuditPolicy
from .chain_client import RemoteChain
from .mesh_chains import MeshChains

__all__ = ["AUDIT_FAILED", "AuditedChain", "AuditedChains", "MAX_EXTRA_CHAINS", "MAX_SPOT_CHECKS"]

log = logging.getLogger("shardmesh.mesh.audited_chains")

AUDIT_FAILED = "audit_failed"
MAX_EXTRA_CHAINS = 3  # chains tried to settle one dispute, beyond the two that disagreed
MAX_SPOT_CHECKS = 2  # spot checks one gateway runs at once; more are skipped
REPLAY_CHUNK = 512  # tokens per prefill step of an audit chain


def _asked(sampling: SamplingParams) -> SamplingParams:
    """What every audited chain asks its last hop for: at least AUDIT_TOP alternatives."""
    return replace(sampling, logprobs=True, top_logprobs=max(sampling.top_logprobs, AUDIT_TOP))


def _as_client_asked(token: SampledToken, sampling: SamplingParams) -> SampledToken:
    return replace(
        token,
        logprob=token.logprob if sampling.logprobs else None,
        top_logprobs=token.top_logprobs[: sampling.top_logprobs],
    )


class AuditedChains:
    """A chain opener over :class:`MeshChains` whose chains are audited."""

    def __init__(
        self, inner: MeshChains, policy: AuditPolicy, speeds: MeasuredSpeeds, me: str,
        clock: Callable[[], float],
    ) -> None:
        self.inner = inner
        self.policy = policy
        self.speeds = speeds  # decode steps measured here cap what peers claim (placement/claims.py)
        self.me = me
        self.clock = clock  # for bans: the same clock routing reads them with
        self._spot_checks = 0  # running now

    def available(self) -> bool:
        return self.inner.available()

    def chain(
        self, session_id: str, sampling: SamplingParams, prompt_ids: list[int], generated: list[int],
        avoid: frozenset[str] = frozenset(),
    ) -> AuditedChain:
        asked = _asked(sampling) if self.policy.enabled else sampling
        inner = self.inner.chain(session_id, asked, prompt_ids, generated, avoid)
        return AuditedChain(self, inner, sampling, asked, prompt_ids + generated)

    def spot_check(self, chain: AuditedChain, history: list[int], main: Answer) -> None:
        """Audit ``main`` beside the answer, unless :data:`MAX_SPOT_CHECKS` already run."""
        if self._spot_checks >= MAX_SPOT_CHECKS:
            return
        self._spot_checks += 1
        self.inner.nursery.start_soon(self._spot, chain, history, main)

    async def _spot(self, chain: AuditedChain, history: list[int], main: Answer) -> None:
        try:
            await self.audit(f"{chain.inner.session_id}-s", chain.asked, history, main)
        except ChainFailed as exc:
            chain.caught = exc
        except Exception:  # a spot check runs in the node's nursery: it must never end it
            log.exception("a spot check failed")
        finally:
            self._spot_checks -= 1

    def peers(self, chain: RemoteChain) -> frozenset[str]:
        return frozenset(hop.peer for hop in chain.route or ()) - {self.me}

    async def audit(self, session_id: str, sampling: SamplingParams, history: list[int], main: Answer) -> None:
        """Check ``main`` (the answer after ``history``); raises :class:`ChainFailed`
        against a peer of the main chain caught lying."""
        greedy = sampling.greedy and sampling.presence_penalty == sampling.frequency_penalty == 0 \
            and sampling.repetition_penalty == 1 and not sampling.logit_bias and sampling.grammar is None
        top = max(sampling.top_logprobs, AUDIT_TOP)
        answers = [main]
        agreeing: list[tuple[int, int]] = []

        async def another(avoid: frozenset[str]) -> bool:
            """One more chain's answer, unless routing can only rebuild one we have."""
            seen = {a.peers for a in answers}
            answer = await self._answer(f"{session_id}-a{len(answers)}", sampling, history, avoid, seen)
            if answer is None:
                return False
            agreeing.extend((i, len(answers)) for i, a in enumerate(answers)
                            if agree(a.token, answer.token, top=top, greedy=greedy))
            answers.append(answer)
            return True

        if not await another(main.peers):
            return  # no independent chain now: nothing to compare with
        if agreeing:
            self.policy.passed(main.peers ^ answers[1].peers)
            return
        while len(answers) < 2 + MAX_EXTRA_CHAINS:
            found = suspects(answers, agreeing)
            if len(found) <= 1:
                break
            # First a chain without any suspect; else one that keeps a single suspect.
            options = [frozenset(found)] + [frozenset(found - {p}) for p in sorted(found)]
            if not await self._first_new(another, options):
                break
        self._settle(suspects(answers, agreeing), main)

    @staticmethod
    async def _first_new(another: Callable, options: list[frozenset[str]]) -> bool:
        for avoid in options:
            if await another(avoid):
                return True
        return False

    def _settle(self, found: set[str], main: Answer) -> None:
        new = {p for p in found if not self.policy.trusted(p)}
        liar = next(iter(found)) if len(found) == 1 else next(iter(new)) if len(new) == 1 else None
        if liar is None:
            log.warning("an audit found chains that disagree and could not tell who lies (suspects: %s)",
                        ", ".join(sorted(found)) or "none")
            self.policy.disputed(found)
            return
        self.policy.ban(liar, self.clock())
        log.warning("audit: %s answered differently from independent peers; banned for %.0f s",
                    liar, self.policy.ban_s)
        if liar in main.peers:
            raise ChainFailed(liar, AUDIT_FAILED, "its answer differs from independent peers' (audit)")

    async def _answer(
        self, session_id: str, sampling: SamplingParams, history: list[int], avoid: frozenset[str],
        seen: set[frozenset[str]],
    ) -> Answer | None:
        """``history`` prefilled through a fresh chain avoiding ``avoid``: its answer;
        None if the chain fails or holds the same peers as one in ``seen``."""
        route = self.inner.find_route(len(history) + 1, avoid)
        if route is None or frozenset(h.peer for h in route) - {self.me} in seen:
            return None
        # No grammar: the raw logprobs compared are the same with or without one, and
        # with the whole history as its prompt the grammar would start over here.
        chain = self.inner.chain(session_id, replace(_asked(sampling), grammar=None), history, [], route=route)
        try:
            # Its hops may hold a prefix of the history from earlier sessions: computed
            # by those same peers, so the audit stays independent of the audited chain.
            cached = await chain.open(len(history) + 1)
            token = None
            for start in range(cached, len(history), REPLAY_CHUNK):
                chunk = history[start : start + REPLAY_CHUNK]
                token = await chain.step(chunk, start, start + len(chunk) == len(history))
        except (ChainFailed, StageError) as exc:  # StageError: a full cache, say
            log.info("an audit chain failed (%s); this audit is skipped", exc)
            return None
        finally:
            await chain.close()
        assert token is not None
        return Answer(self.peers(chain), token)


class AuditedChain:
    """One session of the request (a :class:`RemoteChain`), audited as it goes."""

    def __init__(
        self, auditor: AuditedChains, inner: RemoteChain, sampling: SamplingParams, asked: SamplingParams, history: list[int],
    ) -> None:
        self.auditor = auditor
        self.history = history  # what the chain is opened with
        self.inner = inner
        self.sampling = sampling  # what the client asked for
        self.asked = asked  # what the last hop is asked for
        self.fed: list[int] = []  # every id sent into the chain so far
        self.answers = 0
        self.spot_checked = False
        self.caught: ChainFailed | None = None  # set by a spot check that caught a peer of this chain

    @property
    def parallel_stages(self) -> int:
        return self.inner.parallel_stages

    @property
    def prefill_step(self) -> int | None:
        return self.inner.prefill_step

    @property
    def route(self) -> list[Hop] | None:
        return self.inner.route

    async def open(self, max_length: int) -> int:
        cached = await self.inner.open(max_length)
        self.fed = self.history[:cached]  # the first step comes after what the hops hold
        return cached

    async def step(self, token_ids: list[int], position: int, want_token: bool) -> SampledToken | None:
        if self.caught is not None:
            raise self.caught  # the request goes on without the liar, from here
        began = trio.current_time()
        token = await self.inner.step(token_ids, position, want_token)
        self.fed[position:] = token_ids
        if token is None:
            return None
        return await self._answered(token, began, decode=len(token_ids) == 1)

    async def verify(self, token_ids: list[int], position: int, draft: int) -> list[SampledToken]:
        """A speculative step. Each token it brings back is an answer of its own, to the
        history up to it (the drafts accepted before it included), and may be audited
        as a token of a plain step would be: a last hop that accepts a wrong draft or
        makes up the token after them is caught the same way."""
        if self.caught is not None:
            raise self.caught
        began = trio.current_time()
        tokens = await self.inner.verify(token_ids, position, draft)
        self.fed[position:] = token_ids[: len(token_ids) - draft]
        answered = []
        for i, token in enumerate(tokens):
            if i:
                self.fed.append(tokens[i - 1].token_id)
            answered.append(await self._answered(token, began, decode=i == 0 and len(token_ids) == draft + 1))
        return answered

    async def _answered(self, token: SampledToken, began: float, *, decode: bool) -> SampledToken:
        """Audit ``token`` (the answer to ``self.fed``) if the policy says so; what the
        client asked for of it. A decode step's time is a measure of the route's speed."""
        if decode:
            self.auditor.speeds.record(self.inner.route or [], trio.current_time() - began)
        peers = self.auditor.peers(self.inner)
        policy = self.auditor.policy
        if peers and policy.shadowed(peers, self.answers):
            await self.auditor.audit(self.inner.session_id, self.asked, list(self.fed), Answer(peers, token))
        elif peers and not self.spot_checked and policy.spot_check():
            self.spot_checked = True
            self.auditor.spot_check(self, list(self.fed), Answer(peers, token))
        self.answers += 1
        return _as_client_asked(token, self.sampling)

    async def close(self, fed: Sequence[int] = ()) -> None:
        await self.inner.close(fed)
