"""Trunks: the steps of several sessions between two hops in one ``steps`` frame.

The frame codec is checked without streams; the receiving hop is attacked with
hand-written frames (docs/PROTOCOL.md 6.7) over real libp2p hosts on 127.0.0.1. A hop
that serves blocks 2:4 of a tiny Llama gets trunked sessions from a client host: steps
of two sessions in one frame give what the same steps give on a session's own stream,
a step that is wrong for one session ends that session alone, a trunk feeds only its
own peer's trunked sessions, and a malformed frame ends only the trunk. The sending
side (a hop's outputs of one batch leave as one frame) runs in tests/test_mesh_chain.py,
through three node processes.
"""

from __future__ import annotations

import random
import struct
import time
from pathlib import Path

import cbor2
import pytest
import trio

from shardmesh.backends.batcher import StepBatcher
from shardmesh.backends.compute_thread import compute_thread
from shardmesh.backends.hop_compute import StageHopCompute
from shardmesh.backends.torch.stage import TorchStage
from shardmesh.backends.weights import resolve
from shardmesh.mesh.gateway_ticket import TicketIssuer
from shardmesh.mesh.hop_server import HopServer, Limits
from shardmesh.mesh.host import running_host
from shardmesh.mesh.open_request import session_key
from shardmesh.mesh.step_inbox import MAX_QUEUED_STEPS, StepInbox
from shardmesh.mesh.result_trunks import ResultTrunks
from shardmesh.mesh.trunk_frame import MAX_TRUNK_ITEMS, check_steps_header, results_frame, split_results, split_steps, steps_frame
from shardmesh.mesh.wire import PROTOCOL, Frame, FrameStream, StreamEnded, WireError, encode_frame
from shardmesh.tools.tiny_model import cached_tiny_model

MODEL_ID = "tiny@test"
LOCAL = ["/ip4/127.0.0.1/tcp/0"]
HIDDEN = 64


def hidden_states(n: int, seed: int) -> bytes:
    rng = random.Random(seed)
    return struct.pack(f"<{n * HIDDEN}f", *(rng.uniform(-1, 1) for _ in range(n * HIDDEN)))


def step(session: str, position: int, n: int, **fields) -> dict:
    return {"t": "step", "session": session, "position": position, "want": True, "spent": 0.0,
            "dtype": "float32", "shape": [n, HIDDEN], **fields}  # fmt: skip


# -- the frame, without streams ------------------------------------------------------------


def test_a_steps_frame_splits_back_into_the_steps_it_was_made_of() -> None:
    steps = [(2, step("a", 0, 3), hidden_states(3, 1)), (5, step("b", 7, 1, draft=[4]), hidden_states(1, 2))]
    header, payload = steps_frame(steps)
    assert header["shape"] == [4, HIDDEN] and len(header["items"]) == 2
    got = split_steps(Frame(cbor2.loads(cbor2.dumps(header)), payload), max_tokens=64)
    assert [key for key, _ in got] == [session_key("a", 2), session_key("b", 5)]
    for (start, head, data), (_, frame) in zip(steps, got):
        assert frame.header == {k: v for k, v in head.items()} and frame.payload == data


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"items": []}, "bad_frame"),
        ({"items": [{"session": "a", "start": 2, "n": 1}] * (MAX_TRUNK_ITEMS + 1)}, "bad_frame"),
        ({"items": ["a"]}, "bad_frame"),
        ({"items": [{"session": "", "start": 2, "n": 4}]}, "bad_frame"),
        ({"items": [{"session": "x" * 65, "start": 2, "n": 4}]}, "bad_frame"),
        ({"items": [{"session": "a", "start": -1, "n": 4}]}, "bad_frame"),
        ({"items": [{"session": "a", "start": 2, "n": True}]}, "bad_frame"),
        ({"items": [{"session": "a", "start": 2, "n": 3}]}, "bad_input"),  # 3 tokens, a tensor of 4
        ({"dtype": "int64"}, "bad_input"),  # token ids never travel on a trunk
        ({"dtype": "complex"}, "bad_input"),
        ({"shape": [4]}, "bad_input"),
        ({"shape": [4, 0]}, "bad_input"),
        ({"items": [{"session": "a", "start": 2, "n": 100}], "shape": [100, HIDDEN]}, "too_large"),
    ],
)
def test_a_malformed_steps_header_is_refused_before_its_payload(change: dict, code: str) -> None:
    header = {"t": "steps", "items": [{"session": "a", "start": 2, "n": 4}], "dtype": "float32", "shape": [4, HIDDEN], **change}
    with pytest.raises(WireError) as caught:
        check_steps_header(header, max_tokens=64)
    assert caught.value.code == code


