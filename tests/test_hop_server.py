"""The hop server (``/shardmesh/infer/1.0.0``) under attack: real libp2p hosts over TCP on 127.0.0.1.

One :class:`~shardmesh.mesh.hop_server.HopServer` serves a whole tiny model; a client
host keeps a good session open through the whole test and, between attacks, checks
that its next token is still the one transformers predicts. Every attack gets an error
frame (or a reset), and nothing it sends changes the good session. Each refusal of an
``open`` is unit-tested without streams in tests/test_open_request.py; here the same
refusals are checked end to end, through the streams and the node's other sessions.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path

import cbor2
import pytest
import trio

from shardmesh.backends.compute_thread import compute_thread
from shardmesh.backends.batcher import StepBatcher
from shardmesh.backends.hop_compute import StageHopCompute
from shardmesh.tools.tiny_model import cached_tiny_model
from shardmesh.backends.torch.stage import TorchStage
from shardmesh.backends.weights import resolve
from shardmesh.mesh.gateway_ticket import TicketIssuer
from shardmesh.mesh.host import running_host
from shardmesh.mesh.link import HopLink, dial
from shardmesh.mesh.link_offers import LinkListener, Links
from shardmesh.contract import ChainFailed
from shardmesh.mesh.chain_client import RemoteChain
from shardmesh.mesh.hop_server import Limits, HopServer
from shardmesh.mesh.open_rate import OpenRate
from shardmesh.mesh.wire import PROTOCOL, FrameStream, StreamEnded, WireError, encode_frame
from shardmesh.placement.routing import Hop
from reference import Transformers

MODEL_ID = "tiny@test"
LOCAL = ["/ip4/127.0.0.1/tcp/0"]
GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module")
def model_path() -> Path:
    return cached_tiny_model("llama", layers=4, hidden=64)


PROMPT = [1, 17, 42, 99, 7, 300]


@pytest.fixture(scope="module")
def expected(model_path: Path) -> list[int]:
    """Greedy tokens by full forwards of the unsplit model (eos does not stop it)."""
    return Transformers(model_path).greedy_forwards(PROMPT, 20)


def new_key():
    from libp2p.crypto.ed25519 import create_new_key_pair

    return create_new_key_pair()


async def serve_and_attack(model_path: Path, attack) -> None:
    """Start a server and a client; open a good session; run ``attack`` between its steps."""
    files = resolve(str(model_path))
    stage = await compute_thread().run(lambda: TorchStage(files, 0, 4, model_name="tiny", dtype="float32"))
    limits = Limits(max_sessions_per_peer=4, max_tokens_per_step=64)
    async with running_host(new_key(), LOCAL) as server_host, running_host(new_key(), LOCAL) as client:
        async with trio.open_nursery() as nursery:
            runner = StepBatcher(stage)
            await nursery.start(runner.run)
            listener = await LinkListener.bind("127.0.0.1")
            nursery.start_soon(listener.run)
            server = HopServer(server_host, StageHopCompute(runner), MODEL_ID, 4, 2048, limits, links=Links(listener))
            await nursery.start(server.run)
            await client.connect(server_host.addrs()[0])
            me = HopServer(client, None, MODEL_ID, 4, 2048, links=Links())  # the client's side: a gateway
            await nursery.start(me.run)
            good = RemoteChain(
                nursery=nursery,
                open_stream=me.open_stream,
                route=[Hop(server_host.peer_id_str, 0, 4)],
                session_id="good",
                model_id=MODEL_ID,
                gateway=client.peer_id_str,
                issuer=TicketIssuer(client.peer_id_str, client.key_pair),
                sampling=GREEDY,
                prompt_ids=PROMPT,
                links=me.links,
            )
            await good.open(64)
            # The good session runs over hop links; the attacks below use libp2p streams
            # (and links of their own).
            assert isinstance(good._first.stream, HopLink) and isinstance(good._last.stream, HopLink)
            tokens = [(await good.step(PROMPT, 0, True)).token_id]

            async def next_token() -> int:
                token = await good.step([tokens[-1]], len(PROMPT) + len(tokens) - 1, True)
                tokens.append(token.token_id)
                return token.token_id

            async def raw_stream() -> FrameStream:
                return FrameStream(await client.open_stream(server_host.peer_id, PROTOCOL))

            await attack(raw_stream, next_token, server, client)
            await next_token()
            await good.close()
            nursery.cancel_scope.cancel()
    serve_and_attack.tokens = tokens  # type: ignore[attr-defined]


async def expect_error(fs: FrameStream, code: str) -> None:
    with trio.fail_after(10):
        frame = await fs.read_frame()
    assert frame.type == "error", frame.header
    assert frame.header["code"] == code, frame.header
    assert isinstance(frame.header["message"], str) and frame.header["message"]


async def expect_reset_or_end(fs: FrameStream) -> None:
    with trio.fail_after(10):
        with pytest.raises((StreamEnded, WireError)):
            while True:
                await fs.read_frame()


def run(model_path: Path, expected: list[int], attack) -> None:
    trio.run(serve_and_attack, model_path, attack)
    got = serve_and_attack.tokens  # type: ignore[attr-defined]
    assert got == expected[: len(got)]


def open_header(server_peer: str, client, **overrides) -> dict:
    """An open from ``client`` (a MeshHost), with the ticket it signs for these fields."""
    header = {
        "t": "open", "session": "evil", "model": MODEL_ID, "gateway": client.peer_id_str,
        "route": [{"peer": server_peer, "start": 0, "end": 4}], "max_length": 64,
        "sampling": GREEDY, "n_prompt": 0,
    }
    header.update(overrides)
    return TicketIssuer(client.peer_id_str, client.key_pair).sign_open(header, time.time())


async def open_and_step(raw, server, client, session: str, payload: bytes, **step) -> FrameStream:
    """Open ``session`` (it must be accepted), then send it one step at position 0
    made of ``step``'s fields and ``payload``; the stream, for the answer."""
    fs = await raw()
    await fs.write(open_header(server.me, client, session=session))
    assert (await fs.read_frame()).header.get("ok") is True
    await fs.write({"t": "step", "session": session, "position": 0, "want": False, **step}, payload)
    return fs


