"""The gateway's chain client (``shardmesh.mesh.chain_client``) against scripted hops.

The hops here are not shardmesh nodes: each is a short script in this file that reads
and writes real frames (:class:`FrameStream`) as docs/PROTOCOL.md section 6 describes,
honestly or not. ``open_stream`` hands the chain one end of an in-process pipe (the
same stream a node uses to reach itself) and runs the peer's script on the other, so a
test decides exactly which bytes the chain sees and when. Most tests run on trio's mock
clock with autojump: the client's timeouts pass instantly, and a chain that would hang
fails with ``timeout`` instead. The last test runs one script on a real libp2p host
over TCP on 127.0.0.1, where a peer that dies mid-frame looks like a clean close.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import pytest
import trio
import trio.testing

from shardmesh.contract import BadRequest, CacheBudgetExceeded, ChainFailed, NoRoute, SampledToken, SamplingParams
from shardmesh.mesh.chain_client import READER_GRACE, RemoteChain
from shardmesh.mesh.mesh_chains import MeshChains
from shardmesh.mesh.deadlines import HOP_REACH, PROBE_FLOOR, STEP_CAP, STEP_FLOOR, open_wait
from shardmesh.mesh.pipe import pipe_pair
from shardmesh.mesh.reclaim import RECLAIM_IDLE, RECLAIMED
from shardmesh.mesh.wire import Frame, FrameStream, StreamEnded, WireError, encode_frame
from shardmesh.placement.routing import Hop

A, B, OUTSIDER = "peer-a", "peer-b", "peer-outsider"
ROUTE = [Hop(A, 0, 2), Hop(B, 2, 4)]
PROMPT = [1, 17, 42]
MODEL = "tiny@test"
GATEWAY = "peer-gateway"

Script = Callable[[FrameStream], Awaitable[None]]


@dataclass
class Peers:
    """The test's ``open_stream``: a stream to ``peer`` runs ``scripts[peer]`` on its far
    end (a peer without a script cannot be reached). A script's end of the stream is
    closed when it returns, as a hop closes its streams when its session ends."""

    nursery: trio.Nursery
    scripts: dict[str, Script]
    opened: list[str] = field(default_factory=list)
    ends: dict[str, list] = field(default_factory=dict)

    async def open_stream(self, peer: str):
        self.opened.append(peer)
        if peer not in self.scripts:
            raise ConnectionRefusedError(f"{peer} does not answer")
        mine, theirs = pipe_pair()
        self.ends.setdefault(peer, []).append(theirs)
        self.nursery.start_soon(self._serve, self.scripts[peer], theirs)
        return mine

    async def _serve(self, script: Script, stream) -> None:
        try:
            await script(FrameStream(stream))
        except (StreamEnded, WireError, EOFError):
            pass  # the gateway went away first: what a hop sees then is not under test
        finally:
            await stream.close()


@dataclass
class Reports:
    """What the chain told the routing policy."""

    failed: list[str] = field(default_factory=list)
    served: list[list[Hop]] = field(default_factory=list)
    asked: list[int] = field(default_factory=list)


def mesh_chains(peers: Peers, reports: Reports, route: list[Hop] | None = ROUTE, probe: Any = None) -> MeshChains:
    def find_route(tokens_needed: int, avoid: frozenset[str] = frozenset()) -> list[Hop] | None:
        reports.asked.append(tokens_needed)
        return route

    return MeshChains(
        nursery=peers.nursery,
        open_stream=peers.open_stream,
        find_route=find_route,
        model_id=MODEL,
        gateway=GATEWAY,
        on_failure=reports.failed.append,
        on_success=reports.served.append,
        probe=probe,
    )


def run(main: Callable[[trio.Nursery], Awaitable[None]]) -> None:
    """``main(nursery)`` on the autojump clock; the chain's reader tasks live in ``nursery``."""

    async def bounded() -> None:
        with trio.fail_after(10 * STEP_CAP):
            async with trio.open_nursery() as nursery:
                await main(nursery)
                nursery.cancel_scope.cancel()

    trio.run(bounded, clock=trio.testing.MockClock(autojump_threshold=0))


async def read(fs: FrameStream, t: str) -> Frame:
    frame = await fs.read_frame()
    assert frame.type == t, frame.header
    return frame


async def ok(fs: FrameStream, t: str) -> Frame:
    """Read the ``open`` or ``attach`` and accept it."""
    frame = await read(fs, t)
    await fs.write({"t": "result", "session": frame.header["session"], "ok": True})
    return frame


def result(position: int, token: int = 7, **extra: Any) -> dict[str, Any]:
    return {"t": "result", "session": "s", "position": position, "token": token, **extra}


