"""Hop links (mesh/link.py): real TCP sockets on 127.0.0.1 and real libp2p hosts.

The record layer first (round trips, half-close, tampering, tokens), then a two-hop
chain whose hidden states move over links, and one whose next hop's link port cannot
be reached, which must stay on libp2p and still answer correctly.
"""

from __future__ import annotations

import struct
from pathlib import Path

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
from shardmesh.mesh.link import DIRECT_MAX, LINK_MAGIC, MAX_RECORD, HopLink, LinkError, dial
from shardmesh.mesh.link_offers import LinkListener, Links
from shardmesh.contract import ChainFailed
from shardmesh.mesh.chain_client import RemoteChain
from shardmesh.mesh.hop_server import HopServer
from shardmesh.placement.routing import Hop
from reference import Transformers

LOCAL = ["/ip4/127.0.0.1/tcp/0"]
MODEL_ID = "tiny@link-test"
PROMPT = [1, 17, 42, 99, 7, 300]


async def linked_pair(nursery: trio.Nursery) -> tuple[HopLink, HopLink, LinkListener]:
    listener = await LinkListener.bind("127.0.0.1")
    nursery.start_soon(listener.run)
    offer = listener.offer()
    dialer = await dial("127.0.0.1", offer.fields)
    return dialer, await listener.take(offer), listener