def test_good_session_matches_transformers(model_path, expected) -> None:
    async def attack(raw, next_token, server, client):
        for _ in range(5):
            await next_token()

    run(model_path, expected, attack)


def test_malformed_frames_get_error_frames(model_path, expected) -> None:
    async def attack(raw, next_token, server, client):
        fs = await raw()  # a header length beyond the limit
        await fs.stream.write(struct.pack(">I", 1 << 30) + b"x" * 16)
        await expect_error(fs, "too_large")
        await next_token()

        fs = await raw()  # not CBOR
        bad = b"\xff\xfe\xfd"
        await fs.stream.write(struct.pack(">I", len(bad)) + bad)
        await expect_error(fs, "bad_frame")

        fs = await raw()  # CBOR, but not a frame
        head = cbor2.dumps([1, 2, 3])
        await fs.stream.write(struct.pack(">I", len(head)) + head)
        await expect_error(fs, "bad_frame")

        fs = await raw()  # a step with no session opened
        await fs.write({"t": "step", "session": "good", "position": 0, "want": True, "dtype": "int64", "shape": [1]}, b"\0" * 8)
        await expect_error(fs, "bad_frame")
        await next_token()

        fs = await raw()  # a frame cut short, then the stream closed
        await fs.stream.write(encode_frame(open_header(server.me, client))[:7])
        await fs.stream.close()
        await expect_reset_or_end(fs)
        await next_token()

    run(model_path, expected, attack)


def test_oversized_payloads_are_refused_before_reading_them(model_path, expected) -> None:
    async def attack(raw, next_token, server, client):
        fs = await raw()
        header = cbor2.dumps({**open_header(server.me, client), "nbytes": 1 << 40})
        await fs.stream.write(struct.pack(">I", len(header)) + header)  # and no payload at all
        await expect_error(fs, "too_large")

        # A session whose step carries more tokens than this peer allows.
        fs = await open_and_step(raw, server, client, "big", b"\0" * 8 * 65, dtype="int64", shape=[65])
        await expect_error(fs, "too_large")
        await next_token()

    run(model_path, expected, attack)


