"""Serves ``/shardmesh/infer/1.0.0``: this node's hop in other people's chains.

A session through the push chain, as one hop sees it (ARCHITECTURE.md, "A token's
path")::

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

Every limit is checked before anything is allocated: sessions per upstream peer, tokens
per step, payload bytes. A violation costs the sender an error frame and a reset; this
node's other sessions do not notice.
"""

from __future__ import annotations

import logging
from array import array
from dataclasses import dataclass, field
from typing import Any, Callable

import trio

from ..contract import HopCompute, Sampler, StageError
from .host import MeshHost, close_quietly, reset_quietly
from .link import HopLink
from .link_offers import Links, Offer, accept_link, offer_fields, request_fields, upgrade_opener, withdraw
from .pipe import pipe_pair
from .wire import (
    ATTACH,
    CLOSE,
    ERROR,
    LINK,
    OPEN,
    PROTOCOL,
    RESULT,
    STEP,
    Frame,
    FrameStream,
    StreamEnded,
    WireError,
    encode_frame,
    tensor_fields,
    tensor_from_frame,
)

log = logging.getLogger("shardmesh.mesh.hop_server")

FIRST_FRAME_TIMEOUT = 30.0  # an opened stream must say what it wants within this
OPEN_TIMEOUT = 60.0  # the rest of the chain must open within this (loading is done already)
RELAY_GRACE = 5.0  # seconds the next hop gets to close its side after ours
MAX_ROUTE_HOPS = 64
MAX_SESSION_ID = 64


@dataclass(frozen=True)
class Limits:
    """What one peer may ask of this node. Published in the record, enforced here."""

    max_sessions_per_peer: int = 64
    max_tokens_per_step: int = 2048
    idle_timeout: float = 300.0  # seconds a session may wait between steps

    def max_payload(self, hidden_size: int, context_length: int) -> int:
        per_step = self.max_tokens_per_step * hidden_size * 4
        return max(per_step, context_length * 8) + 4096

    def as_record(self) -> dict[str, int]:
        return {"max_sessions_per_peer": self.max_sessions_per_peer, "max_tokens_per_step": self.max_tokens_per_step}


@dataclass
class HopSession:
    """One session's hop here. A route may pass through one peer twice (not back to
    back), so the local key is the session id plus where this hop starts."""

    session: str
    upstream_peer: str
    gateway: str
    start: int
    end: int
    is_last: bool
    served: HopCompute | None = None  # the blocks this session runs on (they stay, even if the node moves)
    sampler: Sampler | None = None
    attach: FrameStream | None = None
    attached: trio.Event = field(default_factory=trio.Event)
    closing: bool = False  # the upstream ended the session: the next hop's close is expected
    attach_done: trio.Event = field(default_factory=trio.Event)

    @property
    def id(self) -> str:
        return f"{self.session}@{self.start}"