async def answer_steps(fs: FrameStream, answers: trio.MemoryReceiveChannel, frames: list[Frame] | None = None) -> None:
    """A last hop's attach stream: ok, then for each step the first hop passes on, the
    header ``answer(step)`` makes (None: say nothing)."""
    await ok(fs, "attach")
    async for step, answer in answers:
        header = answer(step)
        if header is not None:
            await fs.write(header)


def two_hops(answer: Callable[[Frame], dict | None] = lambda step: result(step.header["position"])):
    """Scripts for A (first hop: takes the open and the steps) and B (last hop: answers
    every step that wants a token with ``answer(step)``); the frames A read."""
    seen: list[Frame] = []
    send, receive = trio.open_memory_channel[tuple[Frame, Callable]](100)

    async def first(fs: FrameStream) -> None:
        seen.append(await ok(fs, "open"))
        while True:
            frame = await fs.read_frame()
            seen.append(frame)
            if frame.type == "close":
                return
            if frame.header["want"]:
                await send.send((frame, answer))

    async def last(fs: FrameStream) -> None:
        await answer_steps(fs, receive)

    return {A: first, B: last}, seen


async def opened(peers: Peers, reports: Reports, **chain: Any) -> RemoteChain:
    c = mesh_chains(peers, reports).chain("s", SamplingParams(temperature=0.0), PROMPT, chain.get("generated", []))
    await c.open(64)
    return c


# -- the protocol, spoken right ---------------------------------------------------------------


def test_a_chain_opens_steps_and_closes_as_the_protocol_says() -> None:
    answers = {0: result(0, 7, logprob=-0.5, top=[[7, -0.5], [8, -1.25]], spent=0.125), 5: result(5, 9)}
    scripts, seen = two_hops(lambda step: answers[step.header["position"]])

    async def main(nursery: trio.Nursery) -> None:
        peers, reports = Peers(nursery, scripts), Reports()
        chain = mesh_chains(peers, reports).chain("s", SamplingParams(temperature=0.0, seed=3), PROMPT, [5])
        assert reports.asked == [] and peers.opened == []  # nothing happens before open
        await chain.open(64)
        assert reports.asked == [64] and peers.opened == [A, B] and reports.served == [ROUTE]
        token = await chain.step(PROMPT + [5], 0, True)
        assert token == SampledToken(7, -0.5, ((7, -0.5), (8, -1.25)), 0.125)
        assert await chain.step([7], 4, False) is None  # a step that wants no token waits for none
        assert await chain.step([3], 5, True) == SampledToken(9, None, (), None)
        await chain.close()
        await chain.close()  # twice is fine
        with trio.fail_after(1):
            while len(seen) < 5:
                await trio.sleep(0.01)
        assert reports.failed == []

        open_frame, steps, close = seen[0], seen[1:4], seen[4]
        assert open_frame.header == {
            "t": "open", "session": "s", "model": MODEL, "gateway": GATEWAY,
            "route": [{"peer": A, "start": 0, "end": 2}, {"peer": B, "start": 2, "end": 4}],
            "max_length": 64, "sampling": SamplingParams(temperature=0.0, seed=3).to_dict(),
            "n_prompt": len(PROMPT), "nbytes": 8 * 4,
        }
        assert open_frame.payload == struct.pack("<4q", *PROMPT, 5)  # prompt, then the tokens drawn before
        assert [(s.header["position"], s.header["want"], s.header["shape"], s.header["dtype"]) for s in steps] == [
            (0, True, [4], "int64"), (4, False, [1], "int64"), (5, True, [1], "int64")]
        assert steps[0].payload == struct.pack("<4q", *PROMPT, 5)
        assert close.header == {"t": "close", "session": "s"}

    run(main)


def test_the_last_hop_gets_an_attach_for_the_session() -> None:
    got: list[Frame] = []

    async def first(fs: FrameStream) -> None:
        await ok(fs, "open")
        await fs.read_frame()  # the close

    async def last(fs: FrameStream) -> None:
        got.append(await ok(fs, "attach"))

    async def main(nursery: trio.Nursery) -> None:
        chain = await opened(Peers(nursery, {A: first, B: last}), Reports())
        await chain.close()

    run(main)
    assert got[0].header == {"t": "attach", "session": "s"}


def test_a_one_hop_route_opens_and_attaches_on_two_streams_to_the_same_peer() -> None:
    kinds: list[str] = []

    async def hop(fs: FrameStream) -> None:
        frame = await fs.read_frame()
        kinds.append(frame.type)
        await fs.write({"t": "result", "session": "s", "ok": True})
        await fs.read_frame()

    async def main(nursery: trio.Nursery) -> None:
        peers = Peers(nursery, {A: hop})
        chain = RemoteChain(nursery=nursery, open_stream=peers.open_stream, route=[Hop(A, 0, 4)], session_id="s",
                            model_id=MODEL, gateway=GATEWAY, sampling={}, prompt_ids=PROMPT)
        await chain.open(64)
        assert peers.opened == [A, A] and kinds == ["open", "attach"]
        await chain.close()

    run(main)


