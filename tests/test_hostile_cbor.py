"""Issue 17's CBOR bomb, sent to a real node by a hostile libp2p peer.

The node is a real ``shardmesh run`` process (a tiny 4-block Llama, its gateway on).
The hostile peer is a real libp2p host that speaks ``/shardmesh/infer/1.0.0`` the way
docs/PROTOCOL.md describes it (its frames are packed here with ``struct`` and cbor2,
not with shardmesh's wire module), and does three things:

1. sends an ``open`` of a few hundred bytes whose ``model`` is a shared-reference DAG
   (CBOR tags 28/29, 2**24 leaves). A node that decodes it and then quotes the field
   in its ``wrong_model`` error spends seconds to minutes and a gigabyte on the
   ``repr``; the node must answer ``bad_frame`` at once instead;
2. sends the same DAG as an unknown field of an otherwise valid ``open``, which a
   node would otherwise re-encode whole to forward it: ``bad_frame`` again;
3. acts as the *next hop* of a valid ``open`` carrying a plain unknown field and
   extra fields in its hops, and checks that the node forwards only what
   docs/PROTOCOL.md 6.2 names.

Around the attacks, an honest greedy chat through the node's gateway must give the
same text, and the node's peak RSS (``VmHWM``) may grow by at most
:data:`PEAK_RSS_BOUND`; the test prints what it measured. Every wait is bounded, so
a node that freezes fails the test instead of hanging it.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from node_process import Node, greedy_chat, memory_bytes, start_node, stop_node

from shardmesh.mesh.gateway_ticket import TicketIssuer
from shardmesh.mesh.host import running_host

pytestmark = pytest.mark.slow

INFER = "/shardmesh/infer/1.0.0"
SWARM = "/shardmesh/swarm/1.0.0"
LOCAL = ["/ip4/127.0.0.1/tcp/0"]
BLOCKS = 4
LEVELS = 24  # 2**24 leaves: the repr of such a field takes about a gigabyte and many seconds
PEAK_RSS_BOUND = 100 << 20  # bytes the node's peak RSS may grow by during the attacks
REPLY_WITHIN = 60.0  # a hang guard, not a speed test: a fixed node answers in milliseconds
KNOWN_OPEN_FIELDS = {"t", "session", "model", "gateway", "ticket", "route", "max_length", "sampling", "n_prompt", "nbytes", "link"}
MESSAGES = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. Tell me more."}]


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    from shardmesh.tools.tiny_model import cached_tiny_model

    model: Path = cached_tiny_model("llama", layers=BLOCKS, hidden=64)
    node = start_node(model)
    try:
        yield node
    finally:
        stop_node(node)
        print(f"---- node output ----\n{node.output()[-4000:]}")


def dag(levels: int, leaf: str = "x" * 8) -> Any:
    value: Any = leaf
    for _ in range(levels):
        value = [value, value]
    return value


# ---- frames, as docs/PROTOCOL.md 6.1 writes them ---------------------------------------


def frame(head: bytes, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(head)) + head + payload


class Frames:
    """Reads frames off a libp2p stream. Reads take whatever has arrived (up to 64 KiB)
    into a buffer: a node sends an error frame and then resets the stream, and
    py-libp2p drops what is still unread when the reset arrives."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.buf = b""

    async def take(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = await self.stream.read(1 << 16)
            if not chunk:
                raise EOFError(f"stream ended with {len(self.buf)} of {n} bytes")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    async def read(self) -> dict[str, Any]:
        (length,) = struct.unpack(">I", await self.take(4))
        header = cbor2.loads(await self.take(length))
        if header.get("nbytes"):
            await self.take(header["nbytes"])
        return header


async def reply_to(stream: Any) -> dict[str, Any] | None:
    """The first frame the node sends back; None if none came within :data:`REPLY_WITHIN`,
    or if the stream (or the whole connection) ended first: both are a frozen node's
    doing, and the test should say so rather than crash."""
    with trio.move_on_after(REPLY_WITHIN):
        try:
            return await Frames(stream).read()
        except Exception as exc:  # StreamEOF, StreamReset, EOFError
            print(f"no reply: {type(exc).__name__}: {exc}")
            return None
    print(f"no reply within {REPLY_WITHIN:.0f} s")
    return None


# ---- the attacks ---------------------------------------------------------------------


async def attack(node: Node) -> dict[str, Any]:
    """Everything the hostile peer does; what it saw, for the test to check."""
    seen: dict[str, Any] = {}
    forwarded = trio.Event()
    with trio.fail_after(5 * REPLY_WITHIN):  # the whole attack, should a connect or stream open hang
        return await _attack(node, seen, forwarded)


async def _attack(node: Node, seen: dict[str, Any], forwarded: trio.Event) -> dict[str, Any]:
    async with running_host(create_new_key_pair(), LOCAL) as me:
        target = await me.connect(node.address)

        async def next_hop(stream: Any) -> None:
            """Play the next hop: keep the open the node forwards, and refuse it."""
            seen["forwarded"] = await Frames(stream).read()
            error = {"t": "error", "code": "not_serving", "message": "hostile next hop", "peer": me.peer_id_str}
            await stream.write(frame(cbor2.dumps(error)))
            await stream.close()
            forwarded.set()

        me.set_handler(INFER, next_hop)
        stream = await me.open_stream(target, SWARM)
        swarm = await reply_to(stream)
        assert swarm is not None, "the node did not send its swarm map"
        model_id = swarm["model"]

        def open_header(**fields: Any) -> dict[str, Any]:
            return {
                "t": "open", "session": "bomb", "model": model_id, "gateway": me.peer_id_str,
                "route": [{"peer": node.peer_id, "start": 0, "end": BLOCKS}], "max_length": 16,
                "sampling": {"temperature": 0.0}, "n_prompt": 0, **fields,
            }

        # 1. The bomb as the model id: the node would quote it in its wrong_model error.
        bomb = cbor2.dumps(open_header(model=dag(LEVELS)), value_sharing=True)
        seen["bomb_bytes"] = len(bomb)
        stream = await me.open_stream(target, INFER)
        await stream.write(frame(bomb))
        seen["bomb_reply"] = await reply_to(stream)
        if seen["bomb_reply"] is None:
            return seen  # the node froze: nothing more to learn from it

        # 2. The bomb as an unknown field: the node would re-encode it to forward it.
        route = [{"peer": node.peer_id, "start": 0, "end": 2}, {"peer": me.peer_id_str, "start": 2, "end": BLOCKS}]
        stream = await me.open_stream(target, INFER)
        await stream.write(frame(cbor2.dumps(open_header(route=route, extra=dag(LEVELS)), value_sharing=True)))
        seen["extra_bomb_reply"] = await reply_to(stream)

        # 3. A plain unknown field and hop extras, with us as the next hop.
        route = [{**route[0], "via": "somewhere"}, {**route[1], "weight": [1, 2, 3]}]
        stream = await me.open_stream(target, INFER)
        plain = TicketIssuer(me.peer_id_str, me.key_pair).sign_open(open_header(session="plain", route=route, extra="x" * 1000), time.time())
        await stream.write(frame(cbor2.dumps(plain)))
        seen["plain_reply"] = await reply_to(stream)
        with trio.move_on_after(REPLY_WITHIN):
            await forwarded.wait()
    return seen


def test_the_cbor_bomb_costs_the_node_nothing(node: Node) -> None:
    before = greedy_chat(node, MESSAGES)
    peak_before = memory_bytes(node.proc.pid, "VmHWM")
    seen = trio.run(attack, node)
    peak_after = memory_bytes(node.proc.pid, "VmHWM")
    after = greedy_chat(node, MESSAGES)
    grew = peak_after - peak_before
    print(
        f"bomb open: {seen['bomb_bytes']} bytes; node peak RSS {peak_before / 2**20:.0f} MiB -> "
        f"{peak_after / 2**20:.0f} MiB (+{grew / 2**20:.1f} MiB, bound {PEAK_RSS_BOUND / 2**20:.0f} MiB)"
    )
    assert seen["bomb_bytes"] <= 422, "the bomb is no bigger than issue 17's"
    assert seen["bomb_reply"] is not None, "no answer to the bomb: the node froze (see above)"

    for name in ("bomb_reply", "extra_bomb_reply"):
        reply = seen[name]
        assert reply is not None and reply["t"] == "error" and reply["code"] == "bad_frame", (name, reply)
        assert isinstance(reply["message"], str) and len(reply["message"]) < 500, (name, reply)
    assert grew <= PEAK_RSS_BOUND, f"the node's peak RSS grew by {grew / 2**20:.0f} MiB"

    # The valid open reached us as the next hop with only the fields the protocol names,
    # and our refusal came back with the peer that refused.
    assert "forwarded" in seen, "the node did not forward the valid open to us"
    sent_on = seen["forwarded"]
    assert set(sent_on) <= KNOWN_OPEN_FIELDS, sent_on.keys()
    plain_reply = seen["plain_reply"]
    assert plain_reply is not None and plain_reply["code"] == "not_serving", plain_reply
    assert sent_on["route"] == [{"peer": plain_reply["peer"], "start": 2, "end": BLOCKS}], sent_on["route"]

    assert after == before, "the node answers an honest greedy chat as it did before the attack"
