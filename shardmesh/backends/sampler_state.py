"""One session's sampling on the last stage: its parameters and its token history.

The last hop of a mesh chain (:mod:`.hop_compute`) and a chain held in one process
(:mod:`.local_chain`) both sample here, on the compute thread right after the step
that produced the logits, so a session draws the same tokens wherever it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..contract import BadRequest, RawTensor, SampledToken, SamplingParams
from .grammar import GrammarRefused, GrammarState, Vocabulary
from .torch.sampling import SamplingRefused, sample
from .torch.sampling_rows import greedy_rows
from .torch.tensors import tensor_from_raw

__all__ = ["SamplerState", "draw_greedy_together"]


@dataclass
class SamplerState:
    """The parameters and the token history that penalties and the per-step seed
    depend on; ``generated`` holds what was drawn before (a replay) and grows per token.

    With a grammar in the parameters, ``vocabulary`` is the model's; the matcher is
    built on the first draw (on the compute thread, where compiling belongs) and fed
    what was drawn before, so a replay continues the grammar where it was."""

    params: SamplingParams
    prompt_ids: list[int]
    generated: list[int] = field(default_factory=list)
    vocabulary: Vocabulary | None = None
    grammar: GrammarState | None = field(default=None, init=False)

    def token(self, logits: RawTensor) -> SampledToken:
        """Compute thread: the next token. A refusal caused by the request's parameters
        is :class:`BadRequest` (error code ``bad_request``: the gateway answers HTTP 400
        and holds it against no peer); anything else stays this stage's own failure."""
        return self._draw(tensor_from_raw(logits))

    def run(self, logits: RawTensor, drafts: Sequence[int]) -> list[SampledToken]:
        """Compute thread: check draft tokens against ``logits`` ``[len(drafts) + 1,
        vocab]``, the rows of the positions where each draft, then one more token, would
        be drawn. Each row draws the token this session would draw there without
        speculation (same history, same per-step seed); a draft is accepted while it
        equals that token. Returns the tokens drawn: the accepted drafts, then the first
        token that differs from its draft (or, all accepted, one past them).

        For a proposal that is one fixed token (prompt lookup, a draft model's argmax)
        this is exactly speculative sampling's rule: a draft ``d`` is kept with the
        target's probability ``p(d)``, and a rejection draws from ``p`` without ``d``.
        It keeps the target distribution, and a seed gives the same tokens with
        speculation on or off."""
        rows = tensor_from_raw(logits)
        if rows.dim() != 2 or rows.shape[0] != len(drafts) + 1:
            raise ValueError(f"{len(drafts)} drafts need {len(drafts) + 1} rows of logits, got {list(rows.shape)}")
        drawn: list[SampledToken] = []
        for i in range(len(drafts) + 1):
            drawn.append(self._draw(rows[i]))
            if i == len(drafts) or drawn[-1].token_id != drafts[i]:
                break
        return drawn

    @property
    def plain_greedy(self) -> bool:
        """Greedy, with nothing that depends on the session's history (no penalties) or
        changes its logits (no bias): its tokens can be drawn with other sessions' at once."""
        p = self.params
        return (p.greedy and not p.logit_bias and p.grammar is None
                and (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0))

    def _draw(self, logits: Any) -> SampledToken:
        try:
            allowed = self._allowed(logits.shape[-1]) if self.params.grammar is not None else None
            token = sample(logits, self.params, self.prompt_ids, self.generated, allowed)
            if self.grammar is not None:
                self.grammar.advance(token.token_id)
        except (SamplingRefused, GrammarRefused) as exc:
            raise BadRequest(f"cannot sample with these parameters: {exc}") from exc
        self.generated.append(token.token_id)
        return token

    def _allowed(self, width: int) -> torch.Tensor:
        if self.grammar is None:
            if self.vocabulary is None:  # this node's shortcoming, not the request's: another chain may serve it
                raise RuntimeError("this node cannot apply grammars: its model's tokenizer has no tokenizer.json form")
            assert self.params.grammar is not None
            self.grammar = GrammarState(self.vocabulary, self.params.grammar, self.generated)
        return self.grammar.allowed(width)

    def __call__(self, logits: RawTensor) -> dict[str, Any]:
        """The next token as the last hop sends it on the wire."""
        return _on_wire(self.token(logits))

    def verify(self, logits: RawTensor, drafts: Sequence[int]) -> dict[str, Any]:
        """:meth:`run` as the last hop sends it: the first token drawn, and the rest in
        ``more`` (docs/PROTOCOL.md 6.2)."""
        first, *more = self.run(logits, drafts)
        wire = _on_wire(first)
        wire["more"] = [[t["token"], t["logprob"], t["top"]] for t in map(_on_wire, more)]
        return wire


def draw_greedy_together(afters: Sequence[Any], outputs: Sequence[RawTensor]) -> dict[int, dict[str, Any]]:
    """Compute thread: for a batch's requests whose ``after`` is a plain greedy
    :class:`SamplerState` (:attr:`~SamplerState.plain_greedy`), their tokens as each would
    send them (``after(output)``), drawn over their stacked logits at once
    (:func:`~.torch.sampling_rows.greedy_rows`) and identical to drawing them one by one; by
    the request's index. Rows that are not all finite, and every other request, are left
    to their own ``after``."""
    chosen = [i for i, a in enumerate(afters) if isinstance(a, SamplerState) and a.plain_greedy]
    rows = [tensor_from_raw(outputs[i]).reshape(-1) for i in chosen]
    if len(chosen) < 2 or len({r.numel() for r in rows}) != 1 or rows[0].numel() == 0:
        return {}
    drawn: dict[int, dict[str, Any]] = {}
    for i, token in zip(chosen, greedy_rows(torch.stack(rows), [afters[i].params for i in chosen])):
        if token is not None:
            afters[i].generated.append(token.token_id)
            drawn[i] = _on_wire(token)
    return drawn


def _on_wire(token: SampledToken) -> dict[str, Any]:
    return {"token": token.token_id, "logprob": token.logprob, "top": [[i, lp] for i, lp in token.top_logprobs]}