def test_a_remote_chain_takes_a_route_or_a_route_finder_not_both() -> None:
    common = dict(open_stream=None, session_id="s", model_id=MODEL, gateway=GATEWAY, sampling={}, prompt_ids=PROMPT)

    async def main(nursery: trio.Nursery) -> None:
        with pytest.raises(ValueError):
            RemoteChain(nursery=nursery, **common)
        with pytest.raises(ValueError):
            RemoteChain(nursery=nursery, route=ROUTE, find_route=lambda n: ROUTE, **common)

    run(main)


# -- no route, unreachable peers, bad answers to open -------------------------------------------


def test_no_route_raises_no_route_and_opens_nothing() -> None:
    async def main(nursery: trio.Nursery) -> None:
        peers, reports = Peers(nursery, {}), Reports()
        chains = mesh_chains(peers, reports, route=None)
        assert not chains.available() and reports.asked == [0]
        chain = chains.chain("s", SamplingParams(), PROMPT, [])
        with pytest.raises(NoRoute):
            await chain.open(64)
        await chain.close()
        assert peers.opened == [] and reports.failed == [] and reports.served == []
        assert reports.asked == [0, 64]

    run(main)


def test_an_unreachable_hop_is_reported_and_the_open_part_closed() -> None:
    events: list[str] = []

    async def first(fs: FrameStream) -> None:
        await ok(fs, "open")
        events.append((await fs.read_frame()).type)
        with pytest.raises(StreamEnded):
            await fs.read_frame()
        events.append("end")

    async def main(nursery: trio.Nursery) -> None:
        peers, reports = Peers(nursery, {A: first}), Reports()
        with pytest.raises(ChainFailed) as info:
            await opened(peers, reports)
        assert (info.value.peer, info.value.code) == (B, "peer_unreachable")
        assert reports.failed == [B] and reports.served == []
        await trio.testing.wait_all_tasks_blocked()
        assert events == ["close", "end"]  # the chain closed itself

    run(main)


@pytest.mark.parametrize(
    "reply",
    [{"t": "result", "session": "s"}, {"t": "result", "session": "s", "ok": False}, {"t": "result", "session": "s", "ok": 1},
     {"t": "step", "session": "s"}, {"t": "close", "session": "s"}],
    ids=["no-ok", "ok-false", "ok-1", "step", "close"],
)
def test_an_open_answered_with_anything_but_ok_is_bad_frame(reply: dict) -> None:
    async def first(fs: FrameStream) -> None:
        await read(fs, "open")
        await fs.write(reply)
        await fs.read_frame()

    async def main(nursery: trio.Nursery) -> None:
        reports = Reports()
        with pytest.raises(ChainFailed) as info:
            await opened(Peers(nursery, {A: first}), reports)
        assert (info.value.peer, info.value.code) == (A, "bad_frame") and reports.failed == [A]

    run(main)


@pytest.mark.parametrize("cut", [0, 3, 6, -1], ids=["nothing", "in-the-length", "in-the-header", "last-byte"])
def test_a_hop_that_stops_inside_its_answer_to_open_is_lost(cut: int) -> None:
    ok_frame = encode_frame({"t": "result", "session": "s", "ok": True})

    async def first(fs: FrameStream) -> None:
        await read(fs, "open")
        await fs.stream.write(ok_frame[:cut])  # then the script returns: end of stream

    async def main(nursery: trio.Nursery) -> None:
        reports = Reports()
        with pytest.raises(ChainFailed) as info:
            await opened(Peers(nursery, {A: first}), reports)
        assert (info.value.peer, info.value.code) == (A, "peer_lost") and reports.failed == [A]

    run(main)


def test_a_hop_that_never_answers_open_times_out() -> None:
    async def first(fs: FrameStream) -> None:
        await read(fs, "open")
        await trio.sleep_forever()

    async def main(nursery: trio.Nursery) -> None:
        began = trio.current_time()
        with pytest.raises(ChainFailed) as info:
            await opened(Peers(nursery, {A: first}), Reports())
        assert (info.value.peer, info.value.code) == (A, "peer_lost")
        assert trio.current_time() - began == pytest.approx(open_wait(len(ROUTE)))

    run(main)


def test_cache_full_is_not_held_against_the_peer() -> None:
    async def first(fs: FrameStream) -> None:
        await read(fs, "open")
        await fs.write({"t": "error", "code": "cache_full", "message": "no room for 64 tokens", "peer": A})

    async def main(nursery: trio.Nursery) -> None:
        reports = Reports()
        with pytest.raises(CacheBudgetExceeded):
            await opened(Peers(nursery, {A: first}), reports)
        assert reports.failed == [] and reports.served == []

    run(main)