def _fail(code: str, message: str) -> WireError:
    return WireError(code, message)


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
        addrs_of: Callable[[str], list[str]] | None = None,
        hidden_size: int | None = None,
        links: Links | None = None,
    ) -> None:
        self.mesh = mesh
        self.links = links  # hop links (link.py); None: libp2p streams only
        self.served = served
        self.model_id = model_id
        self.total_blocks = total_blocks
        self.context_length = context_length
        self.limits = limits
        self.addrs_of = addrs_of or (lambda peer: [])
        self.me = mesh.peer_id_str
        self.sessions: dict[str, HopSession] = {}
        self.accepting = True
        # From the model, not the stage: a node that has not loaded its blocks yet (or
        # is moving) still relays hidden states of that size.
        hidden = hidden_size if hidden_size is not None else (served.info.hidden_size if served is not None else 0)
        self.max_payload = limits.max_payload(hidden, context_length)
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
            raise WireError("bad_route", f"{peer!r} is not a peer id") from exc
        self.mesh.remember(peer_id, self.addrs_of(peer))
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
            first = await fs.read_frame(idle_timeout=FIRST_FRAME_TIMEOUT, check=self._check_open_header)
            if first.type == OPEN:
                await self._serve_session(fs, first, upstream_peer)
            elif first.type == ATTACH:
                await self._serve_attach(fs, first, upstream_peer)
            else:
                raise _fail("bad_frame", f"a stream must start with open or attach, not {first.type}")
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

    def _check_open_header(self, header: dict[str, Any]) -> None:
        if header["t"] == OPEN and header.get("nbytes", 0) > self.context_length * 8:
            raise _fail("too_large", f"the history exceeds the model's context of {self.context_length} tokens")

    # -- a session: open ------------------------------------------------------------

    def _validated_open(self, header: dict[str, Any], upstream_peer: str) -> tuple[HopSession, list[dict], int]:
        if self.served is None:
            raise _fail("not_serving", "this node serves no blocks")
        if not self.accepting:
            raise _fail("draining", "this node is leaving and accepts no new sessions")
        sid, route, max_length = header.get("session"), header.get("route"), header.get("max_length")
        if not isinstance(sid, str) or not 0 < len(sid) <= MAX_SESSION_ID:
            raise _fail("bad_input", "session must be a string of 1 to 64 characters")
        if header.get("model") != self.model_id:
            raise _fail("wrong_model", f"this node serves {self.model_id}, not {header.get('model')!r}")
        if not isinstance(route, list) or not 0 < len(route) <= MAX_ROUTE_HOPS:
            raise _fail("bad_route", f"route must be a list of 1 to {MAX_ROUTE_HOPS} hops")
        for hop in route:
            if not (isinstance(hop, dict) and isinstance(hop.get("peer"), str) and isinstance(hop.get("start"), int) and isinstance(hop.get("end"), int)):
                raise _fail("bad_route", "each hop needs peer, start and end")
        for a, b in zip(route, route[1:]):
            if a["end"] != b["start"]:
                raise _fail("bad_route", "the route's hops must be contiguous")
            if a["peer"] == b["peer"]:
                raise _fail("bad_route", "two hops in a row on one peer (they would be one hop)")
        here = route[0]
        served = self.served
        info = served.info
        if here["peer"] != self.me:
            raise _fail("bad_route", f"the route's next hop is {here['peer']}, not this node")
        if not info.start <= here["start"] < here["end"] <= info.end:
            raise _fail("bad_route", f"blocks [{here['start']}, {here['end']}) are not inside this node's [{info.start}, {info.end})")
        if route[-1]["end"] != self.total_blocks:
            raise _fail("bad_route", "the route must end at the model's last block")
        if not isinstance(max_length, int) or not 0 < max_length <= self.context_length:
            raise _fail("bad_input", f"max_length must be in [1, {self.context_length}]")
        if not isinstance(header.get("gateway"), str):
            raise _fail("bad_input", "open needs the gateway's peer id")
        mine = sum(1 for s in self.sessions.values() if s.upstream_peer == upstream_peer)
        if mine >= self.limits.max_sessions_per_peer:
            raise _fail("too_many_sessions", f"peer has {mine} sessions open here (limit {self.limits.max_sessions_per_peer})")
        session = HopSession(sid, upstream_peer, header["gateway"], here["start"], here["end"], is_last=len(route) == 1, served=served)
        if session.id in self.sessions:
            raise _fail("bad_input", f"session {sid!r} is already open here")
        # Reserved now, before any await: opens arriving together must all see it in
        # the per-peer count.
        self.sessions[session.id] = session
        return session, route, max_length

    def _history(self, frame: Frame) -> tuple[list[int], list[int]]:
        """Prompt and generated ids for the last hop's sampler (payload: int64 ids)."""
        n_prompt = frame.header.get("n_prompt", 0)
        if len(frame.payload) % 8 or not isinstance(n_prompt, int) or not 0 <= n_prompt <= len(frame.payload) // 8:
            raise _fail("bad_input", "history payload must be int64 ids with n_prompt <= their count")
        ids = array("q")
        ids.frombytes(frame.payload)
        return list(ids[:n_prompt]), list(ids[n_prompt:])

    async def _serve_session(self, fs: FrameStream, frame: Frame, upstream_peer: str) -> None:
        session, route, max_length = self._validated_open(frame.header, upstream_peer)
        try:
            if session.is_last:
                prompt, generated = self._history(frame)
                session.sampler = session.served.new_sampler(frame.header.get("sampling", {}), prompt, generated)
            await session.served.open(session.id, max_length, session.start, session.end)
        except StageError as exc:
            self.sessions.pop(session.id, None)
            raise _fail(exc.code, exc.message) from exc
        except BaseException:
            self.sessions.pop(session.id, None)
            raise
        downstream: FrameStream | None = None
        offer: Offer | None = None
        try:
            if not session.is_last:
                downstream = await self._open_downstream(frame, route)
            offer, link_fields = offer_fields(self.links, frame.header)
            await fs.write({"t": RESULT, "session": session.session, "ok": True, **link_fields})
            # No task here is ever cancelled while it reads or writes a stream: py-libp2p
            # cannot take that (a cancelled read may drop the window update it was
            # sending, a cancelled write half a Noise message, and the peer then drops
            # the connection with every other session on it). Sessions end by closing
            # streams instead: each end's reader sees the close and returns.
            async with trio.open_nursery() as nursery:
                relay_done = trio.Event()
                if downstream is not None:
                    nursery.start_soon(self._relay_back, session, downstream, fs, route[1]["peer"], relay_done)
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
                await session.served.close(session.id)
                if downstream is not None:
                    await close_quietly(downstream.stream)
                if session.attach is not None:
                    await close_quietly(session.attach.stream)
                    # The gateway closes its side in turn; one that does not is reset.
                    assert self._nursery is not None
                    try:
                        self._nursery.start_soon(self._reap_attach, session)
                    except RuntimeError:  # the node is stopping: no time to wait for the gateway
                        await reset_quietly(session.attach.stream)

    async def _open_downstream(self, frame: Frame, route: list[dict]) -> FrameStream:
        """Open the rest of the chain; a :class:`WireError` naming the failed peer if not."""
        nxt = route[1]["peer"]
        try:
            stream = await self.open_stream(nxt)
        except Exception as exc:
            raise WireError("peer_unreachable", f"cannot reach the next hop: {exc}", nxt) from exc
        downstream = FrameStream(stream, max_payload=self.max_payload)
        header = {k: v for k, v in frame.header.items() if k != "link"}  # the upstream's wish, not ours
        header.update(route=route[1:], **request_fields(self.links, downstream, nxt))
        try:
            await downstream.write(header, frame.payload)
        except WireError as exc:
            await reset_quietly(stream)
            raise WireError("peer_lost", f"the next hop went away during open: {exc.message}", nxt) from exc
        try:
            reply = await downstream.read_frame(idle_timeout=OPEN_TIMEOUT)
        except (StreamEnded, WireError) as exc:
            await reset_quietly(stream)
            raise WireError("peer_lost", f"the next hop did not answer open: {exc}", nxt) from exc
        if reply.type == ERROR:
            # Pass it on as it is: it names the peer that refused.
            await close_quietly(stream)
            h = reply.header
            raise WireError(str(h.get("code", "error")), str(h.get("message", "")), str(h.get("peer", nxt)))
        if reply.type != RESULT or reply.header.get("ok") is not True:
            await reset_quietly(stream)
            raise _fail("bad_frame", f"the next hop answered open with {reply.type}")
        try:
            await upgrade_opener(self.links, downstream, reply.header, nxt, frame.header["session"])
        except WireError as exc:
            await reset_quietly(downstream.stream)
            raise WireError("peer_lost", f"the next hop went away during open: {exc.message}", nxt) from exc
        return downstream

    # -- a session: steps -----------------------------------------------------------

    def _check_step_header(self, header: dict[str, Any]) -> None:
        if header["t"] == STEP:
            shape = header.get("shape")
            if isinstance(shape, list) and shape and isinstance(shape[0], int) and shape[0] > self.limits.max_tokens_per_step:
                raise _fail("too_large", f"{shape[0]} tokens in one step (limit {self.limits.max_tokens_per_step})")

    async def _steps(self, session: HopSession, fs: FrameStream, downstream: FrameStream | None, offer: Offer | None) -> None:
        info = session.served.info
        max_elements = self.limits.max_tokens_per_step * max(1, info.hidden_size)
        while True:
            try:
                frame = await fs.read_frame(idle_timeout=self.limits.idle_timeout, check=self._check_step_header)
            except StreamEnded:
                log.debug("session %s: upstream %s closed", session.id, session.upstream_peer)
                session.closing = True
                return
            except WireError as exc:
                await self._report(session, fs, exc.code, exc.message)
                return
            if frame.type == CLOSE:
                session.closing = True
                if downstream is not None:
                    try:
                        await downstream.write({"t": CLOSE, "session": session.session})
                    except WireError:
                        pass
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
                await self._step(session, frame, downstream, max_elements)
            except (StageError, WireError) as exc:  # refused input, full cache, a hop gone
                await self._report(session, fs, exc.code, exc.message)
                return
            except Exception as exc:  # a bug, or e.g. NaN logits from a broken checkpoint
                log.exception("session %s: step failed", session.id)
                await self._report(session, fs, "internal", f"{type(exc).__name__}: {exc}")
                return

    async def _step(self, session: HopSession, frame: Frame, downstream: FrameStream | None, max_elements: int) -> None:
        position, want = frame.header.get("position"), frame.header.get("want", False)
        spent = frame.header.get("spent", 0.0)
        if not isinstance(position, int) or position < 0 or not isinstance(want, bool):
            raise _fail("bad_input", "step needs an integer position >= 0 and a boolean want")
        if isinstance(spent, bool) or not isinstance(spent, (int, float)) or not 0 <= spent < 1e6:
            raise _fail("bad_input", "spent must be a number of seconds >= 0")
        inputs = tensor_from_frame(frame, max_elements)
        sampler = session.sampler if (session.is_last and want) else None

        def frame_for(value: Any, seconds: float) -> tuple[dict[str, Any], bytes]:
            """The frame this step's output travels in (next hop: a step; gateway: a result)."""
            head = {"session": session.session, "position": position, "spent": spent + seconds}
            if downstream is not None:
                return {"t": STEP, **head, "want": want, **tensor_fields(value)}, value.data
            return {"t": RESULT, **head, **value}, b""

        # Where the output goes over a hop link, the compute thread sends it itself.
        target = downstream if downstream is not None else (session.attach if want else None)
        link = target.stream if target is not None and isinstance(target.stream, HopLink) else None

        def send_now(value: Any, seconds: float) -> bool:
            assert link is not None
            return link.send_now(encode_frame(*frame_for(value, seconds)))

        done = await session.served.step(session.id, inputs, position, sampler, send_now if link is not None else None)
        if done.sent or (downstream is None and not want):
            return
        if downstream is None:
            with trio.move_on_after(FIRST_FRAME_TIMEOUT):
                await session.attached.wait()
            if session.attach is None:
                raise _fail("gateway_gone", "the gateway's result stream is gone")
            target = session.attach
        assert target is not None
        await target.write(*frame_for(done.value, done.seconds))

    async def _relay_back(self, session: HopSession, downstream: FrameStream, fs: FrameStream, nxt: str, done: trio.Event) -> None:
        """Errors from further down travel back towards the gateway, which then ends
        the session. The next hop closing its side is the normal end (after ours)."""
        try:
            frame = await downstream.read_frame()
            if frame.type == ERROR:
                await fs.write(frame.header)
            else:
                await fs.send_error("bad_frame", f"unexpected {frame.type} from the next hop", nxt, session.session)
        except (StreamEnded, WireError) as exc:
            if not session.closing:
                log.debug("session %s: next hop %s went away: %r", session.id, nxt, exc)
                await fs.send_error("peer_lost", f"the next hop went away: {exc!r}", nxt, session.session)
        except Exception as exc:  # a write to a vanished upstream: the session is over anyway
            log.debug("session %s: relaying back failed: %r", session.id, exc)
        finally:
            done.set()

    async def _report(self, session: HopSession, fs: FrameStream, code: str, message: str) -> None:
        log.info("session %s failed here: %s", session.session, message)
        await fs.send_error(code, message, self.me, session.session)
        if session.attach is not None:
            await session.attach.send_error(code, message, self.me, session.session)

    async def _reap_attach(self, session: HopSession) -> None:
        with trio.move_on_after(RELAY_GRACE):
            await session.attach_done.wait()
        if not session.attach_done.is_set() and session.attach is not None:
            await reset_quietly(session.attach.stream)

    # -- the gateway's result stream ------------------------------------------------

    async def _serve_attach(self, fs: FrameStream, frame: Frame, upstream_peer: str) -> None:
        sid = frame.header.get("session")
        session = next((s for s in self.sessions.values() if s.session == sid and s.is_last), None)
        if session is None:
            raise _fail("unknown_session", "no such session ends here")
        if upstream_peer != session.gateway or session.attached.is_set():
            raise _fail("forbidden", "only the session's gateway may attach, once")
        session.attach = fs
        session.attached.set()  # before the write: a second attach must find it taken
        offer, link_fields = offer_fields(self.links, frame.header)
        await fs.write({"t": RESULT, "session": session.session, "ok": True, **link_fields})
        # The gateway only listens here (after moving to a link, if it asked for one). It
        # ends the session through the chain (close from upstream, or its first stream
        # ending); here we only notice it leaving.
        try:
            while True:
                got = await fs.read_frame()
                if got.type == CLOSE:
                    break
                if got.type == LINK:
                    await accept_link(self.links, fs, offer, session.session)
                    offer = None
        except (StreamEnded, WireError) as exc:
            log.debug("session %s: the gateway's attach stream ended: %r", session.id, exc)
        finally:
            session.attach_done.set()
            withdraw(self.links, offer)
        session.attach = None
