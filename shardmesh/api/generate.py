"""One generation: prompt ids in, a stream of tokens with their text out.

The loop is the same whoever holds the blocks: it asks a *chain opener* for a session
over the whole model (local stages, or a chain of peers over the mesh), sends the
prompt in chunks, then feeds each sampled token back until a stop condition, with the
tokens its draft source guesses will follow (speculative decoding, :mod:`.speculation`):
a step may then bring back several tokens, each handled as if it came alone. A chain
that breaks mid-answer is replaced and replayed by :mod:`.resumable`, out of sight of
this loop. It holds only the tokenizer (and, with ``--draft-model``, a handle on a
draft model run elsewhere in the process), never weights.
"""

from __future__ import annotations

import logging
import secrets
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator, Callable

from ..contract import CacheBudgetExceeded, ChainOpener, DraftSource, ModelUnavailable, SampledToken, SamplingParams
from ..contract.prefixes import PREFIX_BLOCK
from ..placement.spans import Repair
from .resumable import ResumableChain
from .speculation import MAX_K, DraftLength, SpeculationStats
from .text import IncrementalDetokenizer, StopMatcher

log = logging.getLogger(__name__)

DEFAULT_ROUTE_WAIT = 30.0  # seconds a request waits for a working chain before a 503


class PromptTooLong(Exception):
    """The prompt does not fit the model's context (HTTP 400)."""


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...] = ()
    speculative: bool = True  # False: no draft tokens for this request (the client's `speculative: false`)


@dataclass(frozen=True)
class TopLogprob:
    """One of the most likely tokens at a step, as clients asked with ``top_logprobs``."""

    token_id: int
    text: str
    logprob: float


@dataclass(frozen=True)
class TokenEvent:
    """One generated token and the text it releases (possibly "" while held back)."""

    token_id: int
    text: str
    logprob: float | None
    top_logprobs: tuple[TopLogprob, ...]


@dataclass(frozen=True)
class Finished:
    """Always the last event of a stream."""

    reason: str  # "stop" | "length"
    text: str
    prompt_tokens: int
    completion_tokens: int


def eos_token_ids(tokenizer, generation_config=None) -> frozenset[int]:
    ids: set[int] = set()
    for source in (generation_config, tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)