@pytest.mark.parametrize("idle, blamed", [(RECLAIM_IDLE + 1, None), (RECLAIM_IDLE - 1, B)], ids=["idle", "busy"])
def test_a_reclaimed_session_is_blamed_on_nobody_only_if_it_was_idle(idle: float, blamed: str | None) -> None:
    """A hop may end a session idle for RECLAIM_IDLE to make room (reclaim.py); a hop
    that says so of a session the gateway used just now is blamed like any failure."""
    send, receive = trio.open_memory_channel[None](1)

    async def last(fs: FrameStream) -> None:
        await ok(fs, "attach")
        await receive.receive()
        await fs.write(error(RECLAIMED, B))

    async def main(nursery: trio.Nursery) -> None:
        scripts, _ = two_hops()
        reports = Reports()
        chain = await opened(Peers(nursery, {**scripts, B: last}), reports)
        await chain.step(PROMPT, 0, False)
        await trio.sleep(idle)
        await send.send(None)
        await trio.sleep(0.1)
        with pytest.raises(ChainFailed) as info:
            await chain.step([1], 3, True)
        assert (info.value.peer, info.value.code) == (blamed, RECLAIMED)
        assert reports.failed == ([] if blamed is None else [B])
        await chain.close()

    run(main)


# -- error frames blame only peers on the route --------------------------------------------------


BLAME = [(B, B), (A, A), (OUTSIDER, None), (None, None), ([B], None), ({"peer": B}, None), (7, None)]
BLAME_IDS = ["on-route", "self", "outsider", "absent", "list", "map", "int"]


def error(code: str, peer: Any) -> dict[str, Any]:
    header = {"t": "error", "session": "s", "code": code, "message": f"{code} happened"}
    return header if peer is None else {**header, "peer": peer}


@pytest.mark.parametrize("named, blamed", BLAME, ids=BLAME_IDS)
def test_an_error_answering_open_blames_a_peer_on_the_route_or_the_sender(named: Any, blamed: str | None) -> None:
    async def first(fs: FrameStream) -> None:
        await read(fs, "open")
        await fs.write(error("peer_unreachable", named))

    async def main(nursery: trio.Nursery) -> None:
        reports = Reports()
        with pytest.raises(ChainFailed) as info:
            await opened(Peers(nursery, {A: first}), reports)
        assert (info.value.peer, info.value.code, info.value.message) == (blamed or A, "peer_unreachable", "peer_unreachable happened")
        assert reports.failed == [blamed or A] and reports.served == []

    run(main)


@pytest.mark.parametrize("named, blamed", BLAME, ids=BLAME_IDS)
def test_an_error_answering_attach_blames_the_last_hop_whoever_it_names(named: Any, blamed: str | None) -> None:
    """On its attach stream the last hop speaks only for itself: naming the hop before
    it (or anyone) does not move the blame off it (issue 17, item 4)."""

    async def last(fs: FrameStream) -> None:
        await read(fs, "attach")
        await fs.write(error("forbidden", named))

    async def main(nursery: trio.Nursery) -> None:
        scripts, _ = two_hops()
        reports = Reports()
        with pytest.raises(ChainFailed) as info:
            await opened(Peers(nursery, {**scripts, B: last}), reports)
        assert (info.value.peer, info.value.code) == (B, "forbidden")
        assert reports.failed == [B]

    run(main)


@pytest.mark.parametrize("named, blamed", BLAME, ids=BLAME_IDS)
@pytest.mark.parametrize("sender", [A, B], ids=["relayed-by-the-first-hop", "from-the-last-hop"])
def test_an_error_during_a_step_blames_a_peer_on_the_route(sender: str, named: Any, blamed: str | None) -> None:
    """Errors travel back on both streams (the first hop relays those of later hops).
    On the first hop's stream a peer off the route is never believed: the first hop
    sent that frame, so it is blamed. On the last hop's attach stream the last hop is
    blamed whoever it names (issue 17, item 4)."""

    async def first(fs: FrameStream) -> None:
        await ok(fs, "open")
        await read(fs, "step")
        if sender == A:
            await fs.write(error("stage_error", named))
        await trio.sleep_forever()

    async def last(fs: FrameStream) -> None:
        await ok(fs, "attach")
        if sender == B:
            await trio.sleep(1)  # after the step was sent
            await fs.write(error("stage_error", named))
        await trio.sleep_forever()

    async def main(nursery: trio.Nursery) -> None:
        reports = Reports()
        chain = await opened(Peers(nursery, {A: first, B: last}), reports)
        with pytest.raises(ChainFailed) as info:
            await chain.step(PROMPT, 0, True)
        expected = (blamed or A) if sender == A else B
        assert (info.value.peer, info.value.code) == (expected, "stage_error")
        assert reports.failed == [expected] and reports.served == [ROUTE]
        await chain.close()

    run(main)