def test_unknown_sessions_and_wrong_shapes(model_path, expected) -> None:
    async def attack(raw, next_token, server, client):
        fs = await raw()  # attach to a session that does not exist
        await fs.write({"t": "attach", "session": "nobody"})
        await expect_error(fs, "unknown_session")

        fs = await raw()  # another model's session
        await fs.write(open_header(server.me, client, model="other@123"))
        await expect_error(fs, "wrong_model")

        fs = await raw()  # a route that does not lead here
        await fs.write(open_header(server.me, client, route=[{"peer": client.peer_id_str, "start": 0, "end": 4}]))
        await expect_error(fs, "bad_route")

        for i, (dtype, shape, nbytes) in enumerate([
            ("float32", [2, 64], 2 * 64 * 4),  # hidden states sent to the first stage
            ("int64", [3], 8),  # payload does not hold the shape
            ("int64", [2, 2, 2], 64),  # too many dimensions
            ("complex", [1], 8),  # unknown dtype
        ]):
            fs = await open_and_step(raw, server, client, f"shape{i}", b"\1" * nbytes, dtype=dtype, shape=shape)
            await expect_error(fs, "bad_input")
            await next_token()

        # Token ids outside the vocabulary.
        fs = await open_and_step(raw, server, client, "vocab", struct.pack("<q", 10**9), dtype="int64", shape=[1])
        await expect_error(fs, "bad_input")
        await next_token()
        assert list(server.sessions) == ["good@0"], "refused sessions must be gone"

    run(model_path, expected, attack)


def test_sessions_per_peer_are_limited(model_path, expected) -> None:
    async def attack(raw, next_token, server, client):
        streams = []
        for i in range(3):  # with the good one: 4, the limit
            fs = await raw()
            await fs.write(open_header(server.me, client, session=f"s{i}"))
            assert (await fs.read_frame()).header.get("ok") is True
            streams.append(fs)
        fs = await raw()
        await fs.write(open_header(server.me, client, session="one-too-many"))
        await expect_error(fs, "too_many_sessions")
        await next_token()
        for fs in streams:  # hanging up frees them
            await fs.stream.close()
        with trio.fail_after(10):
            while len(server.sessions) > 1:
                await trio.sleep(0.05)

    run(model_path, expected, attack)


def test_a_failed_hop_is_named(model_path, expected) -> None:
    async def attack(raw, next_token, server, client):
        # A route whose second hop is a peer nobody can reach.
        ghost = "12D3KooWQ6xSUo4ScnVjm6xFVjp65uCs8MeQ13s8X5vdbTS22nkS"
        fs = await raw()
        await fs.write(open_header(server.me, client, session="ghosted",
                                   route=[{"peer": server.me, "start": 0, "end": 2}, {"peer": ghost, "start": 2, "end": 4}]))
        with trio.fail_after(30):
            frame = await fs.read_frame()
        assert frame.type == "error" and frame.header["peer"] == ghost, frame.header
        await next_token()

    run(model_path, expected, attack)


def test_remote_chain_reports_errors_as_chain_failed(model_path, expected) -> None:
    async def attack(raw, next_token, server, client):
        me = HopServer(client, None, MODEL_ID, 4, 2048)
        async with trio.open_nursery() as nursery:
            await nursery.start(me.run)
            chain = RemoteChain(nursery=nursery, open_stream=me.open_stream, route=[Hop(server.me, 0, 4)],
                                session_id="x", model_id="wrong@model", gateway=client.peer_id_str,
                                issuer=TicketIssuer(client.peer_id_str, client.key_pair),
                                sampling=GREEDY, prompt_ids=PROMPT)
            with pytest.raises(ChainFailed) as info:
                await chain.open(64)
            assert info.value.code == "wrong_model" and info.value.peer == server.me
            await chain.close()
            nursery.cancel_scope.cancel()
        await next_token()

    run(model_path, expected, attack)


