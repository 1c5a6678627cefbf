"""Serves ``/shardmesh/infer/1.0.0``: this node's hop in other people's chains.

A session through the push chain, as one hop sees it (docs/PROTOCOL.md, 6.2)::

    upstream (gateway or previous hop)        downstream (next hop)
      open{route, ...}        ──▶  open local session ──▶ open{route[1:], ...}
      result{ok}              ◀──                      ◀── result{ok}
      step{position} + bytes  ──▶  run blocks          ──▶ step + hidden states
      error{code, peer}       ◀──  relayed             ◀── error{...}
      close                   ──▶  close local session ──▶ close

The last hop has no downstream: the gateway opens a second stream to it (``attach``) and
it sends each sampled token there. Every hop serves all its sessions through one
:class:`~shardmesh.backends.batcher.StepBatcher`, so concurrent sessions' steps run as
one batch. A session ends when its upstream closes or fails, when the gateway's attach
stream goes away, or on any error, which is sent back towards the gateway with the id of
the peer that failed.

Every limit is checked before anything is allocated: an ``open`` by the pure
:mod:`~shardmesh.mesh.open_request` (route, span, model, sessions per upstream peer,
history, sampling), a step's tokens and payload bytes here. A violation costs the
sender an error frame and a reset; this node's other sessions do not notice.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import trio

from ..contract import CacheBudgetExceeded, HopCompute, NonFiniteInput, StageError
from .cbor_plain import quote
from .hop_attach import RELAY_GRACE, reap_attach, serve_attach
from .hop_session import HopSession
from .hop_step import run_step
from .host import HostError, MeshHost, close_quietly, reset_quietly
from .link_offers import Links, Offer, accept_link, offer_fields, withdraw
from .next_hop import open_next_hop, pass_close, relay_back
from .open_rate import OpenRate
from .open_request import Limits, OpenRequest, ThisNode, check_gateway, refuse_oversized_open, validate_open
from .pipe import pipe_pair
from .prefix_wire import cache_scope
from .reclaim import RECLAIMED, longest_idle
from .step_inbox import StepInbox
from .trunk import Trunk, Trunks
from .trunk_server import TrunkCounts, serve_trunk
from .wire import ATTACH, CLOSE, LINK, OPEN, PROTOCOL, RESULT, STEP, TRUNK, Frame, FrameStream, StreamEnded, WireError

log = logging.getLogger("shardmesh.mesh.hop_server")

FIRST_FRAME_TIMEOUT = 30.0  # an opened stream must say what it wants within this

__all__ = ["HopServer", "HopSession", "Limits"]


class HopServer:
    """The stage server of one node. ``served`` is None on a gateway-only node: it
    answers every session with an error, but still dials chains for its gateway."""

    def __init__(
        self,
        mesh: MeshHost,
        served: HopCompute | None,
        model_id: str,
        total_blocks: int,
        context_length: int,
        limits: Limits = Limits(),
        hidden_size: int | None = None,
        links: Links | None = None,
        allowed: Callable[[str], bool] | None = None,
        unreachable: Callable[[str], bool] = lambda peer: False,
        open_rate: OpenRate | None = None,
        trunks: bool = False,
        prefix_cache: bool = True,
    ) -> None:
        self.mesh = mesh
        self.prefix_cache = prefix_cache  # sessions whose gateway asks may reuse and keep prefixes
        self.unreachable = unreachable  # liveness.py's mark: dialling such a peer fails at once
        self.links = links  # hop links (link.py); None: libp2p streams only
        self.served = served
        self.model_id = model_id
        self.total_blocks = total_blocks
        self.context_length = context_length
        self.limits = limits
        self.me = mesh.peer_id_str
        self.sessions: dict[str, HopSession] = {}
        self.accepting = True
        self.reclaimed = 0  # idle sessions ended to make room (reclaim.py)
        self.open_rate = open_rate or OpenRate()  # opens per second per gateway identity (open_rate.py)
        self.allowed = allowed  # a private swarm's list (allow_list.py); None: anyone
        # From the model, not the stage: a node that has not loaded its blocks yet (or
        # is moving) still relays hidden states of that size.
        hidden = hidden_size if hidden_size is not None else (served.info.hidden_size if served is not None else 0)
        self.max_payload = limits.max_payload(hidden, context_length)
        # Trunks (trunk.py): sessions' steps to a next hop share one frame per batch.
        self.trunks = Trunks(self.open_stream, links, self.max_payload, limits.max_tokens_per_step) if trunks else None
        self.trunk_counts = TrunkCounts()
        self.to_gateways: dict[str, Trunk] = {}  # results trunks, by the gateway that opened each
        self.trunks_in: dict[str, FrameStream] = {}  # steps trunks, by the peer that opened each
        self._nursery: trio.Nursery | None = None

    def serve(self, served: HopCompute | None) -> None:
        """New sessions run on ``served`` from now on (None: none are accepted); the
        sessions already open stay on the stage they started on until they end."""
        self.served = served

    def sessions_on(self, served: HopCompute | None) -> int:
        """Sessions still running on ``served``."""
        return sum(1 for s in self.sessions.values() if s.served is served)

    async def wait_sessions_end(self, served: HopCompute | None, timeout: float) -> int:
        """Waits up to ``timeout`` s for the sessions on ``served`` to end; how many remain."""
        with trio.move_on_after(timeout):
            while self.sessions_on(served):
                await trio.sleep(0.1)
        return self.sessions_on(served)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.trunks is not None:
                await nursery.start(self.trunks.run)
            self.mesh.set_handler(PROTOCOL, self._handle_remote)
            task_status.started()
            await trio.sleep_forever()

    # -- streams -------------------------------------------------------------------

    async def open_stream(self, peer: str) -> Any:
        """A stream to ``peer``'s stage server; to ourselves through an in-process pipe."""
        if peer == self.me:
            assert self._nursery is not None, "HopServer.run is not running"
            mine, theirs = pipe_pair()
            self._nursery.start_soon(self._handle_guarded, theirs, self.me)
            return mine
        from libp2p.peer.id import ID

        try:
            peer_id = ID.from_base58(peer)
        except Exception as exc:
            raise WireError("bad_route", f"{quote(peer)} is not a peer id") from exc
        if self.unreachable(peer):
            raise HostError(f"{peer} is unreachable (its connection dropped and a dial failed); not dialling it again")
        self.mesh.protect(peer_id)
        return await self.mesh.open_stream(peer_id, PROTOCOL)

    async def _handle_guarded(self, stream, upstream_peer: str) -> None:
        """The in-process pipe's handler, guarded like every network stream handler
        (MeshHost.set_handler): nothing it raises may reach the node's nursery."""
        try:
            await self._handle(stream, upstream_peer)
        except Exception as exc:
            log.warning("a local session failed: %s: %s", type(exc).__name__, exc)
            await reset_quietly(stream)

    async def _handle_remote(self, stream) -> None:
        peer_id = stream.muxed_conn.peer_id
        self.mesh.protect(peer_id)
        await self._handle(stream, peer_id.to_base58())

    async def _handle(self, stream, upstream_peer: str) -> None:
        fs = FrameStream(stream, max_payload=self.max_payload)
        try:
            first = await fs.read_frame(idle_timeout=FIRST_FRAME_TIMEOUT, check=lambda header: refuse_oversized_open(header, self.context_length))
            if first.type == OPEN:
                await self._serve_session(fs, first, upstream_peer)
            elif first.type == ATTACH:
                await serve_attach(self.sessions.values(), self.links, fs, first, upstream_peer, self.to_gateways)
            elif first.type == TRUNK and self.trunks is not None:
                if self.allowed is not None and not self.allowed(upstream_peer):
                    raise WireError("forbidden", "this is a private swarm")
                await serve_trunk(self.sessions, self.links, fs, first, upstream_peer, self.limits.max_tokens_per_step,
                                  self.limits.idle_timeout, self.trunk_counts, self.to_gateways, self.trunks_in)  # fmt: skip
            else:
                raise WireError("bad_frame", f"a stream must start with open or attach{' or trunk' if self.trunks else ''}, not {first.type}")
        except StreamEnded:
            pass
        except WireError as exc:
            log.info("refused a stream from %s: %s", upstream_peer, exc.message)
            await fs.send_error(exc.code, exc.message, exc.peer or self.me)
            await reset_quietly(fs.stream)
            return
        except BaseException:
            await reset_quietly(fs.stream)  # a hop link is ours to drop; a libp2p stream, the host's too
            raise
        await close_quietly(fs.stream)  # the hop link, if the session moved to one

    # -- a session: open ------------------------------------------------------------

    def _admit(self, header: dict[str, Any], payload: bytes, upstream_peer: str) -> tuple[HopSession, OpenRequest]:
        """Validate an ``open`` and reserve its session, before any await: opens
        arriving together must all see each other in the per-peer count."""
        served = self.served
        node = ThisNode(self.me, self.model_id, self.total_blocks, self.context_length, served.info if served is not None else None, self.accepting)
        gateway = header.get("gateway")
        if self.allowed is not None and not (self.allowed(upstream_peer) and isinstance(gateway, str) and self.allowed(gateway)):
            raise WireError("forbidden", "this is a private swarm")
        check_gateway(header, time.time())
        if not self.open_rate.allow(gateway, trio.current_time()):
            raise WireError("too_many_sessions", f"gateway {quote(gateway)} opens sessions faster than {self.open_rate.rate:g}/s here")
        mine = self._make_room(lambda s: s.upstream_peer == upstream_peer, self.limits.max_sessions_per_peer)
        theirs = self._make_room(lambda s: s.gateway == gateway, self.limits.max_sessions_per_gateway)
        tokens = sum(s.max_length for s in self.sessions.values() if s.gateway == gateway)
        request = validate_open(header, payload, node, self.limits, mine, self.sessions, theirs, tokens)
        session = HopSession(request.session, upstream_peer, request.gateway, request.start, request.end,
                             is_last=request.is_last, max_length=request.max_length, served=served)  # fmt: skip
        if request.cache and self.prefix_cache:  # it may start with a cached prefix, and leave one
            session.prefix_scope, session.fed = cache_scope(request.gateway, upstream_peer), request.history
        self.sessions[session.id] = session
        return session, request

    def _make_room(self, whose: Callable[[HopSession], bool], limit: int) -> int:
        """Sessions ``whose`` holds here, less one idle one reclaimed if at ``limit``."""
        theirs = [s for s in self.sessions.values() if whose(s)]
        if len(theirs) >= limit and (idle := longest_idle(theirs, trio.current_time())) is not None:
            self._reclaim(idle)
            return len(theirs) - 1
        return len(theirs)

    def _reclaim(self, session: HopSession) -> None:
        """End an idle ``session`` now to make room: its slot at once, its error and stream
        reset in the background (its own handler then closes the rest)."""
        self.sessions.pop(session.id, None)
        self.reclaimed += 1
        log.info("session %s reclaimed after %.0f s idle", session.session, trio.current_time() - session.last_active)
        if session.upstream is not None and self._nursery is not None:
            upstream = session.upstream

            async def end() -> None:
                await self._report(session, upstream, RECLAIMED, "the session was idle and its room was needed")
                await reset_quietly(upstream.stream)

            self._nursery.start_soon(end)

    async def _open_stage(self, session: HopSession, max_length: int) -> int:
        """Open the session's KV cache, with a cached prefix if it may have one (the
        tokens it holds are returned); when it is full, once more after reclaiming."""
        args = (session.id, max_length, session.start, session.end, session.fed, session.prefix_scope)
        try:
            return await session.served.open(*args)
        except CacheBudgetExceeded:
            if not await self._reclaim_cache(session):
                raise
            return await session.served.open(*args)

    async def _reclaim_cache(self, session: HopSession) -> bool:
        """Reclaim the session idle longest on ``session``'s blocks, its cache freed now
        (closing is idempotent); False if none has been idle long enough."""
        others = (s for s in self.sessions.values() if s is not session and s.served is session.served)
        idle = longest_idle(others, trio.current_time())
        if idle is None:
            return False
        self._reclaim(idle)
        await idle.served.close(idle.id)
        return True

    async def _serve_session(self, fs: FrameStream, frame: Frame, upstream_peer: str) -> None:
        session, request = self._admit(frame.header, frame.payload, upstream_peer)
        session.upstream = fs
        route = request.route
        try:
            if session.is_last:
                session.sampler = session.served.new_sampler(request.sampling, request.prompt_ids, request.generated_ids)
            cached = await self._open_stage(session, request.max_length)
        except StageError as exc:
            self.sessions.pop(session.id, None)
            raise WireError(exc.code, exc.message) from exc
        except BaseException:
            self.sessions.pop(session.id, None)
            raise
        downstream: FrameStream | None = None
        offer: Offer | None = None
        try:
            if not session.is_last:
                trunks = self.trunks if route[1]["peer"] != self.me else None
                downstream, session.trunk, later = await open_next_hop(self.open_stream, self.links, self.max_payload, frame, route, trunks)
                cached = min(cached, later)  # the prefill starts where every hop can follow
            if frame.header.get("trunk") is True and self.trunks is not None:  # its steps come on a trunk
                session.inbox, link_fields = StepInbox(), {"trunk": True}
                assert self._nursery is not None
                self._nursery.start_soon(session.inbox.pump, fs)
            else:
                offer, link_fields = offer_fields(self.links, frame.header)
            if request.cache:
                link_fields["cached"] = cached
            await fs.write({"t": RESULT, "session": session.session, "ok": True, **link_fields})
            # No task here is ever cancelled while it reads or writes a stream: py-libp2p
            # cannot take that (a cancelled read may drop the window update it was
            # sending, a cancelled write half a Noise message, and the peer then drops
            # the connection with every other session on it). Sessions end by closing
            # streams instead: each end's reader sees the close and returns.
            async with trio.open_nursery() as nursery:
                relay_done = trio.Event()
                if downstream is not None:
                    later = [hop["peer"] for hop in route[2:]]  # whom the next hop may blame besides itself
                    nursery.start_soon(relay_back, session, downstream, fs, route[1]["peer"], relay_done, later)
                await self._steps(session, fs, downstream, offer)
                if downstream is not None:
                    # FIN to the next hop: it ends its session and closes its side,
                    # which ends our relay's read.
                    await close_quietly(downstream.stream)
                    with trio.move_on_after(RELAY_GRACE):
                        await relay_done.wait()
                    if not relay_done.is_set():
                        await reset_quietly(downstream.stream)
        finally:
            self.sessions.pop(session.id, None)
            withdraw(self.links, offer)
            with trio.CancelScope(shield=True):
                if session.inbox is not None:
                    await session.inbox.end(fs, self._nursery, RELAY_GRACE)
                await session.served.close(session.id, session.fed, session.prefix_scope)
                if downstream is not None:
                    await close_quietly(downstream.stream)
                if session.attach is not None:
                    await close_quietly(session.attach.stream)
                    # The gateway closes its side in turn; one that does not is reset.
                    assert self._nursery is not None
                    try:
                        self._nursery.start_soon(reap_attach, session)
                    except RuntimeError:  # the node is stopping: no time to wait for the gateway
                        await reset_quietly(session.attach.stream)

    # -- a session: steps -----------------------------------------------------------

    def _check_step_header(self, header: dict[str, Any]) -> None:
        if header["t"] == STEP:
            shape = header.get("shape")
            if isinstance(shape, list) and shape and isinstance(shape[0], int) and shape[0] > self.limits.max_tokens_per_step:
                raise WireError("too_large", f"{shape[0]} tokens in one step (limit {self.limits.max_tokens_per_step})")

    async def _steps(self, session: HopSession, fs: FrameStream, downstream: FrameStream | None, offer: Offer | None) -> None:
        info = session.served.info
        max_elements = self.limits.max_tokens_per_step * max(1, info.hidden_size)
        source = session.inbox or fs  # a trunked session's steps come on the trunk
        while True:
            try:
                frame = await source.read_frame(idle_timeout=self.limits.idle_timeout, check=self._check_step_header)
                session.last_active = trio.current_time()
            except StreamEnded:
                log.debug("session %s: upstream %s closed", session.id, session.upstream_peer)
                session.closing = True
                return
            except WireError as exc:
                await self._report(session, fs, exc.code, exc.message)
                return
            if frame.type == CLOSE:
                await pass_close(session, frame, downstream)
                return
            if frame.type == LINK:
                try:
                    await accept_link(self.links, fs, offer, session.session)
                except WireError as exc:
                    await self._report(session, fs, exc.code, exc.message)
                    return
                offer = None  # one link per session hop
                continue
            if frame.type != STEP:
                await self._report(session, fs, "bad_frame", f"unexpected {frame.type} frame in a session")
                return
            try:
                await self._compute_step(session, frame, downstream, max_elements)
            except NonFiniteInput as exc:  # the upstream hop sent NaN or inf: its fault, not ours
                await self._report(session, fs, exc.code, exc.message, blame=session.upstream_peer)
                return
            except (StageError, WireError) as exc:  # refused input, full cache, a hop gone, bad_request
                await self._report(session, fs, exc.code, exc.message)
                return
            except Exception as exc:  # a bug, or e.g. NaN logits from a broken checkpoint
                log.exception("session %s: step failed", session.id)
                await self._report(session, fs, "internal", f"{type(exc).__name__}: {exc}")
                return

    async def _compute_step(self, session: HopSession, frame: Frame, downstream: FrameStream | None, max_elements: int) -> None:
        """One step (hop_step.py), busy meanwhile (never reclaimed); a full cache is
        retried once after reclaiming an idle session (a refused step changed nothing)."""
        session.busy = True
        try:
            try:
                await run_step(session, frame, downstream, max_elements)
            except CacheBudgetExceeded:
                if not await self._reclaim_cache(session):
                    raise
                await run_step(session, frame, downstream, max_elements)
        finally:
            session.busy = False
            session.last_active = trio.current_time()

    async def _report(self, session: HopSession, fs: FrameStream, code: str, message: str, blame: str | None = None) -> None:
        """Ends ``session`` with an error frame upstream (and to the gateway, on the last
        hop) naming ``blame``: this node unless told otherwise (docs/PROTOCOL.md 6.3)."""
        log.info("session %s failed here: %s", session.session, message)
        blame = blame or self.me
        # S2 first: the gateway believes a bad_request only from the last hop itself,
        # and would otherwise wait for it after the relayed copy (chain_client._failure).
        if session.attach is not None:
            await session.attach.send_error(code, message, blame, session.session)
        await fs.send_error(code, message, blame, session.session)