@pytest.mark.parametrize("confirmed", [True, False], ids=["confirmed-by-the-last-hop", "relayed-only"])
def test_bad_request_is_the_request_s_fault_only_on_the_last_hop_s_word(confirmed: bool) -> None:
    """``bad_request`` (the last hop cannot sample these parameters) is no peer's fault:
    straight from the last hop it is :class:`BadRequest` (an HTTP 400) and nobody is
    reported. Relayed on the first hop's stream alone it may be a middle hop's forgery
    to fail unblamed: it blames nobody either, but is not taken for a 400."""

    async def first(fs: FrameStream) -> None:
        await ok(fs, "open")
        await read(fs, "step")
        await fs.write(error("bad_request", B))  # relayed first: the gateway must wait for B
        await trio.sleep_forever()

    async def last(fs: FrameStream) -> None:
        await ok(fs, "attach")
        if confirmed:
            await trio.sleep(1)
            await fs.write(error("bad_request", B))
        await trio.sleep_forever()

    async def main(nursery: trio.Nursery) -> None:
        reports = Reports()
        chain = await opened(Peers(nursery, {A: first, B: last}), reports)
        with pytest.raises((BadRequest, ChainFailed)) as info:
            await chain.step(PROMPT, 0, True)
        if confirmed:
            assert isinstance(info.value, BadRequest) and info.value.message == "bad_request happened"
        else:
            assert isinstance(info.value, ChainFailed) and info.value.peer is None
        assert reports.failed == []
        await chain.close()

    run(main)


def test_bad_request_from_a_one_hop_route_is_a_bad_request_on_either_stream() -> None:
    async def only(fs: FrameStream) -> None:
        frame = await fs.read_frame()
        await fs.write({"t": "result", "session": frame.header["session"], "ok": True})
        if frame.type == "open":
            await read(fs, "step")
            await fs.write(error("bad_request", None))
        await trio.sleep_forever()

    async def main(nursery: trio.Nursery) -> None:
        reports = Reports()
        c = mesh_chains(Peers(nursery, {A: only}), reports, route=[Hop(A, 0, 4)]).chain("s", SamplingParams(), PROMPT, [])
        await c.open(64)
        with pytest.raises(BadRequest):
            await c.step(PROMPT, 0, True)
        assert reports.failed == []
        await c.close()

    run(main)


def test_non_finite_input_named_by_the_last_hop_blames_neither_hop() -> None:
    """The last hop says the hop before it sent NaN: one of the two is lying (or broken)
    and the gateway cannot tell which, so neither is excluded. Any other peer it names on
    its attach stream, with any code, is blamed on itself (see the test above)."""

    async def first(fs: FrameStream) -> None:
        await ok(fs, "open")
        await read(fs, "step")
        await trio.sleep_forever()

    async def last(fs: FrameStream) -> None:
        await ok(fs, "attach")
        await trio.sleep(1)
        await fs.write(error("non_finite", A))
        await trio.sleep_forever()

    async def main(nursery: trio.Nursery) -> None:
        reports = Reports()
        chain = await opened(Peers(nursery, {A: first, B: last}), reports)
        with pytest.raises(ChainFailed) as info:
            await chain.step(PROMPT, 0, True)
        assert (info.value.peer, info.value.code) == (None, "non_finite") and reports.failed == []
        await chain.close()

    run(main)


def test_an_error_during_a_prefill_chunk_is_raised_by_the_next_step() -> None:
    """Steps that want no token do not wait for an answer: an error that came in
    meanwhile is raised by the following step, before it sends anything."""
    steps: list[int] = []

    async def first(fs: FrameStream) -> None:
        await ok(fs, "open")
        steps.append((await read(fs, "step")).header["position"])
        await fs.write(error("stage_error", B))
        while True:
            steps.append((await fs.read_frame()).header.get("position", -1))

    async def main(nursery: trio.Nursery) -> None:
        reports = Reports()
        scripts, _ = two_hops()
        chain = await opened(Peers(nursery, {**scripts, A: first}), reports)
        await chain.step(PROMPT[:2], 0, False)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(ChainFailed) as info:
            await chain.step(PROMPT[2:], 2, True)
        assert (info.value.peer, info.value.code) == (B, "stage_error") and reports.failed == [B]
        await chain.close()
        await trio.testing.wait_all_tasks_blocked()
        assert steps == [0, -1]  # the second step never left: then only the close

    run(main)


