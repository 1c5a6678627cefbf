"""A whole model served by stages in this process: the chain without a network.

It speaks the same small protocol as a chain of remote peers (open, step, close), so
the gateway's generation loop does not care where the blocks are.
"""

from __future__ import annotations

from array import array
from functools import partial
from typing import Any, Callable, Sequence

from ..contract import RawTensor, SampledToken, SamplingParams, StepRequest
from .batcher import StepBatcher
from .grammar import Vocabulary
from .sampler_state import SamplerState

LOCAL_SCOPE = "local"  # every session of this process's gateway may share prefixes


class LocalChain:
    """One session through local batchers that together cover ``[0, total_blocks)``."""

    parallel_stages = 1  # one compute thread runs every stage of the process in turn

    def __init__(
        self, batchers: list[StepBatcher], session_id: str, sampling: SamplingParams, prompt_ids: list[int],
        generated: list[int], prefixes: bool = True, vocabulary: Vocabulary | None = None, prefill_step: int | None = None,
    ) -> None:
        self.batchers = batchers
        self.prefill_step = prefill_step
        self.session_id = session_id
        # Tokens drawn before this chain (a replay) count in the sampler's history.
        self.sampler = SamplerState(sampling, list(prompt_ids), list(generated), vocabulary)
        self.history = [*prompt_ids, *generated]
        self.scope = LOCAL_SCOPE if prefixes else None

    async def open(self, max_length: int) -> int:
        """Open on every stage; the history tokens all of them hold (cached prefixes)."""
        held = [await b.open(self.session_id, max_length, history=self.history, scope=self.scope) for b in self.batchers]
        return min(held)

    async def step(self, token_ids: list[int], position: int, want_token: bool) -> SampledToken | None:
        """Feed ``token_ids`` starting at ``position``; sample the next token if asked."""
        return await self._run(token_ids, position, self.sampler.token if want_token else None, 0)

    async def verify(self, token_ids: list[int], position: int, draft: int) -> list[SampledToken]:
        """Feed ``token_ids`` from ``position``, the last ``draft`` of them proposals;
        the tokens drawn from the first proposal's position on (:meth:`SamplerState.run`)."""
        drafts = token_ids[len(token_ids) - draft :] if draft else []
        return await self._run(token_ids, position, partial(self.sampler.run, drafts=drafts), draft)

    async def _run(self, token_ids: list[int], position: int, after: Callable[[RawTensor], Any] | None, draft: int) -> Any:
        # Built without torch: the event loop's thread must never run torch (see compute_thread).
        x = RawTensor("int64", (len(token_ids),), array("q", token_ids).tobytes())
        last = len(self.batchers) - 1
        for i, batcher in enumerate(self.batchers):
            request = StepRequest(self.session_id, x, position, draft=draft if i == last else 0)
            x = await batcher.step(request, after=after if i == last else None)
        return x if after is not None else None

    async def close(self, fed: Sequence[int] = ()) -> None:
        """Close on every stage, each keeping its prefix of ``fed``; safe after a partial
        or cancelled open. The compute thread runs jobs in order, so this close lands
        after any open still queued."""
        for batcher in self.batchers:
            await batcher.close(self.session_id, fed, self.scope)


class LocalChains:
    """Makes :class:`LocalChain` sessions over a fixed list of local batchers."""

    def __init__(
        self, batchers: list[StepBatcher], prefixes: bool = True, vocabulary: Vocabulary | None = None, prefill_step: int | None = None,
    ) -> None:
        self.batchers = batchers
        self.prefill_step = prefill_step  # what the stage measured it prefills best (throughput.py)
        self.prefixes = prefixes  # sessions start with cached prefixes, and leave theirs
        self.vocabulary = vocabulary  # the model's, for requests with a grammar

    def available(self) -> bool:
        return bool(self.batchers)

    def chain(
        self, session_id: str, sampling: SamplingParams, prompt_ids: list[int], generated: list[int],
        avoid: frozenset[str] = frozenset(),
    ) -> LocalChain:
        return LocalChain(self.batchers, session_id, sampling, prompt_ids, generated, self.prefixes, self.vocabulary, self.prefill_step)
