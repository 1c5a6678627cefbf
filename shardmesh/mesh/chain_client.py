"""The gateway's side of a push chain: open it over a route, feed it tokens, read results.

A :class:`RemoteChain` speaks the same small protocol as the local chain the
generation loop already knows (``open``, ``step``, ``close``). On ``open`` it sends the
whole route to the first hop, which opens the rest hop by hop; then it *attaches* to the
last hop, which will send every sampled token straight back here. Each decode step is
then one frame to the first hop and one frame back from the last: the hidden states
travel hop to hop in between, never through the gateway.

Two tasks read for the chain while it is open: one on the last hop's stream (results
and errors), one on the first hop's stream (errors relayed back along the chain). Both
feed one channel, so a step waits on a single place and sees whichever comes first.
With ``trunks`` (:mod:`.result_trunks`) its steps go into the first hop on a trunk and
its tokens come back on a results trunk, with those of the gateway's other sessions; the
tokens are fed into the same channel. Any failure raises :class:`ChainFailed` naming
the peer at fault (where an error frame can say so, see :func:`~.chain_blame.failure_of`),
which is what the gateway needs to route around it; a request the last hop cannot sample
raises :class:`BadRequest`, which blames no one. :class:`~.mesh_chains.MeshChains` makes
these chains.
"""

from __future__ import annotations

import logging
import time
from array import array
from typing import Any, Awaitable, Callable, Sequence

import trio

from ..contract import BadRequest, ChainFailed, NoRoute, SampledToken
from ..contract.prefixes import prefix_names
from ..placement.prefix_routes import PrefixRoutes
from ..placement.routing import Hop
from .chain_blame import failure_of, first_silent
from .deadlines import HOP_ANSWER, StepTimes, open_wait
from .gateway_ticket import TicketIssuer
from .host import close_quietly, reset_quietly
from .link_offers import Links, request_fields, upgrade_opener
from .prefix_wire import close_payload, reported_cached
from .result_tokens import result_tokens
from .result_trunks import ChainTrunks
from .trunk import Trunk
from .wire import ATTACH, CLOSE, ERROR, OPEN, RESULT, STEP, Frame, FrameStream, StreamEnded, WireError

log = logging.getLogger("shardmesh.mesh.chain_client")

READER_GRACE = 10.0  # seconds the hops get to close their sides after a close
CONFIRM_GRACE = 2.0  # a relayed bad_request waits this long for the last hop's own word

RouteFinder = Callable[..., list[Hop] | None]  # (tokens needed, peers to avoid, prefer=) -> a route, or None
Probe = Callable[[str], Awaitable[bool]]  # peer -> does it answer at all (a libp2p ping)?


def _ignore(_: Any) -> None:
    return None