# -- results that are not the token asked for ------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        lambda pos: result(pos + 1),  # the wrong position
        lambda pos: result(pos - 1),
        lambda pos: {**result(pos), "position": None},
        lambda pos: {k: v for k, v in result(pos).items() if k != "token"},
        lambda pos: result(pos, token="7"),
        lambda pos: result(pos, token=-1),
        lambda pos: result(pos, token=True),
        lambda pos: result(pos, token=7.0),
        lambda pos: {"t": "result", "session": "s", "ok": True},
        lambda pos: result(pos, top=[["x", -1.0]]),
        lambda pos: result(pos, top=[[7]]),
        lambda pos: result(pos, top=5),
        lambda pos: result(pos, logprob="high"),
        lambda pos: {**result(pos), "t": "step"},
        lambda pos: {**result(pos), "t": "open"},
    ],
    ids=["position+1", "position-1", "position-null", "no-token", "token-text", "token-negative", "token-bool",
         "token-float", "ok-not-token", "top-text", "top-short", "top-int", "logprob-text", "step", "open"],
)
def test_a_result_that_is_not_the_token_asked_for_is_bad_frame(answer: Callable[[int], dict]) -> None:
    async def main(nursery: trio.Nursery) -> None:
        scripts, _ = two_hops(lambda step: answer(step.header["position"]))
        reports = Reports()
        chain = await opened(Peers(nursery, scripts), reports)
        with pytest.raises(ChainFailed) as info:
            await chain.step(PROMPT, 3, True)
        assert (info.value.peer, info.value.code) == (B, "bad_frame") and reports.failed == [B]
        await chain.close()

    run(main)


def test_a_result_nobody_asked_for_is_bad_frame() -> None:
    async def last(fs: FrameStream) -> None:
        await ok(fs, "attach")
        await fs.write(result(0))  # before any step
        await trio.sleep_forever()

    async def main(nursery: trio.Nursery) -> None:
        scripts, seen = two_hops()
        reports = Reports()
        chain = await opened(Peers(nursery, {**scripts, B: last}), reports)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(ChainFailed) as info:
            await chain.step(PROMPT, 0, False)
        assert (info.value.peer, info.value.code) == (B, "bad_frame") and reports.failed == [B]
        await chain.close()
        assert [f.type for f in seen] == ["open", "close"]  # the step was never sent

    run(main)


def test_a_hop_that_floods_the_gateway_is_cut_off() -> None:
    """The chain holds at most a channel's worth of unread frames; then it stops
    reading that stream, raises bad_frame and closes without waiting on the hop."""
    written: list[int] = []

    async def last(fs: FrameStream) -> None:
        await ok(fs, "attach")
        for i in range(1000):
            await fs.write(result(i))
            written.append(i)

    async def main(nursery: trio.Nursery) -> None:
        scripts, _ = two_hops()
        reports = Reports()
        chain = await opened(Peers(nursery, {**scripts, B: last}), reports)
        await trio.testing.wait_all_tasks_blocked()
        assert 64 <= len(written) < 200  # the gateway stopped reading: the flood waits in the pipe
        with pytest.raises(ChainFailed) as info:
            await chain.step(PROMPT, 0, True)
        assert (info.value.peer, info.value.code) == (B, "bad_frame") and reports.failed == [B]
        with trio.fail_after(1):
            await chain.close()

    run(main)


# -- streams that end mid-answer, and silence --------------------------------------------------


@pytest.mark.parametrize("cut", [0, 2, 4, 9, -1], ids=["nothing", "in-the-length", "after-the-length", "in-the-header", "last-byte"])
def test_a_last_hop_that_stops_inside_its_answer_is_lost(cut: int) -> None:
    async def last(fs: FrameStream) -> None:
        await ok(fs, "attach")
        await fs.write(result(0))
        await trio.sleep(1)  # the second step is under way
        await fs.stream.write(encode_frame(result(1))[:cut])  # and the script returns: end of stream

    async def main(nursery: trio.Nursery) -> None:
        scripts, _ = two_hops(lambda step: None)
        reports = Reports()
        chain = await opened(Peers(nursery, {**scripts, B: last}), reports)
        assert (await chain.step(PROMPT, 0, True)).token_id == 7
        with pytest.raises(ChainFailed) as info:
            await chain.step([7], 3, True)
        assert (info.value.peer, info.value.code) == (B, "peer_lost") and reports.failed == [B]
        await chain.close()

    run(main)


def test_a_first_hop_that_goes_away_is_blamed() -> None:
    async def first(fs: FrameStream) -> None:
        await ok(fs, "open")
        await read(fs, "step")  # and then end of stream

    async def main(nursery: trio.Nursery) -> None:
        scripts, _ = two_hops(lambda step: None)
        reports = Reports()
        chain = await opened(Peers(nursery, {**scripts, A: first}), reports)
        with pytest.raises(ChainFailed) as info:
            await chain.step(PROMPT, 0, True)
        assert (info.value.peer, info.value.code) == (A, "peer_lost") and reports.failed == [A]
        await chain.close()

    run(main)


