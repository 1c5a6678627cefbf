"""A generation's chain that outlives the peers it runs on.

A chain of peers can break at any step: a node crashes, a connection resets, a hop
answers with an error or not at all. The answer is replay (docs/ARCHITECTURE.md,
"Failover"): the gateway routes again (the chain opener already avoids the peer that failed) and sends the whole
history, the prompt plus every token generated so far, through the new chain as one
prefill. The last hop draws token number ``k`` from ``(seed, k)`` and that history, so
the new chain continues with exactly the token the old one would have produced, and
the API client sees a pause instead of an error.

:class:`ResumableChain` is that loop, kept apart from text and stop handling so that
it can be read (and tested) on its own: :meth:`start` gives the first token,
:meth:`next` feeds one token back and gives the one after it.
"""

from __future__ import annotations

import logging
import uuid
from typing import Callable

import trio

from ..contract import CacheBudgetExceeded, Chain, ChainFailed, ChainOpener, ModelUnavailable, NoRoute, SampledToken, SamplingParams
from ..placement.spans import Repair

log = logging.getLogger(__name__)

PREFILL_CHUNK = 512  # the most tokens per prefill step where the chain measured nothing (an MLX stage, an old node)
MIN_PREFILL_CHUNK = 128  # the fewest: smaller steps cost more per token than they gain in overlap
CHUNK_GRAIN = 64
RETRY_PAUSE = 0.5  # seconds between attempts while no working chain exists
QUICK_RETRIES = 2  # a chain that failed on a named peer is first retried at once (routing avoids it)
REPAIR_WAIT = 300.0  # s a request may wait while the swarm fills a gap (a span's load, on a slow disk)
REPAIR_GRACE = 10.0  # s the swarm gets to start a repair (notice the gap, announce a move) before we stop waiting


