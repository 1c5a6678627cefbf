"""A stage: the blocks ``[start, end)`` of one model, with per-session KV caches.

The first stage also embeds token ids; the last one also applies the final norm and
the LM head and so returns logits. Backends implement :class:`Stage`; the node runs
one behind a batcher on a compute thread, and the mesh serves it as a hop
(:class:`~shardmesh.contract.hop.HopCompute`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from .errors import BadInput
from .tensors import RawTensor


#: The most draft tokens one step may carry: the last stage returns a row of logits
#: per draft, so a stranger's step must not ask for a vocabulary's worth of them.
MAX_DRAFT_TOKENS = 16


@dataclass(frozen=True)
class StageInfo:
    """What a stage serves. ``end`` is exclusive; blocks are the transformer layers."""

    model: str
    start: int
    end: int
    total_blocks: int
    hidden_size: int
    vocab_size: int
    dtype: str
    device: str
    backend: str

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.end == self.total_blocks


@dataclass(frozen=True)
class StepRequest:
    """One session's slice of a batched step.

    ``inputs`` holds token ids ``int64 [n]`` on the first stage and hidden states
    ``[n, hidden]`` elsewhere. ``position`` is the absolute position of the first of
    those ``n`` tokens. It may not lie beyond the tokens the session's cache holds
    (positions are explicit so that a replay after failover can never drift), but it
    may lie before: the cached tokens from ``position`` on are dropped first. That is
    how a speculative step's rejected draft tokens leave every hop's cache.

    ``draft``: the last ``draft`` of the ``n`` tokens are proposals (speculative
    decoding); the last stage then returns the logits of the last ``draft + 1``
    positions instead of only the final one, so that each proposal can be checked.
    """

    session_id: str
    inputs: RawTensor
    position: int
    draft: int = 0


@dataclass(frozen=True)
class StepOutput:
    """A served step: its ``value`` (hidden states, or the last hop's sampled-token
    dict), the compute ``seconds`` it took (the batch's forward plus this request's
    sampling), and whether a ``then`` callback already ``sent`` it on its way."""

    value: Any
    seconds: float
    sent: bool = False


class Stage(Protocol):
    """A contiguous range of blocks with per-session KV caches.

    ``step`` returns, per request in order, hidden states ``[n, hidden]`` in the stage's
    dtype, or on the last stage the float32 logits of the final position ``[vocab]``
    (of the last ``draft + 1`` positions, ``[draft + 1, vocab]``, for a request with
    draft tokens).
    Implementations are synchronous and thread-safe enough to be called from one worker
    thread at a time; the node runs them off the event loop.
    """

    info: StageInfo

    def open(self, session_id: str, max_length: int, start: int | None = None, end: int | None = None) -> None:
        """Start a session over blocks ``[start, end)`` of this stage's span (default:
        all of it): a route may enter or leave a server anywhere inside its span."""
        ...

    @property
    def cache_tokens_free(self) -> int: ...

    def step(self, batch: Sequence[StepRequest]) -> list[RawTensor]: ...

    def close(self, session_id: str) -> None: ...

    def reuse_prefix(self, session_id: str, history: Sequence[int], scope: str) -> int:
        """Right after :meth:`open`: fill the session's cache with the longest cached
        prefix of ``history`` among ``scope``'s; the tokens it holds now (0: none)."""
        ...

    def keep_prefix(self, session_id: str, fed: Sequence[int], scope: str) -> int:
        """Right before :meth:`close`: cache the session's keys and values of ``fed``
        (every token it was fed) for ``scope``'s later sessions; the tokens cached."""
        ...

    def expire_idle(self, idle_seconds: float) -> list[str]: ...


def check_step(req: StepRequest, *, embeds: bool, hidden_size: int, length: int, max_length: int) -> int:
    """The checks every backend makes before a step touches a cache; returns the token
    count. ``embeds``: the session starts at block 0 and so takes token ids; ``length``:
    the tokens its cache holds now."""
    raw = req.inputs
    if embeds:
        if raw.dtype not in ("int64", "int32") or len(raw.shape) != 1:
            raise BadInput(f"the first stage takes token ids int64 [n], got {raw.dtype} {list(raw.shape)}")
    else:
        if len(raw.shape) != 2 or raw.shape[1] != hidden_size:
            raise BadInput(f"expected hidden states [n, {hidden_size}], got {list(raw.shape)}")
        if raw.dtype not in ("float32", "float16", "bfloat16"):
            raise BadInput(f"hidden states must be floating point, got {raw.dtype}")
    n = raw.shape[0]
    if n == 0:
        raise BadInput("a step needs at least one token")
    if not 0 <= req.position <= length:
        raise BadInput(f"session {req.session_id!r} holds {length} tokens, step says position {req.position}")
    if not 0 <= req.draft < n or req.draft > MAX_DRAFT_TOKENS:
        raise BadInput(f"a step of {n} tokens may hold 0 to {min(n - 1, MAX_DRAFT_TOKENS)} draft tokens, not {req.draft}")
    if req.position + n > max_length:
        raise BadInput(f"session {req.session_id!r} would exceed its max_length {max_length}")
    return n
