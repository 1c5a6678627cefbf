"""A chain: one session over all of a model's blocks, wherever they are.

The gateway's generation loop sees only these two protocols. A chain may be local
stages in this process or a route of peers over the mesh; the loop opens it, feeds it
tokens, and reads back what the last hop sampled.
"""

from __future__ import annotations

from typing import Protocol, Sequence

from .sampling import SampledToken, SamplingParams


class Chain(Protocol):
    """One session over blocks ``[0, L)``: opened, stepped, always closed.

    ``parallel_stages``: how many parts of the chain compute at the same time once
    open, each on its own chunk of a prefill (the hops of a route of peers; 1 for
    blocks in one process, which one compute thread runs in turn). ``prefill_step``:
    the most tokens a prefill step should carry, the least of what its parts measured
    they compute best (None: none measured; the gateway's default)."""

    @property
    def parallel_stages(self) -> int: ...

    @property
    def prefill_step(self) -> int | None: ...

    async def open(self, max_length: int) -> int:
        """Open the session; how many of the history's first tokens every part holds
        already (a cached prefix: the prefill starts there; 0 for none)."""
        ...

    async def step(self, token_ids: list[int], position: int, want_token: bool) -> SampledToken | None: ...

    async def verify(self, token_ids: list[int], position: int, draft: int) -> list[SampledToken]:
        """A speculative step: ``token_ids`` from ``position`` (which may lie before the
        end of what the chain holds: the tokens from there on are dropped), the last
        ``draft`` of them proposals. Returns the tokens the last hop drew from the first
        proposal's position on: the proposals it accepted, then one of its own."""
        ...

    async def close(self, fed: Sequence[int] = ()) -> None:
        """End the session. ``fed``: every token the chain was fed, in order; its parts
        may keep their keys and values of them for later sessions that start the same."""
        ...


class ChainOpener(Protocol):
    """Makes chains; ``available`` says whether one could be opened now."""

    def available(self) -> bool: ...

    def chain(
        self, session_id: str, sampling: SamplingParams, prompt_ids: list[int], generated: list[int],
        avoid: frozenset[str] = frozenset(),
    ) -> Chain:
        """A new, unopened session whose last hop samples as if ``generated`` had
        already been drawn after ``prompt_ids``. ``avoid``: peers the request has seen
        fail already; the chain never goes through them (an opener that runs no peers
        ignores it)."""
        ...