class RemoteChain:
    """One session over a route of peers; always :meth:`close` it.

    Give it either a fixed ``route`` (a test, the mesh bench) or ``find_route``, which
    picks the route when the chain opens. Either way a :class:`ChainFailed` that names a
    peer, from :meth:`open` or :meth:`step`, is handed to ``on_failure`` before it is
    raised (routing avoids that peer for a while), and ``on_success`` gets the route once
    the chain is open. ``step_times`` is where step times are measured and bounds come
    from (:mod:`.deadlines`); share one between the chains of a gateway.
    """

    def __init__(
        self,
        *,
        nursery: trio.Nursery,
        open_stream: Callable[[str], Any],
        session_id: str,
        model_id: str,
        gateway: str,
        sampling: dict[str, Any],
        prompt_ids: Sequence[int],
        generated: Sequence[int] = (),
        links: Links | None = None,
        route: list[Hop] | None = None,
        find_route: RouteFinder | None = None,
        avoid: frozenset[str] = frozenset(),
        on_failure: Callable[[str], None] = _ignore,
        on_success: Callable[[list[Hop]], None] = _ignore,
        step_times: StepTimes | None = None,
        probe: Probe | None = None,
        issuer: TicketIssuer | None = None,
        trunks: ChainTrunks | None = None,
        prefixes: PrefixRoutes | None = None,
        prefill_steps: Callable[[str], int | None] = lambda peer: None,
    ) -> None:
        if (route is None) == (find_route is None):
            raise ValueError("a RemoteChain takes either a route or find_route")
        if issuer is not None and issuer.peer != gateway:
            raise ValueError("the ticket issuer must be the gateway")
        self.nursery = nursery
        self.links = links
        self.open_stream = open_stream
        self.route = route  # picked by find_route on open when not given
        self.find_route = find_route
        self.avoid = avoid  # peers this request saw fail: find_route skips them
        self.on_failure = on_failure
        self.on_success = on_success
        self.session_id = session_id
        self.model_id = model_id
        self.gateway = gateway
        self.issuer = issuer  # signs each open's ticket; hops refuse an open without one
        self.sampling = sampling
        self.history = (list(prompt_ids), list(generated))  # generated: a replay after failover
        self.opened_with = [*prompt_ids, *generated]  # the open's whole history, as the hops get it
        self.step_times = step_times if step_times is not None else StepTimes()
        self.probe = probe
        self._unanswered = 0  # tokens sent since the last token came back
        self._last_sent = 0.0  # when we last sent a frame on the chain (trio time)
        self._sent_at = 0.0  # when the first of them was sent (trio time)
        self.trunks = trunks
        self.prefixes = prefixes  # None: the hops compute every history from its start (no cache)
        self.prefill_steps = prefill_steps  # peer -> the prefill step it published (limits.prefill_step)
        self._trunk: Trunk | None = None  # the steps go on it, not on the first hop's stream
        self._first: FrameStream | None = None
        self._last: FrameStream | None = None
        self._events_in, self._events = trio.open_memory_channel[Frame | Exception](64)
        self._readers_running = 0
        self._readers_done = trio.Event()
        self._closed = False

    @property
    def parallel_stages(self) -> int:
        """The route's hops: each computes its own chunk of a prefill at the same time."""
        return len(self.route) if self.route else 1

    @property
    def prefill_step(self) -> int | None:
        return min((step for hop in self.route or () if (step := self.prefill_steps(hop.peer))), default=None)

    @property
    def _route(self) -> list[Hop]:
        assert self.route is not None, "open the chain first"
        return self.route

    def _report(self, exc: ChainFailed) -> None:
        if exc.peer is not None:
            self.on_failure(exc.peer)

    async def open(self, max_length: int) -> int:
        """Open over the route (picked now, unless fixed; one that holds the history's
        prefix is preferred, :mod:`~shardmesh.placement.prefix_routes`). Returns how
        many of the history's tokens every hop holds already (docs/PROTOCOL.md 6.8).
        A failure that names a peer is reported, the chain closed and the failure
        raised: the caller decides whether to try again. :class:`NoRoute` when no route
        serves ``max_length`` tokens."""
        if self.find_route is not None:
            held = self.prefixes.held(prefix_names(self.opened_with)) if self.prefixes is not None else None
            route = self.find_route(max_length, self.avoid, **({"prefer": held} if held is not None else {}))
            if route is None:
                raise NoRoute(f"no complete chain of online peers serves {self.model_id}")
            self.route = route
        route = self._route
        log.debug("session %s via %s", self.session_id, " -> ".join(f"{h.peer[-6:]}[{h.start},{h.end})" for h in route))
        try:
            cached = await self._open_route(route, max_length)
        except ChainFailed as exc:
            log.info("opening a chain failed (%s); routing around %s", exc, exc.peer)
            await self.close()
            self._report(exc)
            raise
        self.on_success(route)
        return cached

    async def _open_route(self, route: list[Hop], max_length: int) -> int:
        first, last = route[0].peer, route[-1].peer
        self._first = await self._connect(first)
        trunk = await self.trunks.steps.to(first) if self.trunks is not None and first != self.gateway else None
        header = {
            "t": OPEN,
            "session": self.session_id,
            "model": self.model_id,
            "gateway": self.gateway,
            "route": [{"peer": h.peer, "start": h.start, "end": h.end} for h in route],
            "max_length": max_length,
            "sampling": self.sampling,
            "n_prompt": len(self.history[0]),
            **({"trunk": True} if trunk is not None else request_fields(self.links, self._first, first)),
            **({"cache": True} if self.prefixes is not None else {}),
        }
        if self.issuer is not None:
            header = self.issuer.sign_open(header, time.time())
        await self._write(self._first, first, header, array("q", self.opened_with).tobytes())
        ok = await self._expect_ok(self._first, first, "open", open_wait(len(route)))
        if ok.get("trunk") is True:
            self._trunk = trunk
        self._last = await self._connect(last)
        results = self.trunks.results if self.trunks is not None and last != self.gateway else None
        if results is not None and await results.to(last):
            results.expect(self.session_id, last, self)  # before the attach: a token may follow its ok at once
            wish = {"trunk": True}
        else:
            wish = request_fields(self.links, self._last, last)
        await self._write(self._last, last, {"t": ATTACH, "session": self.session_id, **wish})
        if (await self._expect_ok(self._last, last, "attach", HOP_ANSWER)).get("trunk") is not True and results is not None:
            results.forget(self.session_id)
        self._readers_running = 2
        self.nursery.start_soon(self._read_into_events, self._last, last)
        self.nursery.start_soon(self._read_into_events, self._first, first)
        # The last token's logits are always computed, so at most all but it is held.
        return reported_cached(ok, len(self.opened_with) - 1) if self.prefixes is not None else 0

    async def _connect(self, peer: str) -> FrameStream:
        try:
            return FrameStream(await self.open_stream(peer))
        except Exception as exc:
            raise ChainFailed(peer, "peer_unreachable", str(exc)) from exc

    async def _expect_ok(self, fs: FrameStream, peer: str, what: str, timeout: float) -> dict[str, Any]:
        """Reads the answer to ``what`` (within ``timeout`` s), and returns its header;
        then moves ``fs`` to a hop link if one is offered (not if it took a trunk)."""
        try:
            reply = await fs.read_frame(idle_timeout=timeout)
        except (StreamEnded, WireError) as exc:
            raise ChainFailed(peer, "peer_lost", f"no answer to {what}: {exc}") from exc
        if reply.type == ERROR:
            raise failure_of(reply, peer, self._route, attach=fs is self._last)
        if reply.type != RESULT or reply.header.get("ok") is not True:
            raise ChainFailed(peer, "bad_frame", f"{what} answered with {reply.type}")
        if reply.header.get("trunk") is True:
            return reply.header
        try:
            await upgrade_opener(self.links, fs, reply.header, peer, self.session_id)
        except WireError as exc:
            raise ChainFailed(peer, "peer_lost", f"moving to a link after {what}: {exc.message}") from exc
        return reply.header

    def deliver(self, frame: Frame | Exception) -> None:
        """A token for this session from its last hop's results trunk (result_trunks.py),
        or the failure that stands for one."""
        if not self._closed:
            try:
                self._events_in.send_nowait(frame)
            except trio.WouldBlock:
                log.warning("session %s: its last hop sends results nobody asked for", self.session_id)

    def lost(self, peer: str) -> None:
        """The results trunk from the last hop ``peer`` ended (result_trunks.py)."""
        self.deliver(ChainFailed(peer, "peer_lost", "the last hop's results trunk ended"))

    async def _write(self, fs: FrameStream, peer: str, header: dict[str, Any], payload: bytes = b"") -> None:
        self._last_sent = trio.current_time()
        try:
            await fs.write(header, payload)
        except WireError as exc:
            raise ChainFailed(peer, "peer_lost", exc.message) from exc

    async def _write_trunk(self, trunk: Trunk, header: dict[str, Any], payload: bytes) -> None:
        """The step into the first hop on the trunk, with the steps other sessions send
        it now; returns once its frame is out."""
        self._last_sent = trio.current_time()
        try:
            await trunk.written(trunk.add_soon(self._route[0].start, header, payload))
        except WireError as exc:
            raise ChainFailed(trunk.peer, "peer_lost", exc.message) from exc

    async def _read_into_events(self, fs: FrameStream, peer: str) -> None:
        """Never cancelled (see hop_server): it ends when the stream ends, which
        :meth:`close` brings about."""
        try:
            while True:
                try:
                    frame = await fs.read_frame()
                except (StreamEnded, WireError) as exc:
                    if not self._closed:
                        which = "last" if fs is self._last else "first"
                        log.debug("session %s: the %s hop's stream ended: %r", self.session_id, which, exc)
                        self._events_in.send_nowait(ChainFailed(peer, "peer_lost", f"the {which} hop's stream ended: {exc!r}"))
                    return
                if frame.type == ERROR:
                    idle_for = trio.current_time() - self._last_sent
                    failure = failure_of(frame, peer, self._route, attach=fs is self._last, idle_for=idle_for)
                    if isinstance(failure, ChainFailed) and failure.code == BadRequest.code:
                        # Unconfirmed: give the last hop's own bad_request the time to
                        # arrive first on its attach stream, so the client gets its 400.
                        await trio.sleep(CONFIRM_GRACE)
                    if not self._closed:
                        self._events_in.send_nowait(failure)
                    return
                if not self._closed:
                    self._events_in.send_nowait(frame)
        except trio.WouldBlock:
            log.warning("session %s: %s sends frames nobody asked for", self.session_id, peer)
        finally:
            self._readers_running -= 1
            if self._readers_running == 0:
                self._readers_done.set()

    async def step(self, token_ids: list[int], position: int, want_token: bool) -> SampledToken | None:
        """Send ``token_ids`` at ``position`` into the chain; wait for the token if asked."""
        tokens = await self._checked_step(token_ids, position, want_token, [])
        return tokens[0] if tokens else None

    async def verify(self, token_ids: list[int], position: int, draft: int) -> list[SampledToken]:
        """A step whose last ``draft`` ids are proposals: the tokens the last hop drew
        from the first proposal's position on (the accepted ones, then its own)."""
        return await self._checked_step(token_ids, position, True, token_ids[len(token_ids) - draft :] if draft else [])

    async def _checked_step(self, token_ids: list[int], position: int, want_token: bool, drafts: list[int]) -> list[SampledToken]:
        assert self._first is not None and not self._closed, "open the chain first"
        try:
            return await self._step(token_ids, position, want_token, drafts)
        except ChainFailed as exc:
            self._report(exc)
            raise

    async def _step(self, token_ids: list[int], position: int, want_token: bool, drafts: list[int]) -> list[SampledToken]:
        assert self._first is not None
        self._raise_pending()
        payload = array("q", token_ids).tobytes()
        header = {"t": STEP, "session": self.session_id, "position": position, "want": want_token,
                  "dtype": "int64", "shape": [len(token_ids)], **({"draft": drafts} if drafts else {})}
        if self._unanswered == 0:
            self._sent_at = trio.current_time()
        if self._trunk is not None:
            await self._write_trunk(self._trunk, header, payload)
        else:
            await self._write(self._first, self._route[0].peer, header, payload)
        # Drafts ride along as extra positions of the same pass: time-wise the step is
        # its other tokens' (a decode step's, usually), and is bounded and measured so.
        self._unanswered += len(token_ids) - len(drafts)
        if not want_token:
            return []
        wait = self.step_times.deadline(self._unanswered)
        event = await self._receive_by(self._sent_at + self.step_times.probe_after(self._unanswered))
        if event is None and (silent := await self._silent_hop()) is not None:
            raise ChainFailed(silent, "timeout", f"no token yet; {silent} does not answer")
        if event is None:
            event = await self._receive_by(self._sent_at + wait)
        if event is None:
            silent = await self._silent_hop()
            blamed = silent or self._route[-1].peer  # all answer: the last hop owed the token
            why = f"no token within {wait:.0f} s" + (f"; {silent} does not answer" if silent else "")
            raise ChainFailed(blamed, "timeout", why)
        tokens = self._tokens(event, position, drafts)
        self.step_times.record(self._unanswered, trio.current_time() - self._sent_at)
        self._unanswered = 0
        return tokens

    async def _receive_by(self, when: float) -> Frame | Exception | None:
        """The next event, or None if none came by ``when`` (trio time)."""
        with trio.move_on_after(max(0.0, when - trio.current_time())):
            return await self._events.receive()
        return None

    async def _silent_hop(self) -> str | None:
        return await first_silent([hop.peer for hop in self._route], self.probe) if self.probe is not None else None

    def _raise_pending(self) -> None:
        """A failure reported while we were not waiting (e.g. during a prefill chunk)."""
        try:
            event = self._events.receive_nowait()
        except trio.WouldBlock:
            return
        self._tokens(event, None, [])
        raise ChainFailed(self._route[-1].peer, "bad_frame", "a result arrived that nobody asked for")

    def _tokens(self, event: Frame | Exception, position: int | None, drafts: list[int]) -> list[SampledToken]:
        if isinstance(event, Exception):  # error frames arrive as their exception (failure_of)
            raise event
        return result_tokens(event, self._route[-1].peer, position, drafts)

    async def close(self, fed: Sequence[int] = ()) -> None:
        """Tell the chain to end and close our streams; never raises. The hops close
        their sides in turn, which ends our readers; one that lingers is reset.
        ``fed``: every token the chain was fed; with a cache its hops keep their keys
        and values of them, and we remember that they do."""
        if self._closed:
            return
        self._closed = True
        if self.trunks is not None:
            self.trunks.results.forget(self.session_id)
        if self._first is not None:
            if self.prefixes is not None and self.route is not None:
                self.prefixes.remember(prefix_names(fed or self.opened_with), self.route)
            try:
                await self._first.write({"t": CLOSE, "session": self.session_id},
                                        close_payload(len(self.opened_with), fed) if self.prefixes is not None else b"")  # fmt: skip
            except WireError:
                pass
        streams = [fs.stream for fs in (self._first, self._last) if fs is not None]
        for stream in streams:
            await close_quietly(stream)
        if self._readers_running:
            self.nursery.start_soon(self._reap, streams)

    async def _reap(self, streams: list) -> None:
        with trio.move_on_after(READER_GRACE):
            await self._readers_done.wait()
        if not self._readers_done.is_set():
            for stream in streams:
                await reset_quietly(stream)
