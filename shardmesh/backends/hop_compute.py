"""The local stage as the mesh's hop server sees it: plain bytes and dicts in and out.

The mesh must not import torch (see the import rules in docs/ARCHITECTURE.md), yet the
last hop of a chain samples tokens. This adapter keeps everything torch-shaped on this
side: the hop server hands over raw tensors and a sampling dict, and gets back raw
hidden states or a plain token dict. Sampling runs on the compute thread right after the
step that produced the logits, so the event loop never touches a tensor.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Sequence

from ..contract import BadInput, RawTensor, SamplingParams, StageInfo, StepOutput, StepRequest
from .batcher import StepBatcher
from .grammar import Vocabulary
from .sampler_state import SamplerState


class StageHopCompute:
    """Wraps a :class:`StepBatcher` for :mod:`shardmesh.mesh.hop_server`; ``vocabulary``
    (the model's, for grammars) matters when the batcher's stage is the last one."""

    def __init__(self, batcher: StepBatcher, vocabulary: Vocabulary | None = None) -> None:
        self.batcher = batcher
        self.vocabulary = vocabulary

    @property
    def info(self) -> StageInfo:
        return self.batcher.stage.info

    @property
    def cache_tokens_free(self) -> int:
        return self.batcher.stage.cache_tokens_free

    def new_sampler(self, sampling: dict[str, Any], prompt_ids: Sequence[int], generated: Sequence[int]) -> SamplerState:
        """Validates what the gateway sent; raises :class:`BadInput` with the reason."""
        try:
            params = SamplingParams.from_dict(sampling)
        except (TypeError, ValueError) as exc:
            raise BadInput(f"bad sampling parameters: {exc}") from exc
        vocab = self.info.vocab_size
        if any(not 0 <= t < vocab for t in (*prompt_ids, *generated)):
            raise BadInput(f"history token ids must lie in [0, {vocab})")
        if any(t >= vocab for t, _ in params.logit_bias):
            raise BadInput(f"logit_bias token ids must lie in [0, {vocab})")
        return SamplerState(params, list(prompt_ids), list(generated), self.vocabulary)

    async def open(
        self, session_id: str, max_length: int, start: int, end: int, history: Sequence[int] = (), scope: str | None = None,
    ) -> int:
        return await self.batcher.open(session_id, max_length, start, end, history, scope)

    async def step(
        self, session_id: str, inputs: RawTensor, position: int, sampler: SamplerState | None,
        then: Callable[[Any, float], bool] | None = None, drafts: Sequence[int] = (),
        flush: Callable[[], None] | None = None,
    ) -> StepOutput:
        """Hidden states out, or (last hop, ``sampler`` given) the sampled token dict,
        with draft tokens checked (:meth:`SamplerState.verify`); ``then(value, seconds)``
        runs on the compute thread right after, ``flush()`` after the whole batch (see batcher.py)."""
        after = sampler if sampler is None or not drafts else partial(sampler.verify, drafts=list(drafts))
        # Only the sampling (last) hop returns a row of logits per draft; a middle hop's
        # hidden states are the same either way, and a draft count there would only keep
        # its step from sharing a forward with other sessions' steps of as many tokens.
        request = StepRequest(session_id, inputs, position, draft=len(drafts) if sampler is not None else 0)
        return await self.batcher.step_timed(request, after=after, then=then, flush=flush)

    async def close(self, session_id: str, fed: Sequence[int] = (), scope: str | None = None) -> None:
        await self.batcher.close(session_id, fed, scope)
