"""The tokens in a last hop's ``result`` frame, as the gateway believes them.

A result carries the token the last hop drew (``token``, ``logprob``, ``top``) and,
for a step with draft tokens, the rest of what it drew in ``more``
(docs/PROTOCOL.md 6.2). Everything in it is type-checked here, and a frame that lies
about what it accepted (more tokens than were drafted, or an accepted token that is
not the draft it stands for) blames the last hop, who sent it.
"""

from __future__ import annotations

from typing import Any

from ..contract import ChainFailed, SampledToken
from .wire import RESULT, Frame

__all__ = ["result_tokens"]


def result_tokens(frame: Frame, last: str, position: int | None, drafts: list[int]) -> list[SampledToken]:
    """The tokens of ``frame`` from ``last`` (the route's last hop), answering the step
    at ``position`` (None: a frame nobody asked for) that proposed ``drafts``."""
    h = frame.header
    if frame.type != RESULT or (position is not None and h.get("position") != position):
        raise ChainFailed(last, "bad_frame", f"unexpected {frame.type} frame instead of a token")
    more = h.get("more", [])
    if not isinstance(more, list) or len(more) > len(drafts) or not all(isinstance(m, list) and len(m) == 3 for m in more):
        raise ChainFailed(last, "bad_frame", f"a result with more than the {len(drafts)} tokens drafted, or malformed")
    spent = h.get("spent")
    spent = float(spent) if isinstance(spent, (int, float)) and not isinstance(spent, bool) else None
    tokens = [_token(last, h.get("token"), h.get("logprob"), h.get("top"), spent)]
    tokens += [_token(last, *m, None) for m in more]
    if [t.token_id for t in tokens[:-1]] != drafts[: len(tokens) - 1]:
        raise ChainFailed(last, "bad_frame", "a result accepted tokens that were not drafted")
    return tokens


def _token(last: str, token: Any, logprob: Any, top: Any, spent: float | None) -> SampledToken:
    if not isinstance(token, int) or isinstance(token, bool) or token < 0:
        raise ChainFailed(last, "bad_frame", "a result without a token id")
    try:
        alternatives = tuple((int(i), float(lp)) for i, lp in (top or []))
        logprob = None if logprob is None else float(logprob)
    except (TypeError, ValueError) as exc:
        raise ChainFailed(last, "bad_frame", f"malformed logprobs in a result: {exc}") from exc
    return SampledToken(token, logprob, alternatives, spent)