class ResumableChain:
    """One generation's tokens, across as many chains as it takes; always :meth:`close` it.

    ``wait`` bounds how long one recovery (or the first open) may look for a working
    chain before giving up with :class:`ModelUnavailable`. With ``repair`` (the swarm's
    :class:`~shardmesh.placement.spans.Repair` state, asked afresh each time), a request
    waits up to :data:`REPAIR_WAIT` while nodes fill a gap, and gives up early, saying
    why, when after :data:`REPAIR_GRACE` nobody has started to.
    """

    def __init__(
        self, opener: ChainOpener, sampling: SamplingParams, prompt_ids: list[int], max_length: int, *, wait: float,
        repair: Callable[[], Repair] | None = None,
    ) -> None:
        self.opener = opener
        self.sampling = sampling
        self.prompt_ids = list(prompt_ids)
        self.max_length = max_length
        self.wait = wait
        self.repair = repair
        self.generated: list[int] = []
        self.failovers = 0  # chains replaced after a failure mid-generation
        self.paused_seconds = 0.0  # total time spent replacing them
        self.cached_tokens = 0  # history tokens its chains held already (prefix caches), not computed again
        self._base_id = uuid.uuid4().hex
        self._chains_opened = 0
        self._chain: Chain | None = None
        self.failed_peers: set[str] = set()  # blamed during this request: never routed through again

    @property
    def route(self) -> list[tuple[str, int, int]] | None:
        """The peers of the chain it runs on now, as ``(peer, start, end)``: empty while
        it has no chain or its chain has no route yet; None for blocks in this process
        (which have no route)."""
        if self._chain is None:
            return []
        if not hasattr(self._chain, "route"):
            return None
        return [(hop.peer, hop.start, hop.end) for hop in self._chain.route or ()]

    async def start(self) -> SampledToken:
        """Open a chain and prefill the prompt; the first generated token."""
        return await self._open_and_replay(first=True)

    async def next(self, token_id: int) -> SampledToken:
        """Feed back ``token_id`` (just generated); the token after it."""
        [token] = await self.next_run(token_id, [])
        return token

    async def next_run(self, token_id: int, drafts: list[int]) -> list[SampledToken]:
        """Feed back ``token_id`` with ``drafts``, tokens guessed to follow it; the
        tokens drawn after it: the drafts the chain accepted, then one of its own. The
        accepted drafts join the history; the rejected ones leave every hop's cache with
        the next step. A chain that breaks is replaced, replaying the accepted tokens
        only, and gives one token."""
        self.generated.append(token_id)
        position = len(self.prompt_ids) + len(self.generated) - 1
        assert self._chain is not None, "start() first"
        try:
            if not drafts:
                token = await self._chain.step([token_id], position, True)
                assert token is not None
                return [token]
            tokens = await self._chain.verify([token_id, *drafts], position, len(drafts))
        except ChainFailed as exc:
            return [await self._recover(exc)]
        self.generated.extend(t.token_id for t in tokens[:-1])
        return tokens

    async def _recover(self, exc: ChainFailed) -> SampledToken:
        log.warning("a chain broke after %d tokens (%s); replaying on a new one", len(self.generated), exc)
        self._blame(exc)
        began = trio.current_time()
        token = await self._open_and_replay(first=False)
        pause = trio.current_time() - began
        self.failovers += 1
        self.paused_seconds += pause
        log.info("generation resumed on a new chain after %.2f s", pause)
        return token

    def _blame(self, exc: ChainFailed) -> None:
        """A peer that failed this request is not tried again for it: its back-off
        (routing's, a few seconds) may end while the request still runs, and dialling
        a dead peer costs seconds."""
        if exc.peer is not None:
            self.failed_peers.add(exc.peer)

    async def close(self) -> None:
        """Close the current chain, if any; never raises. It is told every token it was
        fed, so that its hops may keep their prefix for the next turn of the chat."""
        chain, self._chain = self._chain, None
        if chain is not None:
            with trio.CancelScope(shield=True):
                await chain.close(self.prompt_ids + self.generated)

    async def _open_and_replay(self, *, first: bool) -> SampledToken:
        """A fresh chain that has seen the whole history; retried until ``wait`` runs out.

        On the first open a full KV cache is an immediate 503 (the client can retry
        elsewhere at once); later, waiting beats failing an answer half written.
        """
        began = trio.current_time()
        deadline = began + self.wait
        attempt = 0
        while True:
            await self.close()
            attempt += 1
            # A fresh id per chain: hops that survived may still hold the broken session.
            session_id = f"{self._base_id}-{self._chains_opened}" if self._chains_opened else self._base_id
            self._chains_opened += 1
            avoid = frozenset(self.failed_peers)
            self._chain = self.opener.chain(session_id, self.sampling, self.prompt_ids, list(self.generated), avoid)
            try:
                cached = await self._chain.open(self.max_length)
                self.cached_tokens += cached
                return await self._replay(self._chain, cached)
            except CacheBudgetExceeded as exc:
                if first:
                    raise ModelUnavailable(f"busy: {exc}; retry later") from exc
                problem = f"busy: {exc}"
            except NoRoute as exc:
                problem = str(exc)
                try:
                    deadline = self._repair_deadline(began, deadline, problem)
                except ModelUnavailable:
                    await self.close()
                    raise
            except ChainFailed as exc:
                self._blame(exc)
                problem = f"could not open a chain of peers: {exc}"
                if exc.peer is not None and attempt <= QUICK_RETRIES and trio.current_time() < deadline:
                    continue
            if trio.current_time() + RETRY_PAUSE > deadline:
                await self.close()
                raise ModelUnavailable(f"{problem} (gave up after {self.wait:.0f} s)")
            log.info("no working chain yet (%s); trying again", problem)
            await trio.sleep(RETRY_PAUSE)

    def _repair_deadline(self, began: float, deadline: float, problem: str) -> float:
        """The wait's deadline, longer while the swarm fills a gap; raises
        :class:`ModelUnavailable` once it is clear that nobody will."""
        if self.repair is None:
            return deadline
        state = self.repair()
        if state.under_way:
            return max(deadline, began + REPAIR_WAIT)
        waited = trio.current_time() - began
        if state.unfilled and waited >= REPAIR_GRACE:
            spans = ", ".join(f"[{a}, {b})" for a, b in state.unfilled)
            raise ModelUnavailable(f"{problem}: blocks {spans} have no server, and no node with room is "
                                   f"moving in (waited {waited:.0f} s)")
        return deadline

    async def _replay(self, chain: Chain, cached: int = 0) -> SampledToken:
        """Prompt and generated tokens in chunks (:func:`prefill_chunk`), sent one after
        the other without waiting: only the last asks for a token. So the hops of a
        route work as a pipeline, each on its own chunk, and the first token leaves the
        last hop as soon as the last chunk is through. The first ``cached`` tokens every
        hop holds already (a prefix cache): the prefill starts after them."""
        history = self.prompt_ids + self.generated
        if not 0 <= cached < len(history):
            cached = 0  # a chain must compute at least the last token, whose logits we need
        size = prefill_chunk(len(history) - cached, chain.parallel_stages, chain.prefill_step)
        token = None
        for start in range(cached, len(history), size):
            chunk = history[start : start + size]
            token = await chain.step(chunk, start, start + len(chunk) == len(history))
        assert token is not None
        return token


def prefill_chunk(length: int, stages: int, largest: int | None = None) -> int:
    """Tokens per prefill step for a history of ``length`` through ``stages`` parts that
    compute at once: enough chunks (two per stage) that every stage has work while the
    pipe fills and drains, within [:data:`MIN_PREFILL_CHUNK`, ``largest``]. ``largest``
    is the step the chain's parts measured they compute best (``Chain.prefill_step``);
    :data:`PREFILL_CHUNK` where none did.

    With ``n`` equal chunks through ``s`` stages a prefill takes ``(n + s - 1) / n``
    of one stage's whole work, against ``s`` times it sent chunk after chunk; one
    process (``s == 1``) gains nothing from small chunks and takes the largest."""
    largest = PREFILL_CHUNK if largest is None else max(1, largest)
    if stages <= 1:
        return largest
    wanted = -(-length // (2 * stages))
    return min(largest, max(MIN_PREFILL_CHUNK, -(-wanted // CHUNK_GRAIN) * CHUNK_GRAIN))