def test_a_frame_cut_at_a_boundary_is_a_truncation() -> None:
    """A peer that dies right after a header (or before a payload) sent a truncated
    frame, not a clean end: only the length prefixes can tell."""
    from shardmesh.mesh.pipe import pipe_pair

    async def main() -> None:
        for cut in (4, None):  # after the length prefix; after the whole header
            mine, theirs = pipe_pair()
            data = encode_frame({"t": "step", "session": "s", "position": 0, "want": False, "dtype": "int64", "shape": [1]}, b"\0" * 8)
            head_end = 4 + struct.unpack(">I", data[:4])[0]
            await mine.write(data[: cut or head_end])
            await mine.close()
            with pytest.raises(WireError) as info:
                await FrameStream(theirs).read_frame()
            assert info.value.code == "truncated"

    trio.run(main)


def test_adjacent_hops_on_one_peer_are_refused(model_path, expected) -> None:
    async def attack(raw, next_token, server, client):
        fs = await raw()
        await fs.write(open_header(server.me, client, session="twice",
                                   route=[{"peer": server.me, "start": 0, "end": 2}, {"peer": server.me, "start": 2, "end": 4}]))
        await expect_error(fs, "bad_route")

        await next_token()

    run(model_path, expected, attack)


def test_a_step_with_a_bad_spent_field_is_refused(model_path, expected) -> None:
    async def attack(raw, next_token, server, client):
        for spent in (-1.0, "soon", float("nan")):
            fs = await open_and_step(raw, server, client, "spender", b"\1" + b"\0" * 7, dtype="int64", shape=[1], spent=spent)
            await expect_error(fs, "bad_input")
            await next_token()

    run(model_path, expected, attack)


def test_a_step_with_a_bad_draft_field_is_refused(model_path, expected) -> None:
    """The ``draft`` field (docs/PROTOCOL.md 6.2): a list of at most 16 token ids,
    fewer than the step's tokens, and only on a step that wants a token."""
    async def attack(raw, next_token, server, client):
        ids = lambda n: (b"\1" + b"\0" * 7) * n  # noqa: E731
        for n, fields in [
            (3, {"want": True, "draft": "1 2"}),  # not a list
            (3, {"want": True, "draft": [1, "2"]}),  # not token ids
            (3, {"want": True, "draft": [1, -2]}),
            (3, {"want": True, "draft": [True]}),
            (2, {"want": True, "draft": [1, 1]}),  # as many drafts as tokens
            (20, {"want": True, "draft": [1] * 17}),  # more than 16
            (3, {"want": False, "draft": [1]}),  # drafts where no token is wanted
        ]:
            fs = await open_and_step(raw, server, client, "drafter", ids(n), dtype="int64", shape=[n], **fields)
            await expect_error(fs, "bad_input")
            await next_token()
        assert list(server.sessions) == ["good@0"], "refused sessions must be gone"

    run(model_path, expected, attack)


def test_link_frames_that_do_not_follow_an_offer_are_refused(model_path, expected) -> None:
    async def attack(raw, next_token, server, client):
        fs = await raw()  # a session that never asked for a link
        await fs.write(open_header(server.me, client, session="nolink"))
        ok = await fs.read_frame()
        assert ok.header.get("ok") is True and "link" not in ok.header
        await fs.write({"t": "link", "session": "nolink"})
        await expect_error(fs, "bad_frame")
        await next_token()

        fs = await raw()  # asked and offered, but no connection was ever made
        await fs.write(open_header(server.me, client, session="nodial", link=True))
        ok = await fs.read_frame()
        assert set(ok.header["link"]) == {"port", "token", "key"}
        await fs.write({"t": "link", "session": "nodial"})
        await expect_error(fs, "link_failed")
        await next_token()

    run(model_path, expected, attack)


def test_forged_link_records_end_only_their_session(model_path, expected) -> None:
    async def attack(raw, next_token, server, client):
        fs = await raw()
        await fs.write(open_header(server.me, client, session="forger", link=True))
        offer = (await fs.read_frame()).header["link"]
        link = await dial("127.0.0.1", offer)
        await fs.write({"t": "link", "session": "forger"})
        linked = FrameStream(link)
        confirmed = await linked.read_frame()  # the node moved to the link and says so
        assert confirmed.type == "result" and confirmed.header.get("linked") is True
        # Bytes that are not a record sealed with the session's key.
        await link._stream.send_all(struct.pack(">I", 100) + bytes(100))
        await expect_error(linked, "stream_error")
        await next_token()

        # A stranger on the link port: a wrong token gets the connection closed.
        stranger = await trio.open_tcp_stream("127.0.0.1", offer["port"])
        await stranger.send_all(b"x" * 16)
        with trio.fail_after(10):
            assert await stranger.receive_some(10) == b""
        await next_token()

    run(model_path, expected, attack)