def test_a_token_that_never_comes_times_out_on_the_last_hop() -> None:
    async def main(nursery: trio.Nursery) -> None:
        scripts, _ = two_hops(lambda step: None)
        reports = Reports()
        chain = await opened(Peers(nursery, scripts), reports)
        began = trio.current_time()
        with pytest.raises(ChainFailed) as info:
            await chain.step(PROMPT, 0, True)
        assert (info.value.peer, info.value.code) == (B, "timeout") and reports.failed == [B]
        assert trio.current_time() - began == pytest.approx(STEP_CAP)  # nothing measured yet
        await chain.close()

    run(main)


def test_once_steps_are_measured_a_silent_chain_is_dropped_in_seconds() -> None:
    """Steps that took 0.2 s each: the next silent one is given the floor, not two minutes;
    a prefill sent in chunks is one measurement, bounded by all of its tokens."""
    async def main(nursery: trio.Nursery) -> None:
        async def answer_slowly(fs: FrameStream, answers: trio.MemoryReceiveChannel) -> None:
            await ok(fs, "attach")
            async for step, _ in answers:
                if step.header["position"] < 100:
                    await trio.sleep(0.2)
                    await fs.write(result(step.header["position"]))

        send, receive = trio.open_memory_channel[tuple[Frame, Callable]](100)

        async def first(fs: FrameStream) -> None:
            await ok(fs, "open")
            while (frame := await fs.read_frame()).type != "close":
                if frame.header["want"]:
                    await send.send((frame, None))

        reports = Reports()
        chains = mesh_chains(Peers(nursery, {A: first, B: lambda fs: answer_slowly(fs, receive)}), reports)
        chain = chains.chain("s", SamplingParams(temperature=0.0), PROMPT, [])
        await chain.open(512)
        await chain.step(list(range(40)), 0, False)  # a prefill in two chunks: one measurement
        began = trio.current_time()
        await chain.step(list(range(40)), 40, True)
        assert trio.current_time() - began == pytest.approx(0.2)
        for position in range(80, 83):
            await chain.step([1], position, True)
        assert chains.step_times.deadline(1) == STEP_FLOOR
        began = trio.current_time()
        with pytest.raises(ChainFailed) as info:
            await chain.step([1], 100, True)
        assert (info.value.peer, info.value.code) == (B, "timeout")
        assert trio.current_time() - began == pytest.approx(STEP_FLOOR)
        await chain.close()

    run(main)


@pytest.mark.parametrize("silent, blamed", [((), B), ((A,), A), ((A, B), A), ((B,), B)], ids=["none", "first", "both", "last"])
def test_a_lost_token_is_blamed_on_the_first_hop_that_does_not_answer_a_probe(silent: tuple[str, ...], blamed: str) -> None:
    """A frozen middle hop (SIGSTOP) holds the token as surely as a frozen last hop: the
    gateway probes every hop of the route at once and blames the first silent one. It
    probes early (PROBE_FLOOR before any measurement); when every hop answers, the step
    waits on to its bound and the hops are probed once more."""
    probed: list[str] = []

    async def probe(peer: str) -> bool:
        probed.append(peer)
        await trio.sleep(3)  # a probe that gets no answer takes its whole timeout
        return peer not in silent

    async def main(nursery: trio.Nursery) -> None:
        scripts, _ = two_hops(lambda step: None)
        reports = Reports()
        chains = mesh_chains(Peers(nursery, scripts), reports, probe=probe)
        chain = chains.chain("s", SamplingParams(temperature=0.0), PROMPT, [])
        await chain.open(64)
        began = trio.current_time()
        with pytest.raises(ChainFailed) as info:
            await chain.step(PROMPT, 0, True)
        assert (info.value.peer, info.value.code) == (blamed, "timeout") and reports.failed == [blamed]
        took = trio.current_time() - began
        if silent:
            assert sorted(probed) == [A, B]
            assert took == pytest.approx(PROBE_FLOOR + 3)  # the probes ran together, early
        else:
            assert sorted(probed) == [A, A, B, B]
            assert took == pytest.approx(STEP_CAP + 3)
        await chain.close()

    run(main)


def test_each_hop_waits_less_for_the_rest_of_the_chain_than_the_one_before_it() -> None:
    """So the hop right before a silent one always reports first, naming it: a hop
    with n hops after it needs HOP_REACH to reach the next one, then waits open_wait(n)."""
    for hops in range(2, 64):
        assert open_wait(hops) > HOP_REACH + open_wait(hops - 1)
    with pytest.raises(ValueError):
        open_wait(0)


# -- close -----------------------------------------------------------------------------------