def test_token_ids_travel_in_a_steps_frame_of_one_dimension() -> None:
    ids = [struct.pack("<3q", 5, 6, 7), struct.pack("<q", 9)]
    steps = [(0, {"t": "step", "session": s, "position": 0, "want": True, "dtype": "int64", "shape": [len(p) // 8]}, p)
             for s, p in zip("ab", ids)]  # fmt: skip
    header, payload = steps_frame(steps)
    assert header["shape"] == [4] and payload == b"".join(ids)
    got = split_steps(Frame(header, payload), max_tokens=64)
    assert [frame.header for _, frame in got] == [h for _, h, _ in steps] and [f.payload for _, f in got] == ids
    with pytest.raises(WireError):  # token ids with a width
        check_steps_header({**header, "shape": [4, 1]}, max_tokens=64)


def test_a_results_frame_splits_back_into_the_results_it_was_made_of() -> None:
    results = [{"t": "result", "session": s, "position": 3, "token": t, "logprob": None, "top": [], "spent": 0.5} for s, t in (("a", 1), ("b", 2))]
    header, payload = results_frame([(0, r, b"") for r in results])
    assert [f.header for f in split_results(Frame(cbor2.loads(cbor2.dumps(header)), payload))] == results


@pytest.mark.parametrize(
    "case", ["count too high", "count zero", "count not an int", "trailing bytes", "cut short", "huge length", "not cbor", "not a result", "no session"]
)
def test_a_malformed_results_frame_is_refused(case: str) -> None:
    one = encode_frame({"t": "result", "session": "a", "token": 1})
    header, payload = {"t": "results", "count": 1}, one
    if case == "count too high":
        header["count"] = 2
    elif case == "count zero":
        header["count"] = 0
    elif case == "count not an int":
        header["count"] = "1"
    elif case == "trailing bytes":
        payload = one + b"\0"
    elif case == "cut short":
        payload = one[:-1]
    elif case == "huge length":
        payload = struct.pack(">I", 1 << 30) + one[4:]
    elif case == "not cbor":
        payload = struct.pack(">I", 3) + b"\xff\xfe\xfd"
    elif case == "not a result":
        payload = encode_frame({"t": "step", "session": "a"})
    else:
        payload = encode_frame({"t": "result", "token": 1})
    with pytest.raises(WireError) as caught:
        split_results(Frame(header, payload))
    assert caught.value.code == "bad_frame"


class Reader:
    def __init__(self) -> None:
        self.got: list = []

    def deliver(self, frame) -> None:
        self.got.append(frame)

    def lost(self, peer: str) -> None:
        self.got.append(peer)


def test_a_results_trunk_speaks_only_for_its_own_peer() -> None:
    trunks = ResultTrunks(open_stream=None, links=None, max_payload=1 << 20)  # type: ignore[arg-type]
    reader = Reader()
    trunks.expect("s", "last-hop", reader)
    token = Frame({"t": "result", "session": "s", "token": 1})
    trunks.deliver("another-peer", token)  # a peer that is not the session's last hop
    trunks.deliver("last-hop", Frame({"t": "result", "session": "unknown", "token": 1}))
    assert reader.got == [] and trunks.counts.dropped == 2
    trunks.deliver("last-hop", token)
    assert reader.got == [token]
    trunks.forget("s")
    trunks.deliver("last-hop", token)
    assert reader.got == [token] and trunks.counts.dropped == 3


def test_a_payload_that_does_not_hold_the_tensor_is_refused() -> None:
    header, payload = steps_frame([(2, step("a", 0, 2), hidden_states(2, 1))])
    with pytest.raises(WireError) as caught:
        split_steps(Frame(header, payload[:-4]), max_tokens=64)
    assert caught.value.code == "bad_input"


def test_an_inbox_that_overflows_ends_its_session_after_what_it_queued() -> None:
    async def main() -> None:
        inbox = StepInbox()
        for i in range(MAX_QUEUED_STEPS + 1):
            inbox.deliver(Frame({"t": "step", "i": i}))
        for i in range(MAX_QUEUED_STEPS):
            assert (await inbox.read_frame(idle_timeout=1)).header["i"] == i
        with pytest.raises(WireError) as caught:
            await inbox.read_frame(idle_timeout=1)
        assert caught.value.code == "too_many_steps"

    trio.run(main)


# -- a hop under a trunk ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_path() -> Path:
    return cached_tiny_model("llama", layers=4, hidden=HIDDEN)


def new_key():
    from libp2p.crypto.ed25519 import create_new_key_pair

    return create_new_key_pair()


class Client:
    """A hand-written upstream hop (and, for the results, the gateway) on its own host."""

    def __init__(self, host, server: HopServer) -> None:
        self.host = host
        self.server = server

    async def stream(self) -> FrameStream:
        from libp2p.peer.id import ID

        return FrameStream(await self.host.open_stream(ID.from_base58(self.server.me), PROTOCOL))

    async def open(self, session: str, attach: dict | None = None, **fields) -> tuple[FrameStream, FrameStream]:
        """Open ``session`` at blocks 2:4 (the last hop) with ``fields`` and attach to it
        with ``attach``; both streams."""
        header = {
            "t": "open", "session": session, "model": MODEL_ID, "gateway": self.host.peer_id_str,
            "route": [{"peer": self.server.me, "start": 2, "end": 4}], "max_length": 64,
            "sampling": {"temperature": 0.0}, "n_prompt": 0, **fields,
        }  # fmt: skip
        fs = await self.stream()
        await fs.write(TicketIssuer(self.host.peer_id_str, self.host.key_pair).sign_open(header, time.time()))
        ok = await fs.read_frame()
        assert ok.header.get("ok") is True, ok.header
        assert ok.header.get("trunk") is fields.get("trunk"), ok.header
        return fs, await self.attach(session, **(attach or {}))

    async def trunk(self, **fields) -> FrameStream:
        fs = await self.stream()
        await fs.write({"t": "trunk", **fields})
        assert (await fs.read_frame()).header.get("ok") is True
        return fs

    async def attach(self, session: str, **fields) -> FrameStream:
        attach = await self.stream()
        await attach.write({"t": "attach", "session": session, **fields})
        ok = await attach.read_frame()
        assert ok.header.get("ok") is True, ok.header
        assert ok.header.get("trunk") is fields.get("trunk"), ok.header
        return attach


async def token_of(attach: FrameStream) -> int:
    with trio.fail_after(10):
        frame = await attach.read_frame()
    assert frame.type == "result", frame.header
    return frame.header["token"]


async def error_of(fs: FrameStream) -> str:
    with trio.fail_after(10):
        frame = await fs.read_frame()
    assert frame.type == "error", frame.header
    return frame.header["code"]


async def ended(fs: FrameStream) -> None:
    with trio.fail_after(10):
        with pytest.raises((StreamEnded, WireError)):
            while True:
                await fs.read_frame()


def under_a_trunk(model_path: Path, attack) -> None:
    async def main() -> None:
        stage = await compute_thread().run(lambda: TorchStage(resolve(str(model_path)), 2, 4, model_name="tiny", dtype="float32"))
        limits = Limits(max_tokens_per_step=64)
        async with running_host(new_key(), LOCAL) as server_host, running_host(new_key(), LOCAL) as one, \
                running_host(new_key(), LOCAL) as other:  # fmt: skip
            async with trio.open_nursery() as nursery:
                batcher = StepBatcher(stage)
                await nursery.start(batcher.run)
                server = HopServer(server_host, StageHopCompute(batcher), MODEL_ID, 4, 2048, limits, hidden_size=HIDDEN, trunks=True)
                await nursery.start(server.run)
                for host in (one, other):
                    await host.connect(server_host.addrs()[0])
                await attack(Client(one, server), Client(other, server), server)
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_two_sessions_in_one_frame_get_what_their_own_streams_give(model_path) -> None:
    async def attack(client: Client, other: Client, server: HopServer) -> None:
        plain = [await client.open(f"plain{i}") for i in range(2)]
        trunked = [await client.open(f"t{i}", trunk=True) for i in range(2)]
        trunk = await client.trunk()
        for position, n in ((0, 5), (5, 1), (6, 1)):
            inputs = [hidden_states(n, 10 * position + i) for i in range(2)]
            for i, (fs, _) in enumerate(plain):
                await fs.write(step(f"plain{i}", position, n), inputs[i])
            await trunk.write(*steps_frame([(2, step(f"t{i}", position, n), inputs[i]) for i in range(2)]))
            want = [await token_of(attach) for _, attach in plain]
            got = [await token_of(attach) for _, attach in trunked]
            assert got == want
        assert (server.trunk_counts.frames, server.trunk_counts.steps) == (3, 6)

    under_a_trunk(model_path, attack)


def test_a_step_wrong_for_one_session_ends_that_session_alone(model_path) -> None:
    async def attack(client: Client, other: Client, server: HopServer) -> None:
        (bad, bad_attach), (good, good_attach) = [await client.open(s, trunk=True) for s in ("bad", "good")]
        trunk = await client.trunk()
        await trunk.write(*steps_frame([(2, step("bad", 9, 2), hidden_states(2, 1)), (2, step("good", 0, 2), hidden_states(2, 2))]))
        assert await error_of(bad) == "bad_input"  # position 9 in an empty session
        await token_of(good_attach)
        # A NaN for one session is blamed on the upstream, and ends it alone too.
        (nan, _) = await client.open("nan", trunk=True)
        await trunk.write(*steps_frame([(2, step("nan", 0, 1), struct.pack("<f", float("nan")) * HIDDEN),
                                        (2, step("good", 2, 1), hidden_states(1, 3))]))  # fmt: skip
        assert await error_of(nan) == "non_finite"
        await token_of(good_attach)
        assert session_key("good", 2) in server.sessions and session_key("bad", 2) not in server.sessions

    under_a_trunk(model_path, attack)


def test_a_trunk_feeds_only_its_own_peer_s_trunked_sessions(model_path) -> None:
    async def attack(client: Client, other: Client, server: HopServer) -> None:
        (mine, mine_attach) = await client.open("mine", trunk=True)
        (plain, plain_attach) = await client.open("plain")
        stranger = await other.trunk()  # another peer's trunk names our sessions
        await stranger.write(*steps_frame([(2, step("mine", 0, 2), hidden_states(2, 1)), (2, step("plain", 0, 2), hidden_states(2, 2)),
                                           (2, step("nobody", 0, 1), hidden_states(1, 3))]))  # fmt: skip
        with trio.fail_after(10):
            while server.trunk_counts.dropped < 3:
                await trio.sleep(0.05)
        # Both sessions are untouched: their first steps still start at position 0.
        trunk = await client.trunk()
        await trunk.write(*steps_frame([(2, step("mine", 0, 2), hidden_states(2, 1))]))
        await plain.write(step("plain", 0, 2), hidden_states(2, 2))
        await token_of(mine_attach)
        await token_of(plain_attach)
        assert server.trunk_counts.dropped == 3

    under_a_trunk(model_path, attack)


def test_a_malformed_frame_ends_the_trunk_and_no_session(model_path) -> None:
    async def attack(client: Client, other: Client, server: HopServer) -> None:
        (fs, attach) = await client.open("s", trunk=True)
        trunk = await client.trunk()
        header, payload = steps_frame([(2, step("s", 0, 2), hidden_states(2, 1))])
        await trunk.write({**header, "shape": [3, HIDDEN]}, payload)  # the items hold 2 tokens
        assert await error_of(trunk) == "bad_input"
        await ended(trunk)

        trunk = await client.trunk()  # a header that announces more than this hop reads
        head = cbor2.dumps({**header, "nbytes": 1 << 40})
        await trunk.stream.write(struct.pack(">I", len(head)) + head)
        assert await error_of(trunk) == "too_large"

        trunk = await client.trunk()  # a session's own frame on a trunk
        await trunk.write(step("s", 0, 2), hidden_states(2, 1))
        assert await error_of(trunk) == "bad_frame"

        trunk = await client.trunk()
        await trunk.write(header, payload)
        await token_of(attach)
        # A trunked session's stream carries close only.
        await fs.write(step("s", 2, 1), hidden_states(1, 2))
        assert await error_of(fs) == "bad_frame"

    under_a_trunk(model_path, attack)


def test_a_peer_has_one_steps_trunk_at_a_time(model_path) -> None:
    async def attack(client: Client, other: Client, server: HopServer) -> None:
        (_, attach) = await client.open("s", trunk=True)
        first = await client.trunk()
        theirs = await other.trunk()
        second = await client.trunk()  # ends the first, not the other peer's
        await ended(first)
        assert set(server.trunks_in) == {client.host.peer_id_str, other.host.peer_id_str}
        await second.write(*steps_frame([(2, step("s", 0, 2), hidden_states(2, 1))]))
        await token_of(attach)
        await theirs.write(*steps_frame([(2, step("s", 2, 1), hidden_states(1, 2))]))  # not theirs to feed
        with trio.fail_after(10):
            while server.trunk_counts.dropped < 1:
                await trio.sleep(0.05)

    under_a_trunk(model_path, attack)


def test_a_last_hop_sends_the_tokens_of_one_batch_in_one_results_frame(model_path) -> None:
    async def attack(client: Client, other: Client, server: HopServer) -> None:
        results = await client.trunk(results=True)
        plain = [await client.open(f"plain{i}") for i in range(2)]
        for i in range(2):  # steps on a trunk, tokens on the results trunk
            await client.open(f"t{i}", attach={"trunk": True}, trunk=True)
        steps = await client.trunk()
        for position, n in ((0, 4), (4, 1)):
            inputs = [hidden_states(n, 7 * position + i) for i in range(2)]
            for i, (fs, _) in enumerate(plain):
                await fs.write(step(f"plain{i}", position, n), inputs[i])
            await steps.write(*steps_frame([(2, step(f"t{i}", position, n), inputs[i]) for i in range(2)]))
            want = [await token_of(attach) for _, attach in plain]
            with trio.fail_after(10):
                frame = await results.read_frame()
            assert frame.type == "results"
            got = {r.header["session"]: r.header["token"] for r in split_results(frame)}
            assert got == {"t0": want[0], "t1": want[1]}  # both in one frame: they ran in one batch
        # Another peer cannot take these sessions' tokens: only their gateway may attach.
        fs = await other.stream()
        await fs.write({"t": "attach", "session": "t0", "trunk": True})
        assert await error_of(fs) == "forbidden"
        # A newer results trunk of the same gateway ends the older one.
        await client.trunk(results=True)
        await ended(results)

    under_a_trunk(model_path, attack)


def test_a_node_without_trunks_refuses_one_and_keeps_sessions_on_their_streams(model_path) -> None:
    async def main() -> None:
        async with running_host(new_key(), LOCAL) as server_host, running_host(new_key(), LOCAL) as host:
            async with trio.open_nursery() as nursery:
                server = HopServer(server_host, None, MODEL_ID, 4, 2048, hidden_size=HIDDEN)
                await nursery.start(server.run)
                await host.connect(server_host.addrs()[0])
                fs = await Client(host, server).stream()
                await fs.write({"t": "trunk"})
                assert await error_of(fs) == "bad_frame"
                nursery.cancel_scope.cancel()

    trio.run(main)


# -- a gateway's chains over trunks ----------------------------------------------------------


def two_hops_and_a_gateway(model_path: Path, servers_take_trunks: bool, body) -> None:
    """Two hops (blocks 0:2, 2:4) and a gateway with trunks, each on its own host; runs
    ``body(chain, servers, results, peers)`` where ``chain(session, prompt, trunked)``
    makes a chain over the two hops."""
    from shardmesh.mesh.chain_client import RemoteChain
    from shardmesh.mesh.result_trunks import ChainTrunks
    from shardmesh.placement.routing import Hop

    async def main() -> None:
        files = resolve(str(model_path))
        async with running_host(new_key(), LOCAL) as a, running_host(new_key(), LOCAL) as b, running_host(new_key(), LOCAL) as gw:
            async with trio.open_nursery() as nursery:
                servers = []
                for host, start in ((a, 0), (b, 2)):
                    stage = await compute_thread().run(lambda: TorchStage(files, start, start + 2, model_name="tiny", dtype="float32"))
                    batcher = StepBatcher(stage)
                    await nursery.start(batcher.run)
                    servers.append(HopServer(host, StageHopCompute(batcher), MODEL_ID, 4, 2048, hidden_size=HIDDEN, trunks=servers_take_trunks))
                    await nursery.start(servers[-1].run)
                for host in (a, b):
                    await gw.connect(host.addrs()[0])
                await a.connect(b.addrs()[0])
                me = HopServer(gw, None, MODEL_ID, 4, 2048, hidden_size=HIDDEN, trunks=True)
                await nursery.start(me.run)
                results = ResultTrunks(me.open_stream, None, me.max_payload)
                await nursery.start(results.run)
                route = [Hop(a.peer_id_str, 0, 2), Hop(b.peer_id_str, 2, 4)]

                def chain(session: str, prompt: list[int], trunked: bool) -> RemoteChain:
                    return RemoteChain(nursery=nursery, open_stream=me.open_stream, route=route, session_id=session, model_id=MODEL_ID,
                                       gateway=gw.peer_id_str, issuer=TicketIssuer(gw.peer_id_str, gw.key_pair),
                                       sampling={"temperature": 0.0}, prompt_ids=prompt,
                                       trunks=ChainTrunks(me.trunks, results) if trunked else None)  # fmt: skip

                await body(chain, servers, results, (a.peer_id_str, b.peer_id_str, gw.peer_id_str))
                nursery.cancel_scope.cancel()

    trio.run(main)


PROMPTS = [[1, 17, 42], [5, 6, 7, 8], [300, 2]]


async def greedy_chats(chain, trunked: bool, n: int = 8) -> tuple[list, list[list[int]]]:
    """The chains (left open) and greedy tokens of :data:`PROMPTS`, all at once."""
    chains = [chain(f"{trunked}{i}", p, trunked) for i, p in enumerate(PROMPTS)]
    outs: list[list[int]] = [[] for _ in PROMPTS]

    async def greedy(c, prompt: list[int], out: list[int]) -> None:
        await c.open(64)
        out.append((await c.step(prompt, 0, True)).token_id)
        while len(out) < n:
            out.append((await c.step([out[-1]], len(prompt) + len(out) - 1, True)).token_id)

    with trio.fail_after(60):
        async with trio.open_nursery() as chats:
            for c, p, out in zip(chains, PROMPTS, outs):
                chats.start_soon(greedy, c, p, out)
    return chains, outs


def test_a_gateway_s_chains_over_trunks_give_what_plain_chains_give(model_path) -> None:
    """Chains whose steps go into the first hop on a trunk and whose tokens come back on
    a results trunk give the tokens of chains without trunks; when the results trunk goes
    away, the next step fails at once, naming the last hop."""
    from shardmesh.contract import ChainFailed

    async def body(chain, servers, results, peers) -> None:
        plain, want = await greedy_chats(chain, False)
        trunked, got = await greedy_chats(chain, True)
        assert got == want
        assert servers[0].trunk_counts.steps >= 3 * 8 and results.counts.results >= 3 * 8
        await servers[1].to_gateways[peers[2]].fs.stream.reset()
        with trio.fail_after(10):
            with pytest.raises(ChainFailed) as caught:
                await trunked[0].step([got[0][-1]], len(PROMPTS[0]) + 7, True)
        assert caught.value.peer == peers[1]
        for c in plain + trunked:
            await c.close()

    two_hops_and_a_gateway(model_path, True, body)


def test_a_gateway_with_trunks_chains_through_hops_without_them(model_path) -> None:
    async def body(chain, servers, results, peers) -> None:
        plain, want = await greedy_chats(chain, False)
        trunked, got = await greedy_chats(chain, True)
        assert got == want
        assert results.counts.results == 0 and all(s.trunk_counts.steps == 0 for s in servers)
        for c in plain + trunked:
            await c.close()

    two_hops_and_a_gateway(model_path, False, body)
