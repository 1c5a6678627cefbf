"""One generation: prompt ids in, a stream of tokens with their text out.

The loop is the same whoever holds the blocks: it asks a *chain opener* for a session
over the whole model (local stages today, a chain of peers over the mesh), sends the
prompt in chunks, then feeds each sampled token back until a stop condition. It holds
only the tokenizer, never weights.
"""

from __future__ import annotations

import logging
import secrets
import uuid
from dataclasses import dataclass, replace
from typing import AsyncIterator, Protocol

import trio

from ..backends.base import CacheBudgetExceeded
from ..backends.sampling import SampledToken, SamplingParams
from ..mesh.session import ChainFailed, NoRoute
from .text import IncrementalDetokenizer, StopMatcher

log = logging.getLogger(__name__)

PREFILL_CHUNK = 512  # tokens per prefill step: long prompts pipeline through the stages


class ModelUnavailable(Exception):
    """No complete chain can serve the model right now (HTTP 503)."""


class PromptTooLong(Exception):
    """The prompt does not fit the model's context (HTTP 400)."""


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...] = ()


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


class Chain(Protocol):
    """One session over blocks ``[0, L)``: opened, stepped, always closed."""

    async def open(self, max_length: int) -> None: ...

    async def step(self, token_ids: list[int], position: int, want_token: bool) -> SampledToken | None: ...

    async def close(self) -> None: ...


class ChainOpener(Protocol):
    def available(self) -> bool: ...

    def chain(self, session_id: str, sampling: SamplingParams, prompt_ids: list[int]) -> Chain: ...


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
    """Turns :class:`GenerationRequest` into a stream of events for the HTTP layer."""

    def __init__(self, model_name: str, tokenizer, context_length: int, chains: ChainOpener, eos_ids: frozenset[int]):
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.chains = chains
        self.eos_ids = eos_ids

    def ready(self) -> bool:
        return self.chains.available()

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _event(self, token: SampledToken, text: str) -> TokenEvent:
        top = tuple(TopLogprob(i, self._token_text(i), lp) for i, lp in token.top_logprobs)
        return TokenEvent(token.token_id, text, token.logprob, top)

    async def stream(self, req: GenerationRequest) -> AsyncIterator[TokenEvent | Finished]:
        prompt = list(req.prompt_ids)
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) >= self.context_length:
            raise PromptTooLong(
                f"the prompt has {len(prompt)} tokens; this model's context is {self.context_length} tokens"
            )
        if not self.ready():
            raise ModelUnavailable(f"no complete chain of peers serves {self.model_name} right now")
        max_tokens = min(req.max_tokens, self.context_length - len(prompt))
        sampling = req.sampling
        if sampling.seed is None:
            # Fix a seed per request: a replay after failover then draws the same tokens.
            sampling = replace(sampling, seed=secrets.randbits(63))

        chain = self.chains.chain(uuid.uuid4().hex, sampling, prompt)
        try:
            try:
                await chain.open(len(prompt) + max_tokens)
                token = await self._prefill(chain, prompt)
            except CacheBudgetExceeded as exc:
                raise ModelUnavailable(f"busy: {exc}; retry later") from exc
            except NoRoute as exc:
                raise ModelUnavailable(str(exc)) from exc
            except ChainFailed as exc:
                raise ModelUnavailable(f"could not open a chain of peers: {exc}") from exc
            position = len(prompt)
            detok = IncrementalDetokenizer(self.tokenizer)
            stops = StopMatcher(req.stop)
            for produced in range(1, max_tokens + 1):
                if token.token_id in self.eos_ids:
                    yield Finished("stop", stops.feed(detok.flush())[0] + stops.flush(), len(prompt), produced - 1)
                    return
                released, hit = stops.feed(detok.add(token.token_id))
                yield self._event(token, released)
                if hit:
                    yield Finished("stop", "", len(prompt), produced)
                    return
                if produced == max_tokens:
                    break
                try:
                    token = await chain.step([token.token_id], position, True)
                except CacheBudgetExceeded:
                    # Out of KV memory mid-answer: end it as if the context were full.
                    log.warning("KV cache full: ending a completion after %d tokens", produced)
                    max_tokens = produced
                    break
                position += 1
            tail, hit = stops.feed(detok.flush())
            yield Finished("stop" if hit else "length", tail + ("" if hit else stops.flush()), len(prompt), max_tokens)
        finally:
            with trio.CancelScope(shield=True):
                await chain.close()

    async def _prefill(self, chain: Chain, prompt: list[int]) -> SampledToken:
        """The prompt in chunks, so that one step's work and activations stay bounded.
        (Overlapping chunks across hops is for the mesh's push chain.)"""
        token = None
        for start in range(0, len(prompt), PREFILL_CHUNK):
            chunk = prompt[start : start + PREFILL_CHUNK]
            token = await chain.step(chunk, start, start + len(chunk) == len(prompt))
        assert token is not None
        return token