def test_close_never_raises_before_open_after_failures_or_twice() -> None:
    async def first(fs: FrameStream) -> None:
        await read(fs, "open")
        await fs.stream.reset()

    async def main(nursery: trio.Nursery) -> None:
        peers = Peers(nursery, {A: first})
        chain = mesh_chains(peers, Reports()).chain("s", SamplingParams(), PROMPT, [])
        await chain.close()  # never opened
        chain = mesh_chains(peers, Reports()).chain("s", SamplingParams(), PROMPT, [])
        with pytest.raises(ChainFailed):
            await chain.open(64)
        await chain.close()
        await chain.close()

    run(main)


class Breakable:
    """A pipe end whose every operation fails once ``broken``: a transport in any state."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.broken = False

    def __getattr__(self, name: str):
        method = getattr(self.stream, name)

        async def call(*args):
            if self.broken:
                raise RuntimeError(f"{name} on a broken stream")
            return await method(*args)

        return call


def test_close_never_raises_when_every_stream_operation_fails() -> None:
    async def main(nursery: trio.Nursery) -> None:
        scripts, _ = two_hops()
        peers = Peers(nursery, scripts)
        streams: list[Breakable] = []

        async def open_stream(peer: str) -> Breakable:
            streams.append(Breakable(await peers.open_stream(peer)))
            return streams[-1]

        chain = RemoteChain(nursery=nursery, open_stream=open_stream, route=ROUTE, session_id="s", model_id=MODEL,
                            gateway=GATEWAY, sampling={}, prompt_ids=PROMPT)
        await chain.open(64)
        assert (await chain.step(PROMPT, 0, True)).token_id == 7
        for s in streams:
            s.broken = True
        await chain.close()

    run(main)


def test_a_hop_that_lingers_after_close_is_reset() -> None:
    """After ``close`` the hops close their sides, which ends the chain's readers; a
    hop that keeps its stream open is reset after a grace period."""
    outcome: list[str] = []

    async def last(fs: FrameStream) -> None:
        await ok(fs, "attach")
        with pytest.raises(StreamEnded):  # the gateway closed its side...
            await fs.read_frame()
        outcome.append(f"closed at {trio.current_time():.0f}")
        while True:  # ...but this hop keeps writing
            await trio.sleep(1)
            try:
                await fs.write(result(0))
            except WireError:
                outcome.append(f"reset at {trio.current_time():.0f}")
                return

    async def main(nursery: trio.Nursery) -> None:
        scripts, _ = two_hops()
        chain = await opened(Peers(nursery, {**scripts, B: last}), Reports())
        await chain.close()
        await trio.sleep(2 * READER_GRACE)

    run(main)
    assert outcome == ["closed at 0", f"reset at {READER_GRACE + 1:.0f}"]


# -- over a real libp2p host -----------------------------------------------------------------


def test_over_libp2p_a_stream_cut_inside_a_result_names_the_last_hop() -> None:
    """py-libp2p shows a peer that closes mid-frame exactly like a clean close; the
    chain must still see a lost peer, not a short answer."""
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.id import ID

    from shardmesh.mesh.host import running_host
    from shardmesh.mesh.wire import PROTOCOL

    send, receive = trio.open_memory_channel[int](10)

    async def hop(stream) -> None:
        fs = FrameStream(stream)
        first = await fs.read_frame()
        await fs.write({"t": "result", "session": "s", "ok": True})
        if first.type == "open":
            while (frame := await fs.read_frame()).type == "step":
                await send.send(frame.header["position"])
        else:
            await fs.write(result(await receive.receive()))
            cut = encode_frame(result(await receive.receive(), 9))
            await fs.stream.write(cut[: len(cut) // 2])
        await stream.close()

    async def main() -> None:
        local = ["/ip4/127.0.0.1/tcp/0"]
        async with running_host(create_new_key_pair(), local) as server, running_host(create_new_key_pair(), local) as client:
            server.set_handler(PROTOCOL, hop)
            await client.connect(server.addrs()[0])
            failed: list[str] = []
            async with trio.open_nursery() as nursery:
                chain = RemoteChain(
                    nursery=nursery, open_stream=lambda peer: client.open_stream(ID.from_base58(peer), PROTOCOL),
                    route=[Hop(server.peer_id_str, 0, 4)], session_id="s", model_id=MODEL, gateway=client.peer_id_str,
                    sampling={}, prompt_ids=PROMPT, on_failure=failed.append,
                )
                with trio.fail_after(30):
                    await chain.open(64)
                    assert (await chain.step(PROMPT, 0, True)).token_id == 7
                    with pytest.raises(ChainFailed) as info:
                        await chain.step([7], 3, True)
                    await chain.close()
                nursery.cancel_scope.cancel()
            assert (info.value.peer, info.value.code) == (server.peer_id_str, "peer_lost") and failed == [server.peer_id_str]

    trio.run(main)