def test_nobody_opens_sessions_in_another_gateway_s_name(model_path, expected) -> None:
    """A hop charges a session to the gateway whose ticket it carries (mesh/gateway_ticket.py):
    Mallory, another peer, cannot spend the client's share or get its sessions reclaimed."""

    async def attack(raw, next_token, server, client):
        async with running_host(new_key(), LOCAL) as mallory:
            await mallory.connect(server.mesh.addrs()[0])
            victim = TicketIssuer(client.peer_id_str, client.key_pair)

            async def mallory_opens(header: dict) -> str:
                fs = FrameStream(await mallory.open_stream(server.mesh.peer_id, PROTOCOL))
                await fs.write(header)
                with trio.fail_after(10):
                    frame = await fs.read_frame()
                await fs.stream.reset()
                return "ok" if frame.header.get("ok") is True else f'{frame.header["code"]}: {frame.header["message"]}'

            def named(session: str, **overrides) -> dict:
                header = {
                    "t": "open", "session": session, "model": MODEL_ID, "gateway": client.peer_id_str,
                    "route": [{"peer": server.me, "start": 0, "end": 4}], "max_length": 64,
                    "sampling": GREEDY, "n_prompt": 0,
                }  # fmt: skip
                return {**header, **overrides}

            genuine = victim.sign_open(named("genuine"), time.time())
            forged = {
                "no ticket": named("m1"),
                "signed by Mallory": TicketIssuer(client.peer_id_str, mallory.key_pair).sign_open(named("m2"), time.time()),
                "another session's ticket": {**named("m3"), "ticket": genuine["ticket"]},
                "another route's ticket": {**named("m4"), "ticket": victim.sign_open(
                    named("m4", route=[{"peer": mallory.peer_id_str, "start": 0, "end": 2}, {"peer": server.me, "start": 2, "end": 4}]),
                    time.time())["ticket"]},  # fmt: skip
                "a stale ticket": victim.sign_open(named("m5"), time.time() - 200),
                "not CBOR": {**named("m6"), "ticket": b"\xff" * 40},
            }
            for what, header in forged.items():
                answer = await mallory_opens(header)
                assert answer.startswith("forbidden: ") and "ticket" in answer, (what, answer)
                await next_token()  # the client's own session runs on, untouched
            # Mallory's own name works, and the genuine ticket opens its one session.
            own = TicketIssuer(mallory.peer_id_str, mallory.key_pair).sign_open(named("mine", gateway=mallory.peer_id_str), time.time())
            assert await mallory_opens(own) == "ok"
            assert await mallory_opens(genuine) == "ok"

    run(model_path, expected, attack)


def test_a_gateway_that_opens_too_fast_is_slowed_and_others_are_not(model_path, expected) -> None:
    async def attack(raw, next_token, server, client):
        server.open_rate = OpenRate(rate=0.01, burst=3)
        async with running_host(new_key(), LOCAL) as fast:
            await fast.connect(server.mesh.addrs()[0])
            answers = []
            for i in range(4):
                fs = FrameStream(await fast.open_stream(server.mesh.peer_id, PROTOCOL))
                await fs.write(open_header(server.me, fast, session=f"fast-{i}"))
                with trio.fail_after(10):
                    frame = await fs.read_frame()
                answers.append("ok" if frame.header.get("ok") else f'{frame.header["code"]}: {frame.header["message"]}')
                await fs.stream.reset()
            assert answers[:3] == ["ok"] * 3 and answers[3].startswith("too_many_sessions: ") and "faster than" in answers[3], answers
            fs = await raw()  # the client, another gateway, opens as before
            await fs.write(open_header(server.me, client, session="not-slowed"))
            assert (await fs.read_frame()).header.get("ok") is True
            await fs.stream.reset()
        await next_token()

    run(model_path, expected, attack)