async def read_exactly(link: HopLink, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = await link.read(n - len(got))
        assert chunk, "the link ended early"
        got += chunk
    return got


def test_records_round_trip_both_ways_and_close_like_a_stream() -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            a, b, _ = await linked_pair(nursery)
            await a.write(b"step frame")
            assert await b.read(100) == b"step frame"
            big = bytes(range(256)) * (3 * MAX_RECORD // 256 + 7)  # several records
            nursery.start_soon(b.write, big)
            assert await read_exactly(a, len(big)) == big
            await a.close()  # half-close: b reads the end, and can still answer
            assert await b.read(10) == b""
            await b.write(b"last words")
            assert await a.read(100) == b"last words"
            await b.close()
            assert await a.read(10) == b""
            with pytest.raises(LinkError):
                await a.write(b"after close")
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_sends_from_another_thread_and_from_trio_never_interleave() -> None:
    """The compute thread sends decode outputs itself (send_now) while trio tasks write
    on the same link: every message must arrive whole, each writer's in its order."""

    def message(writer: str, i: int) -> bytes:
        body = f"{writer}:{i}:".encode() + bytes([i % 251]) * (i * 37 % 3000)
        return struct.pack(">I", len(body)) + body

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            a, b, _ = await linked_pair(nursery)
            declined = 0

            def thread_writer() -> None:
                nonlocal declined
                for i in range(300):
                    data = message("thread", i)
                    if not a.send_now(data):  # a trio write holds the socket: write from trio
                        declined += 1
                        trio.from_thread.run(a.write, data)

            async def trio_writer() -> None:
                for i in range(300):
                    await a.write(message("trio", i))
                    if i % 10 == 0:
                        await a.write(bytes(message("big", i)) * 40)  # several records long

            async def writers() -> None:
                async with trio.open_nursery() as inner:
                    inner.start_soon(trio.to_thread.run_sync, thread_writer)
                    inner.start_soon(trio_writer)
                await a.close()

            nursery.start_soon(writers)
            got: dict[str, list[int]] = {"thread": [], "trio": [], "big": []}
            buf = b""
            while chunk := await b.read(1 << 16):
                buf += chunk
                while len(buf) >= 4 and len(buf) >= 4 + (n := struct.unpack(">I", buf[:4])[0]):
                    writer, i, _ = buf[4 : 4 + n].split(b":", 2)
                    assert buf[4 : 4 + n] == message(writer.decode(), int(i))[4:]
                    got[writer.decode()].append(int(i))
                    buf = buf[4 + n :]
            assert buf == b""
            assert got["thread"] == list(range(300)) and got["trio"] == list(range(300))
            assert got["big"] == [i for i in range(0, 300, 10) for _ in range(40)]
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_send_now_never_waits_on_a_slow_reader() -> None:
    """A full socket makes send_now decline at once (the frame then goes through trio,
    which waits without holding up the compute thread), and nothing is lost."""
    frame = bytes(range(256)) * (60_000 // 256)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            a, b, _ = await linked_pair(nursery)
            declined = 0

            def sender() -> None:
                nonlocal declined
                for _ in range(200):  # 12 MB: more than the sockets buffer
                    if not a.send_now(frame):
                        declined += 1
                        trio.from_thread.run(a.write, frame)

            nursery.start_soon(trio.to_thread.run_sync, sender)
            await trio.sleep(0.5)  # the reader is late: the socket fills up
            assert await read_exactly(b, 200 * len(frame)) == frame * 200
            assert declined > 0
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_send_now_declines_at_once_when_the_reader_is_stuck() -> None:
    frame = bytes(60_000)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            a, b, _ = await linked_pair(nursery)

            def fill() -> int:
                sent = 0
                while a.send_now(frame):
                    sent += 1
                return sent

            with trio.fail_after(5):  # it must not wait for the reader
                sent = await trio.to_thread.run_sync(fill)
            assert sent > 0
            # Declined frames sent nothing: the link is whole, and reads what was sent.
            assert await read_exactly(b, sent * len(frame)) == frame * sent
            assert a.send_now(b"more")
            assert await b.read(10) == b"more"
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_send_now_declines_what_it_must_not_send() -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            a, b, _ = await linked_pair(nursery)
            assert not a.send_now(b"")
            assert not a.send_now(bytes(DIRECT_MAX + 1))  # big frames go through trio
            assert a.send_now(b"small")
            assert await b.read(10) == b"small"
            await a.close()
            assert not a.send_now(b"after close")
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_tampered_record_fails_authentication() -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            a, b, _ = await linked_pair(nursery)
            await a.write(b"first")
            assert await b.read(10) == b"first"
            # A record that is the right size but not sealed with the key.
            await a._stream.send_all(struct.pack(">I", 40) + bytes(40))
            with pytest.raises(LinkError, match="authentication"):
                await b.read(10)
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_replayed_record_fails_authentication() -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            sender, b, _ = await linked_pair(nursery)
            await sender.write(b"once")
            # Seal the next record as the dialer would, then send it twice.
            record = struct.pack(">I", 4 + 16)
            sealed = sender._aead.encrypt(struct.pack(">IQ", 0, 1), b"more", None)
            await sender._stream.send_all(record + sealed + record + sealed)
            assert await b.read(10) == b"once"
            assert await b.read(10) == b"more"
            with pytest.raises(LinkError, match="authentication"):
                await b.read(10)
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_an_oversized_record_is_refused_before_reading_it() -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            a, b, _ = await linked_pair(nursery)
            await a._stream.send_all(struct.pack(">I", 1 << 31))
            with pytest.raises(LinkError, match="record of"):
                await b.read(10)
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_tokens_are_single_use_and_unknown_tokens_are_dropped() -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            a, b, listener = await linked_pair(nursery)
            used = listener.offer()
            await dial("127.0.0.1", used.fields)
            await listener.take(used)
            for greeting in (LINK_MAGIC + used.token, LINK_MAGIC + b"\0" * 16, LINK_MAGIC + b"short", used.token + used.token):
                stranger = await trio.open_tcp_stream("127.0.0.1", listener.port)
                await stranger.send_all(greeting)
                if len(greeting) < 32:
                    await stranger.send_eof()
                with trio.fail_after(10):
                    assert await stranger.receive_some(10) == b""
            with pytest.raises(LinkError, match="expired"):
                await listener.take(used)
            # The first link still works.
            await a.write(b"still here")
            assert await b.read(100) == b"still here"
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_strangers_holding_connections_open_cannot_lock_links_out() -> None:
    from shardmesh.mesh.link_offers import MAX_UNIDENTIFIED

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            listener = await LinkListener.bind("127.0.0.1")
            nursery.start_soon(listener.run)
            strangers = [await trio.open_tcp_stream("127.0.0.1", listener.port) for _ in range(MAX_UNIDENTIFIED + 8)]
            await trio.sleep(0.2)  # all of them accepted, none has sent a byte
            offer = listener.offer()
            a = await dial("127.0.0.1", offer.fields)
            b = await listener.take(offer)
            await a.write(b"through")
            assert await b.read(10) == b"through"
            with trio.fail_after(10):  # the oldest strangers were dropped
                assert await strangers[0].receive_some(10) == b""
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_bad_offers_are_refused_without_dialling() -> None:
    async def main() -> None:
        for offer in ({"port": 0, "token": b"t" * 16, "key": b"k" * 32}, {"port": 1, "token": b"t", "key": b"k" * 32}, {}):
            with pytest.raises(LinkError):
                await dial("127.0.0.1", offer)

    trio.run(main)


# -- a chain over links ---------------------------------------------------------------


@pytest.fixture(scope="module")
def model_path() -> Path:
    return cached_tiny_model("llama", layers=4, hidden=64)


@pytest.fixture(scope="module")
def expected(model_path: Path) -> list[int]:
    return Transformers(model_path).greedy_forwards(PROMPT, 8)


def new_key():
    from libp2p.crypto.ed25519 import create_new_key_pair

    return create_new_key_pair()


async def two_hop_chain(model_path: Path, second_port: str = "its own") -> dict:
    """Gateway -> [0, 2) -> [2, 4) -> gateway, with links offered by both hops. The
    second hop's offers name ``second_port``: "its own", "closed" (nobody listens), or
    "foreign" (a server that accepts and says nothing, like a wrong NAT forward)."""
    files = resolve(str(model_path))
    stages = [await compute_thread().run(lambda a=a: TorchStage(files, a, a + 2, dtype="float32")) for a in (0, 2)]
    async with (
        running_host(new_key(), LOCAL) as h1,
        running_host(new_key(), LOCAL) as h2,
        running_host(new_key(), LOCAL) as gateway,
        trio.open_nursery() as nursery,
    ):
        servers = []
        for host, stage in ((h1, stages[0]), (h2, stages[1])):
            batcher = StepBatcher(stage)
            await nursery.start(batcher.run)
            listener = await LinkListener.bind("127.0.0.1")
            if host is h2 and second_port == "closed":
                for sock_listener in listener._listeners:
                    await sock_listener.aclose()
            else:
                nursery.start_soon(listener.run)
            if host is h2 and second_port == "foreign":
                listener.port = (await nursery.start(trio.serve_tcp, lambda stream: trio.sleep_forever(), 0))[0].socket.getsockname()[1]
            server = HopServer(host, StageHopCompute(batcher), MODEL_ID, 4, 2048, links=Links(listener))
            await nursery.start(server.run)
            servers.append(server)
        for host in (gateway, h1):
            for target in (h1, h2):
                if host is not target:
                    await host.connect(target.addrs()[0])
        me = HopServer(gateway, None, MODEL_ID, 4, 2048, links=Links())
        await nursery.start(me.run)
        failures = []
        for attempt in range(3):  # an unconfirmed link fails its chain; the next one avoids it
            chain = RemoteChain(
                nursery=nursery, open_stream=me.open_stream, route=[Hop(h1.peer_id_str, 0, 2), Hop(h2.peer_id_str, 2, 4)],
                session_id=f"s-{attempt}", model_id=MODEL_ID, gateway=gateway.peer_id_str, sampling={"temperature": 0.0},
                prompt_ids=PROMPT, links=me.links, issuer=TicketIssuer(gateway.peer_id_str, gateway.key_pair),
            )
            try:
                await chain.open(64)
                break
            except ChainFailed as exc:
                failures.append(exc.code)
                await chain.close()
        first = await chain.step(PROMPT, 0, True)
        tokens = [first.token_id]
        for i in range(7):
            tokens.append((await chain.step([tokens[-1]], len(PROMPT) + i, True)).token_id)
        result = {
            "tokens": tokens,
            "first": type(chain._first.stream).__name__,
            "last": type(chain._last.stream).__name__,
            "h1 may dial h2": servers[0].links.may_dial(h2.peer_id_str),
            "gateway may dial h2": me.links.may_dial(h2.peer_id_str),
            "spent": first.spent,
            "failed opens": failures,
        }
        await chain.close()
        with trio.fail_after(10):
            while any(s.sessions for s in servers) or any(s.links.listener._offers for s in servers):
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    return result


def test_a_chain_over_links_equals_transformers_and_cleans_up(model_path: Path, expected: list[int]) -> None:
    got = trio.run(two_hop_chain, model_path)
    assert got["tokens"] == expected and got["failed opens"] == []
    assert got["first"] == got["last"] == "HopLink"
    assert got["spent"] is not None and got["spent"] > 0  # both hops' compute seconds, reported back


def test_an_unreachable_link_port_leaves_the_session_on_libp2p(model_path: Path, expected: list[int]) -> None:
    got = trio.run(two_hop_chain, model_path, "closed")
    assert got["tokens"] == expected and got["failed opens"] == []
    assert got["first"] == "HopLink"  # the first hop's links work
    assert got["last"] != "HopLink"  # the gateway's attach to the second hop stayed on libp2p
    assert not got["h1 may dial h2"] and not got["gateway may dial h2"]  # not tried again soon


def test_a_link_that_is_never_confirmed_fails_once_then_libp2p_is_used(model_path: Path, expected: list[int]) -> None:
    """The second hop's link port leads somewhere else: the dial works, but no node
    confirms. The chain that tried fails (it had already left its libp2p stream); that
    peer's link port is then avoided, and the chain after it works over libp2p."""
    got = trio.run(two_hop_chain, model_path, "foreign")
    assert got["tokens"] == expected
    assert 1 <= len(got["failed opens"]) <= 2  # the first hop's dial, then maybe the gateway's attach
    assert got["last"] != "HopLink"
    assert not got["h1 may dial h2"] and not got["gateway may dial h2"]
