"""A small model at the gateway that proposes draft tokens (``--draft-model``).

A draft model shares the target's tokenizer and is a fraction of its size, so the
gateway can run it in full: before each decode step it drafts ``k`` tokens greedily,
one forward per token, and the chain checks them in one trip
(:mod:`shardmesh.api.speculation`). Its greedy guesses are single tokens, so the last
hop's check keeps the target's distribution exactly.

Each generation holds one session in the draft model's stage. Between steps the
history grows by what the chain accepted; the session's cache keeps every token it
was fed, and a step that starts before its end drops the guesses that were rejected
(positions are explicit, see :class:`~shardmesh.contract.StepRequest`).
"""

from __future__ import annotations

import logging
import uuid
from array import array
from typing import Sequence

import trio

from ..contract import RawTensor, StageError, StepRequest
from .batcher import StepBatcher
from .torch.tensors import tensor_from_raw

__all__ = ["DraftModel", "DraftModelDrafts", "FEED_CHUNK"]

log = logging.getLogger("shardmesh.backends.draft_model")

FEED_CHUNK = 512  # tokens per step when the draft model catches up with a long history


def _argmax(logits: RawTensor) -> int:
    """Compute thread: the draft model's greedy token."""
    return int(tensor_from_raw(logits).argmax())


def _ids(tokens: Sequence[int]) -> RawTensor:
    return RawTensor("int64", (len(tokens),), array("q", tokens).tobytes())


class DraftModel:
    """A :class:`~shardmesh.contract.DraftSource` over a whole model in one stage,
    run by ``batcher`` (whose :meth:`~StepBatcher.run` must be running)."""

    def __init__(self, batcher: StepBatcher, context_length: int) -> None:
        self.batcher = batcher
        self.context_length = context_length

    def drafts(self) -> DraftModelDrafts:
        return DraftModelDrafts(self.batcher, self.context_length)


class DraftModelDrafts:
    """One generation's session in the draft model."""

    def __init__(self, batcher: StepBatcher, context_length: int) -> None:
        self.batcher = batcher
        self.context_length = context_length
        self.session_id = f"draft-{uuid.uuid4().hex}"
        self.fed: list[int] = []  # the tokens the session's cache holds, in order
        self.opened = False
        self.refused = False

    async def propose(self, history: Sequence[int], k: int) -> list[int]:
        """``k`` greedy tokens after ``history``; none if they would not fit the context,
        or once the draft model has refused this generation (its KV cache full, say):
        drafts only ever save time, so their failure must not fail the answer."""
        if k <= 0 or len(history) + k > self.context_length or self.refused:
            return []
        try:
            return await self._propose(history, k)
        except StageError as exc:
            log.info("the draft model stops drafting for this answer: %s", exc)
            self.refused = True
            return []

    async def _propose(self, history: Sequence[int], k: int) -> list[int]:
        if not self.opened:
            await self.batcher.open(self.session_id, self.context_length)
            self.opened = True
        # Keep what the cache shares with the history, but feed at least the last token:
        # its logits are what the first guess is drawn from.
        kept = 0
        while kept < min(len(self.fed), len(history) - 1) and self.fed[kept] == history[kept]:
            kept += 1
        feed = list(history[kept:])
        while len(feed) > FEED_CHUNK:
            await self.batcher.step(StepRequest(self.session_id, _ids(feed[:FEED_CHUNK]), kept))
            kept += FEED_CHUNK
            feed = feed[FEED_CHUNK:]
        guesses: list[int] = []
        position = kept
        for _ in range(k):
            guesses.append(await self.batcher.step(StepRequest(self.session_id, _ids(feed), position), after=_argmax))
            position += len(feed)
            feed = guesses[-1:]
        self.fed = [*history, *guesses[:-1]]  # the last guess was never fed
        return guesses

    async def close(self) -> None:
        if self.opened:
            with trio.CancelScope(shield=True):
                await self.batcher.close(self.session_id)
