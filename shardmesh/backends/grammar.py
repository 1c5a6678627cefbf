"""Constrained decoding: a grammar says which tokens may come next, the sampler obeys.

A request with a grammar (``response_format`` with a JSON schema, a forced tool call)
carries it in its :class:`~shardmesh.contract.SamplingParams` to the last hop, which
samples. There, before each token is drawn, a matcher computes the set of tokens that
keep the output a prefix of something the grammar accepts; every other token's logit
becomes ``-inf``, then sampling goes on as usual (:func:`.torch.sampling.sample`). Once
the grammar is complete only an end-of-answer token is allowed, so the answer stops.

The engine is llguidance (Lark-style grammars with JSON schemas embedded as ``%json``):
chosen by measurement (``shardmesh bench --grammar``, docs/PERFORMANCE.md) and because
its work per grammar and per token is bounded by fuel limits, which matters when every
grammar may come from a stranger (docs/SECURITY.md). The gateway checks a grammar
before sending it (``api/structured_output.py``); a hop compiles it again, because
the gateway may be anyone.

A matcher's state is a function of the tokens drawn so far: a replay on another chain
(failover, an audit) rebuilds it by feeding the grammar the tokens already generated.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["GrammarRefused", "GrammarState", "Vocabulary", "apply_bitmask", "bitmask_to_bools"]


class GrammarRefused(ValueError):
    """The grammar does not compile, or the tokens so far do not fit it: the request's
    fault (a hop answers ``bad_request``), never the hop's."""


@dataclass
class Vocabulary:
    """The model's tokens as the grammar engine sees them: ``tokenizer_json`` is the
    tokenizer's serialised form, ``size`` the width of the model's logits (at least the
    tokenizer's size; padded ids are never allowed), ``eos_ids`` the tokens that end an
    answer. The engine's view is built on first use (about a second for a large
    vocabulary) and shared by every grammar of this process."""

    tokenizer_json: str
    size: int
    eos_ids: tuple[int, ...]

    @functools.cached_property
    def engine(self):  # llguidance.LLTokenizer
        return _engine(self.tokenizer_json, self.size, self.eos_ids)


@functools.lru_cache(maxsize=4)
def _engine(tokenizer_json: str, size: int, eos_ids: tuple[int, ...]):
    import llguidance

    return llguidance.LLTokenizer(tokenizer_json, n_vocab=size, eos_token=list(eos_ids))


class GrammarState:
    """One session's matcher, advanced past the tokens ``generated`` so far.

    Compute thread only (compiling a grammar and computing masks take milliseconds).
    Raises :class:`GrammarRefused` when the grammar does not compile or the history
    does not fit it. llguidance's default limits bound the work: the grammar's size
    and the fuel of its lexer when compiled, and the lexer fuel and parser items of
    each mask; the grammar text itself is bounded on the wire
    (:data:`~shardmesh.contract.sampling.MAX_GRAMMAR_BYTES`)."""

    def __init__(self, vocabulary: Vocabulary, grammar: str, generated: Sequence[int] = ()) -> None:
        import llguidance

        self.vocabulary = vocabulary
        self.matcher = llguidance.LLMatcher(vocabulary.engine, grammar, log_level=0)
        self._check()
        if generated and not self.matcher.consume_tokens(list(generated)):
            raise GrammarRefused(f"the tokens generated so far do not fit the grammar: {self.matcher.get_error()[:200]}")
        self._bits = torch.full(((vocabulary.size + 31) // 32,), -1, dtype=torch.int32)

    def _check(self) -> None:
        if self.matcher.is_error():
            raise GrammarRefused(f"grammar refused: {self.matcher.get_error()[:300]}")

    def allowed(self, width: int) -> torch.Tensor:
        """A bool mask over ``width`` logits: the tokens that may come next."""
        self.matcher.unsafe_compute_mask_ptr(self._bits.data_ptr(), self._bits.numel() * 4)
        self._check()  # a grammar that ran out of fuel errs here: the request's fault
        return bitmask_to_bools(self._bits, width)

    def advance(self, token_id: int) -> None:
        """The token drawn (always one :meth:`allowed` allowed)."""
        if not self.matcher.consume_token(token_id):
            raise GrammarRefused(f"token {token_id} does not fit the grammar: {self.matcher.get_error()[:200]}")


_BIT = torch.arange(32, dtype=torch.int32)


def bitmask_to_bools(bits: torch.Tensor, width: int) -> torch.Tensor:
    """Bit ``i % 32`` of word ``i // 32`` as a bool per id, cut or padded (False) to ``width``."""
    bools = ((bits.unsqueeze(1) >> _BIT) & 1).to(torch.bool).reshape(-1)
    if bools.numel() >= width:
        return bools[:width]
    return torch.cat([bools, bools.new_zeros(width - bools.numel())])


def apply_bitmask(logits: torch.Tensor, bits: torch.Tensor) -> None:
    """``logits [vocab]`` with every token ``bits`` refuses set to ``-inf``, in place."""
    logits.masked_fill_(~bitmask_to_bools(bits, logits.numel()), float("-inf"))
