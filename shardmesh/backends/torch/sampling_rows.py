"""Sampling many sessions' rows at once, each exactly as :func:`~.sampling.sample` would.

The last stage of a batch holds one row of logits per session. :func:`sample_batch`
samples each row with its own parameters and history; :func:`greedy_rows` does the
common case (greedy, no penalties, no bias) for all rows with one argmax and one
log-softmax. Either way a session's token and logprobs never depend on what it was
batched with, which a replay on another machine (with other batch-mates) relies on.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ...contract import SampledToken, SamplingParams
from .sampling import best_ids, sample

__all__ = ["greedy_rows", "sample_batch"]


def greedy_rows(logits: torch.Tensor, params: Sequence[SamplingParams]) -> list[SampledToken | None]:
    """The token of each row of ``logits [batch, vocab]`` for greedy ``params`` without
    penalties or bias, with the logprobs each asks for: what :func:`sample` gives row by
    row (ties to the lowest id), from one argmax and one log-softmax over the batch.
    None for a row that is not all finite, which :func:`sample` must see to refuse it
    or to mask its -inf logits."""
    rows = logits.detach().to(device="cpu", dtype=torch.float32)
    finite = torch.isfinite(rows.sum(dim=1)).tolist()
    best = torch.argmax(rows, dim=1).tolist()
    lp = torch.log_softmax(rows, dim=-1) if any(p.logprobs or p.top_logprobs for p in params) else None
    out: list[SampledToken | None] = []
    for i, p in enumerate(params):
        if not finite[i]:
            out.append(None)
            continue
        logprob, top = None, ()
        if lp is not None:
            logprob = float(lp[i, best[i]]) if p.logprobs else None
            n = min(p.top_logprobs, lp.shape[1])
            top = tuple((int(j), float(lp[i, j])) for j in best_ids(lp[i], n).tolist()) if n > 0 else ()
        out.append(SampledToken(token_id=best[i], logprob=logprob, top_logprobs=top))
    return out


def sample_batch(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    prompt_ids: Sequence[Sequence[int]],
    generated_ids: Sequence[Sequence[int]],
) -> list[SampledToken]:
    """:func:`sample` for each row of ``logits [batch, vocab]``.

    Each row uses its own params and history, and the result is identical to calling
    :func:`sample` row by row: a session's tokens never depend on what it was batched
    with, which a replay on another machine (with different batch-mates) relies on.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"logits must have shape [batch, vocab], got {getattr(logits, 'shape', type(logits).__name__)}")
    b = logits.shape[0]
    if not len(params) == len(prompt_ids) == len(generated_ids) == b:
        raise ValueError(
            f"batch of {b} logit rows needs as many params/prompt_ids/generated_ids, "
            f"got {len(params)}/{len(prompt_ids)}/{len(generated_ids)}"
        )
    # One conversion for the whole batch instead of one per row.
    rows = logits.detach().to(device="cpu", dtype=torch.float32)
    return [sample(rows[i], params[i], prompt_ids[i], generated_ids[i]) for i in range(b)]
