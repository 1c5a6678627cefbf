"""What one hop of a chain computes, as the mesh's hop server sees it.

The hop server (:mod:`shardmesh.mesh.hop_server`) speaks the wire protocol and knows
nothing of torch or mlx; the node hands it a :class:`HopCompute` that runs the local
blocks (and, on the last hop, samples the next token) on the compute thread. Only raw
tensors, plain dicts and :class:`~shardmesh.contract.stage.StepOutput` cross here.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

from .stage import StageInfo, StepOutput
from .tensors import RawTensor


class Sampler(Protocol):
    """One session's sampling on the last hop: logits in, the token dict out
    (``{"token": id, "logprob": float | None, "top": [[id, logprob], ...]}``)."""

    def __call__(self, logits: RawTensor) -> dict[str, Any]: ...

    def verify(self, logits: RawTensor, drafts: Sequence[int]) -> dict[str, Any]:
        """Check draft tokens against the logits of their positions (``[len(drafts) + 1,
        vocab]``): the token dict of the first token drawn, with the rest (the drafts it
        accepted after the first, then its own) in ``"more"`` as ``[id, logprob, top]``."""
        ...


class HopCompute(Protocol):
    """The local blocks as a hop: open a session, step it, close it."""

    @property
    def info(self) -> StageInfo: ...

    @property
    def cache_tokens_free(self) -> int: ...

    def new_sampler(self, sampling: dict[str, Any], prompt_ids: Sequence[int], generated: Sequence[int]) -> Sampler:
        """Checks what the gateway sent; raises :class:`~shardmesh.contract.errors.BadInput`."""
        ...

    async def open(
        self, session_id: str, max_length: int, start: int, end: int, history: Sequence[int] = (), scope: str | None = None,
    ) -> int:
        """Open a session; with a ``scope`` (the gateway whose sessions may share
        prefixes), start it with the longest cached prefix of ``history``. Returns the
        tokens it holds already."""
        ...

    async def step(
        self,
        session_id: str,
        inputs: RawTensor,
        position: int,
        sampler: Sampler | None,
        then: Callable[[Any, float], bool] | None = None,
        drafts: Sequence[int] = (),
        flush: Callable[[], None] | None = None,
    ) -> StepOutput:
        """Hidden states out, or (``sampler`` given) the sampled token dict; ``then(value,
        seconds)`` runs on the compute thread right after and says whether it sent it, and
        ``flush()`` once after every ``then`` of the batch the step was computed in (a
        trunk sends the batch's outputs as one frame then).
        ``drafts``: the last ``len(drafts)`` inputs are proposals that the last hop's
        sampler checks (:meth:`Sampler.verify`)."""
        ...

    async def close(self, session_id: str, fed: Sequence[int] = (), scope: str | None = None) -> None:
        """Close a session; with a ``scope``, keep its prefix of ``fed`` (every token it
        was fed) for that scope's later sessions first."""
        ...
