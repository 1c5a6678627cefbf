"""Several choices for one request (``n``): their seeds, and their formats as one.

A request with ``n`` of 2 to 8 (:data:`~shardmesh.api.schemas.MAX_CHOICES`) runs ``n`` generations of the same
prompt at once, each a generation of its own (its own chain, failover and stop
sequences). Choice ``i`` samples with the request's seed plus ``i``, so choice 0 is what
the request gives with ``n`` of 1, and each choice is what its seed gives alone; a
request without a seed gets a random one per choice. Before they start, the gateway
prefills the prompt once and closes that session (:meth:`Generator.prefill
<shardmesh.api.generate.Generator.prefill>`): its hops keep the prompt's prefix
(docs/PROTOCOL.md 6.8), and each choice computes only what follows the last whole block.

:class:`Choices` writes them as OpenAI does: every chunk carries its choice's ``index``,
a whole body lists every choice, and usage counts the prompt once and every choice's
tokens.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..contract.sampling import SEED_MAX
from .formats import Format
from .generate import Finished, GenerationRequest, TokenEvent

SEED_SPAN = SEED_MAX + 1  # seeds are taken modulo 2**64: a choice's seed wraps within them

__all__ = ["Choices", "choice_requests"]


def choice_requests(req: GenerationRequest, n: int) -> list[GenerationRequest]:
    """The generation of each of ``n`` choices: the same, but for choice ``i``'s seed."""
    seed = req.sampling.seed
    if n == 1 or seed is None:
        return [req] * n
    seeds = [seed + i if seed + i <= SEED_MAX else seed + i - SEED_SPAN for i in range(n)]
    return [replace(req, sampling=replace(req.sampling, seed=s)) for s in seeds]


def _indexed(chunk: dict[str, Any], index: int) -> dict[str, Any]:
    for choice in chunk["choices"]:
        choice["index"] = index
    return chunk


class Choices:
    """The formats of one request's choices (one each, :mod:`.formats`), written as one
    response."""

    def __init__(self, formats: list[Format]) -> None:
        self.formats = formats
        first = formats[0]
        for f in formats[1:]:  # one response: one id, one creation time
            f.id, f.created = first.id, first.created
        self.include_usage = first.include_usage

    def prelude(self) -> list[dict[str, Any]]:
        return [_indexed(chunk, i) for i, f in enumerate(self.formats) for chunk in f.prelude()]

    def on_token(self, index: int, event: TokenEvent) -> list[dict[str, Any]]:
        return [_indexed(chunk, index) for chunk in self.formats[index].on_token(event)]

    def on_finish(self, index: int, done: Finished) -> list[dict[str, Any]]:
        return [_indexed(chunk, index) for chunk in self.formats[index].on_finish(done)]

    def usage_chunk(self, done: list[Finished]) -> dict[str, Any]:
        return self.formats[0].usage_chunk(_together(done))

    def whole(self, done: list[Finished]) -> dict[str, Any]:
        """The whole body, once every choice's events went through on_token / on_finish."""
        body = self.formats[0].whole(_together(done))
        body["choices"] = [_indexed(f.whole(d), i)["choices"][0] for i, (f, d) in enumerate(zip(self.formats, done))]
        return body


def _together(done: list[Finished]) -> Finished:
    """One request's usage: the prompt once, the tokens of every choice."""
    return replace(done[0], completion_tokens=sum(d.completion_tokens for d in done))