class Generator:
    """Turns :class:`GenerationRequest` into a stream of events for the HTTP layer.

    ``route_wait`` is how long a request waits for a working chain, at the start or
    after a chain broke mid-answer, before it fails with :class:`ModelUnavailable`.
    """

    def __init__(
        self,
        model_name: str,
        tokenizer,
        context_length: int,
        chains: ChainOpener,
        eos_ids: frozenset[int],
        *,
        route_wait: float = DEFAULT_ROUTE_WAIT,
        repair: Callable[[], Repair] | None = None,
        drafts: DraftSource | None = None,
        draft_tokens: int = MAX_K,
    ):
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.chains = chains
        self.eos_ids = eos_ids
        self.route_wait = route_wait
        self.repair = repair  # the swarm's gaps and who fills them: requests wait for a repair under way
        self.accepting = True  # False while the node drains: new requests get a 503
        self.active = 0  # generations running now (a draining node waits for them)
        self.drafts = drafts  # speculative decoding's proposals (None: off, --no-speculation)
        self.draft_tokens = draft_tokens  # the most proposed per step (--draft-tokens)
        self.speculation = SpeculationStats()
        self.cached_tokens = 0  # history tokens its chains held already (prefix caches), all told
        self.waiting = 0  # generations running that have no first token yet
        self.running: set[ResumableChain] = set()  # the chains of the generations running now
        self.failovers = 0  # chains replaced mid-generation, all told
        self.failover_pause = 0.0  # seconds generations paused for those replacements

    def ready(self) -> bool:
        return self.chains.available()

    def worth_waiting(self) -> bool:
        """A chain exists now, or the swarm may be filling a gap (``Repair.may_heal``): a
        request may wait; ``ResumableChain`` gives up early if no repair starts."""
        return self.ready() or (self.repair is not None and self.repair().may_heal)

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _event(self, token: SampledToken, text: str) -> TokenEvent:
        top = tuple(TopLogprob(i, self._token_text(i), lp) for i, lp in token.top_logprobs)
        return TokenEvent(token.token_id, text, token.logprob, top)

    async def prefill(self, prompt: list[int]) -> None:
        """Compute ``prompt`` through a chain, then close it: its hops keep the prompt's
        prefix (the prefix cache) for the sessions that follow, so that the choices of
        one request (``n``) share one prefill. Never raises: a choice that then finds no
        chain says why itself."""
        if len(prompt) < 2 * PREFIX_BLOCK or len(prompt) >= self.context_length:
            return  # too short to hold a block worth a round trip
        chain = ResumableChain(self.chains, SamplingParams(temperature=0.0), prompt, len(prompt) + 1, wait=self.route_wait,
                               repair=self.repair)  # fmt: skip
        try:
            await chain.start()
        except Exception as exc:
            log.info("the shared prefill of a request's choices failed (%s); each computes its own", exc)
        finally:
            await chain.close()
            self.cached_tokens += chain.cached_tokens

    def answers(self) -> list[dict[str, Any]]:
        """The generations running now, for the swarm map: the route each runs on (None
        for this node's own blocks, empty while one is being found), its tokens so far
        and its failovers."""
        return [{"route": None if (route := chain.route) is None else [{"peer": p, "start": a, "end": b} for p, a, b in route],
                 "tokens": len(chain.generated), "failovers": chain.failovers} for chain in self.running]  # fmt: skip

    async def stream(self, req: GenerationRequest) -> AsyncIterator[TokenEvent | Finished]:
        if not self.accepting:
            raise ModelUnavailable("this node is shutting down; send the request to another gateway")
        self.active += 1
        try:
            # aclosing: when our caller stops early (a client gone, or after Finished),
            # the inner generator's chain is closed now, not whenever it is collected.
            async with aclosing(self._stream(req)) as events:
                async for event in events:
                    yield event
        finally:
            self.active -= 1

    async def _stream(self, req: GenerationRequest) -> AsyncIterator[TokenEvent | Finished]:
        prompt = list(req.prompt_ids)
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) >= self.context_length:
            raise PromptTooLong(
                f"the prompt has {len(prompt)} tokens; this model's context is {self.context_length} tokens"
            )
        max_tokens = min(req.max_tokens, self.context_length - len(prompt))
        sampling = req.sampling
        if sampling.seed is None:
            # Fix a seed per request: a replay after failover then draws the same tokens.
            sampling = replace(sampling, seed=secrets.randbits(63))

        chain = ResumableChain(self.chains, sampling, prompt, len(prompt) + max_tokens, wait=self.route_wait, repair=self.repair)
        drafts = self.drafts.drafts() if (self.drafts is not None and req.speculative) else None
        length = DraftLength(most=self.draft_tokens)
        history = list(prompt)  # the prompt and every token drawn: what drafts continue
        try:
            self.running.add(chain)
            self.waiting += 1
            try:
                run = [await chain.start()]
            finally:
                self.waiting -= 1
            detok = IncrementalDetokenizer(self.tokenizer)
            stops = StopMatcher(req.stop)
            produced = 0
            while True:
                for token in run:
                    produced += 1
                    if token.token_id in self.eos_ids:
                        yield Finished("stop", stops.feed(detok.flush())[0] + stops.flush(), len(prompt), produced - 1)
                        return
                    history.append(token.token_id)
                    released, hit = stops.feed(detok.add(token.token_id))
                    yield self._event(token, released)
                    if hit:
                        yield Finished("stop", "", len(prompt), produced)
                        return
                    if produced == max_tokens:
                        break
                if produced == max_tokens:
                    break
                # Never guess past max_tokens: the chain would compute what nobody reads.
                proposed = await drafts.propose(history, min(length.next(), max_tokens - produced - 1)) if drafts else []
                try:
                    run = await chain.next_run(history[-1], proposed)
                except CacheBudgetExceeded:
                    # Out of KV memory mid-answer: end it as if the context were full.
                    log.warning("KV cache full: ending a completion after %d tokens", produced)
                    max_tokens = produced
                    break
                length.update(len(proposed), len(run) - 1)
                self.speculation.record(len(proposed), len(run))
            tail, hit = stops.feed(detok.flush())
            yield Finished("stop" if hit else "length", tail + ("" if hit else stops.flush()), len(prompt), max_tokens)
        finally:
            self.running.discard(chain)
            await chain.close()
            self.cached_tokens += chain.cached_tokens
            self.failovers += chain.failovers
            self.failover_pause += chain.paused_seconds
            if drafts is not None:
                await drafts.close()
