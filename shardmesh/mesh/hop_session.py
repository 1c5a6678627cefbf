"""One session's hop on this node, as the hop server keeps it between frames.

A session is known here by :func:`~shardmesh.mesh.open_request.session_key` (its id
plus where this hop starts), because a route may pass through one peer twice. The
upstream stream and the next hop's stream live in the hop server's handler; what other
tasks need to see (the gateway's attach stream on the last hop, whether the upstream
already ended the session) lives here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

from ..contract import HopCompute, Sampler
from .open_request import session_key
from .step_inbox import StepInbox
from .trunk import Trunk
from .wire import FrameStream

__all__ = ["HopSession"]


@dataclass
class HopSession:
    """One session's hop here: who opened it, its blocks, and its last-hop state."""

    session: str
    upstream_peer: str
    gateway: str
    start: int
    end: int
    is_last: bool
    max_length: int = 0  # tokens it may hold: what it counts against its gateway's share
    served: HopCompute | None = None  # the blocks this session runs on (they stay, even if the node moves)
    sampler: Sampler | None = None
    attach: FrameStream | None = None
    attached: trio.Event = field(default_factory=trio.Event)
    closing: bool = False  # the upstream ended the session: the next hop's close is expected
    attach_done: trio.Event = field(default_factory=trio.Event)
    upstream: FrameStream | None = None  # where its steps come from (ended with an error if reclaimed)
    last_active: float = field(default_factory=trio.current_time)  # its last frame or step's end (trio time)
    busy: bool = False  # a step of it is being computed here: never idle, however long that takes
    inbox: StepInbox | None = None  # its upstream sends its steps on a trunk: they arrive here
    trunk: Trunk | None = None  # its steps go on to the next hop on this trunk
    results_trunk: Trunk | None = None  # last hop: its tokens go to the gateway on this trunk
    prefix_scope: str | None = None  # it may reuse and keep cached prefixes of this scope (prefix_wire.py)
    fed: list[int] = field(default_factory=list)  # the tokens it was fed, as far as we know: its open's history, then its close's

    @property
    def id(self) -> str:
        return session_key(self.session, self.start)
