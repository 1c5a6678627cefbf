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
from shardmesh.mesh.trunk_frame import MAX_TRUNK_ITEMS, check_steps_header, split_steps, steps_frame
from shardmesh.mesh.wire import PROTOCOL, Frame, FrameStream, StreamEnded, WireError
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

    async def open(self, session: str, **fields) -> tuple[FrameStream, FrameStream]:
        """Open ``session`` at blocks 2:4 (the last hop) and attach to it; both streams."""
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
        attach = await self.stream()
        await attach.write({"t": "attach", "session": session})
        assert (await attach.read_frame()).header.get("ok") is True
        return fs, attach

    async def trunk(self) -> FrameStream:
        fs = await self.stream()
        await fs.write({"t": "trunk"})
        assert (await fs.read_frame()).header.get("ok") is True
        return fs


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
