"""Which blocks this node serves over its life: join, move, drain.

Nobody assigns layers. A node started with ``--layers auto`` looks at the swarm's
records, takes the window of blocks the swarm lacks most (:func:`choose_span`: gaps
first, then the weakest throughput), announces it as ``joining`` so that others do not
rush into the same gap, loads only those weights, and goes ``online``. From then on it
asks at randomised intervals whether moving elsewhere would raise the swarm's
bottleneck by a clear margin (:func:`plan_move`, with hysteresis); when a node leaves,
gracefully or not, this is what closes the gap it left.

A move keeps every running answer intact: the node announces the new span first (so
no new sessions come for the old one), lets the sessions on the old stage finish (up
to ``drain_timeout``; a gateway replays any that are cut), loads the new span, goes
online with it, and only then frees the old stage.

The decisions are the pure functions of :mod:`shardmesh.placement`; this module only
wires them to the registry, the stage server and the backend.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Awaitable, Callable

import trio

from ..backends.footprint import release_unused_memory
from ..backends.kv_sessions import KVSessions
from ..contract import HopCompute
from ..mesh.records import server_view
from ..mesh.registry import Registry
from ..mesh.hop_server import HopServer
from ..mesh.open_request import PREFILL_STEP
from ..placement.rebalance import check_interval, plan_move
from ..placement.select import choose_span
from ..placement.spans import DRAINING, JOINING, ONLINE, ServerView, repair
from .blocks import LocalBlocks

log = logging.getLogger("shardmesh.node.span_keeper")

SETTLE = 2.0  # seconds for an announcement to reach the swarm (gossip heartbeat is 1 s)
FIRST_VIEW_WAIT = 10.0  # seconds a joining node waits to hear of the swarm it joins
SYNC_PEERS = 3  # peers a joining node then asks for their whole view
ANNOUNCE_ROUNDS = 3  # times a joining node may re-choose after seeing a clash
GAP_POLL = 1.0  # s between looks for a gap when the view has not changed (liveness marks do not notify)


@dataclass
class Held:
    """A loaded span: its blocks (and the hop the hop server runs) and what keeps it running."""

    start: int
    end: int
    hop: HopCompute | None  # the blocks as the hop server runs them (None once freed)
    blocks: LocalBlocks | None
    scope: trio.CancelScope


class SpanKeeper:
    """Owns this node's span: what it loads, what its record says, when it moves.

    ``load(span)`` is the node's loader: an async function returning its
    :class:`~shardmesh.node.blocks.LocalBlocks` for ``[start, end)``;
    ``run_blocks(blocks, task_status=...)`` runs a loaded stage (its batcher and
    housekeeping) until cancelled. Call :meth:`start` (or :meth:`run`) first.
    """

    def __init__(
        self,
        *,
        registry: Registry,
        server: HopServer,
        total_blocks: int,
        capacity: int,
        load: Callable[[tuple[int, int]], Awaitable[LocalBlocks]],
        run_blocks: Callable[..., Awaitable[None]],
        drain_timeout: float,
        say: Callable[[str], None],
        rng: random.Random | None = None,
    ) -> None:
        self.registry = registry
        self.server = server
        self.total_blocks = total_blocks
        self.capacity = capacity
        self.load = load
        self.run_blocks = run_blocks
        self.drain_timeout = drain_timeout
        self.say = say
        self.rng = rng or random.Random()
        self.held: Held | None = None
        self.moves = 0
        self.draining = False  # set once, by drain(): no more moves, no going online
        self._busy = trio.Lock()  # one join or move at a time
        self._nursery: trio.Nursery | None = None

    def stage_counts(self) -> tuple[int, int]:
        """Steps and batches the held blocks have run (0, 0 when none are held)."""
        blocks = self.held.blocks if self.held is not None else None
        return (blocks.batcher.batched_requests, blocks.batcher.batches) if blocks is not None else (0, 0)

    def prefix_counts(self) -> tuple[int, int]:
        """Tokens the held blocks took from their prefix cache, and the bytes it holds."""
        blocks = self.held.blocks if self.held is not None else None
        stage = blocks.stage if blocks is not None else None
        return (stage.prefix_tokens_reused, stage.prefixes.nbytes) if isinstance(stage, KVSessions) else (0, 0)

    def start(self, nursery: trio.Nursery) -> None:
        """Loaded stages will run in ``nursery`` (the node's)."""
        self._nursery = nursery

    async def serve_fixed(self, span: tuple[int, int]) -> None:
        """Serve a span given by hand (``--layers A:B`` or ``all``): never moves."""
        async with self._busy:
            await self._take(span)

    @property
    def me(self) -> str:
        return self.registry.mesh_host.peer_id_str

    def _others(self) -> list[ServerView]:
        return [s for s in self.registry.servers() if s.peer != self.me]

    def _me_view(self) -> ServerView | None:
        local = self.registry.local
        if local is None or not local.serves_blocks:
            return None
        return server_view(local)

    # -- joining -------------------------------------------------------------------

    async def wait_for_swarm(self, expect_peers: bool) -> None:
        """Give the records of the swarm we join time to arrive before choosing."""
        if expect_peers:
            with trio.move_on_after(FIRST_VIEW_WAIT):
                while not self._others():
                    await self.registry.wait_changed(timeout=0.5)
            # Gossip has shown us the nodes that happened to publish since we joined;
            # the peers we are connected to hold the rest of the swarm's records (and
            # asking them dials nobody that a record merely names).
            await self.registry.sync_from(self.registry.neighbours()[:SYNC_PEERS])
        # Nodes started together would all pick the same gap: spread them out a little.
        await trio.sleep(SETTLE + self.rng.uniform(0.0, SETTLE))

    def _estimate_throughput(self) -> float:
        """What a joining record announces before its own measurement exists: the
        swarm's mean (placement needs a number; routing ignores joining nodes)."""
        online = [v.throughput for v in self._others() if v.state == ONLINE and v.throughput > 0]
        return sum(online) / len(online) if online else 1.0

    async def join(self, *, expect_peers: bool) -> None:
        """Choose a span, announce it, load it, go online."""
        async with self._busy:
            await self.wait_for_swarm(expect_peers)
            estimate = self._estimate_throughput()
            span = choose_span(self._others(), self.total_blocks, self.capacity)
            for _ in range(ANNOUNCE_ROUNDS):
                self.registry.update_local(start=span[0], end=span[1], state=JOINING, throughput=estimate)
                log.info("announced blocks [%d, %d) (joining)", *span)
                await trio.sleep(SETTLE)
                clash = [v for v in self._others() if v.state == JOINING and v.start < span[1] and span[0] < v.end and v.peer < self.me]
                if not clash:
                    break
                # Someone else announced an overlapping window at the same time; the
                # lower peer id keeps it and we choose again with theirs counted.
                span = choose_span(self._others(), self.total_blocks, self.capacity)
            await self._take(span)

    async def _take(self, span: tuple[int, int]) -> Held:
        """Load ``span``, start serving it, publish ``online``, then free the old stage
        (whose running sessions have ended or been given up by then)."""
        assert self._nursery is not None, "SpanKeeper.start() first"
        blocks = await self.load(span)
        scope = await self._nursery.start(self._run_held, blocks)
        held = Held(span[0], span[1], blocks.hop, blocks, scope)
        old, self.held = self.held, held
        self.server.serve(blocks.hop)
        info = blocks.stage.info
        limits = dict(self.registry.local.limits) if self.registry.local else {}
        limits.pop(PREFILL_STEP, None)  # the old span's measurement
        if blocks.prefill_step:
            limits[PREFILL_STEP] = blocks.prefill_step
        self.registry.update_local(
            start=span[0], end=span[1], state=DRAINING if self.draining else ONLINE, throughput=blocks.throughput,
            cache_tokens_free=blocks.stage.cache_tokens_free, backend=info.backend, device=info.device, dtype=info.dtype,
            limits=limits,
        )
        if old is not None:
            self._free(old)
        return held

    async def _run_held(self, blocks, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.run_blocks, blocks)
                task_status.started(scope)

    def _free(self, held: Held) -> None:
        held.scope.cancel()
        held.blocks = held.hop = None
        release_unused_memory()

    # -- rebalancing ---------------------------------------------------------------

    async def run_auto(self, *, expect_peers: bool, rebalance_interval: float, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """``--layers auto``: join, then keep checking whether to move, forever: at
        random intervals, and at once when blocks lose their last server."""
        await self.join(expect_peers=expect_peers)
        task_status.started()
        while True:
            with trio.move_on_after(check_interval(self.rng, rebalance_interval)):
                await self.gap_left()
            await self.check_once()

    async def gap_left(self) -> None:
        """Returns once some blocks have no server and nobody is loading them.

        Every node with room sees the same gap at about the same time: each waits a
        random moment first, so that the first to move announces it (``joining``) and
        the others, looking again, see the gap taken.
        """
        while True:
            await self.registry.wait_changed(timeout=GAP_POLL)
            if repair(self.registry.servers(), self.total_blocks).unfilled:
                await trio.sleep(self.rng.uniform(0.0, SETTLE))
                if repair(self.registry.servers(), self.total_blocks).unfilled:
                    log.debug("blocks without a server and nobody moving in: checking whether to move now")
                    return

    async def check_once(self) -> tuple[int, int] | None:
        """One rebalance check: move if that clearly helps. The new span, or None."""
        async with self._busy:
            mine = self._me_view()
            if mine is None or mine.state != ONLINE or self.held is None or self.draining:
                return None
            target = plan_move([*self._others(), mine], self.total_blocks, self.me, self.capacity)
            if target is None or target == (self.held.start, self.held.end):
                return None
            await self._move(target)
            return target

    async def _move(self, target: tuple[int, int]) -> None:
        assert self.held is not None
        old = self.held
        self.say(f"moving from blocks [{old.start}, {old.end}) to [{target[0]}, {target[1]}) to balance the swarm")
        # Announce first: new sessions stop coming here for the old span, and others
        # see the target as taken. The old stage keeps serving what it has.
        self.registry.update_local(start=target[0], end=target[1], state=JOINING)
        self.server.serve(None)
        left = await self.server.wait_sessions_end(old.hop, self.drain_timeout)
        if left:
            log.warning("moving with %d session(s) still open on the old span (their gateways replay them)", left)
        await self._take(target)
        self.moves += 1
        self.say(f"serving blocks [{target[0]}, {target[1]}) after a move")

    # -- leaving -------------------------------------------------------------------

    async def drain(self, timeout: float) -> int:
        """Announce ``draining``, take no new sessions, wait for running ones; how many
        were still open at the deadline."""
        self.draining = True
        self.registry.update_local(state=DRAINING)
        self.server.accepting = False
        if self.held is None:
            return 0
        return await self.server.wait_sessions_end(self.held.hop, timeout)
