"""Issue 17, item 6: idle sessions from free identities cannot starve honest chains,
and a node gives its KV-cache memory back when sessions end.

Real node processes: M serves blocks [0, 2) and the OpenAI API, B serves [2, 4). The
attacker, written here from docs/PROTOCOL.md 6.2 on real libp2p hosts, opens sessions
at M over the route M -> B and leaves them idle:

* one identity gets at most ``max_sessions_per_gateway`` (16) of them at M;
* four identities get 64, which is B's limit for sessions coming from M. Before the
  fix every honest chain through M -> B was then refused for the idle timeout (five
  minutes, renewable); now B reclaims the session idle longest for the newcomer, once
  it has been idle RECLAIM_IDLE seconds, and the honest chat gets the reference text.

A node on the bench model then runs eight long prompts at once: its RSS must come back
to near where it was after one short chat (before: +600 MB that stayed).
"""

from __future__ import annotations

import threading
import time
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from node_process import Node, memory_bytes, start_node, start_two_hop_swarm, stop_node

from shardmesh.mesh.gateway_ticket import TicketIssuer
from shardmesh.mesh.host import running_host
from shardmesh.mesh.open_request import Limits
from shardmesh.mesh.reclaim import RECLAIM_IDLE
from shardmesh.mesh.wire import PROTOCOL, FrameStream
from shardmesh.tools.tiny_model import cached_tiny_model

pytestmark = pytest.mark.slow

LOCAL = ["/ip4/127.0.0.1/tcp/0"]
MESSAGES = [{"role": "user", "content": "Tell me about foxes."}]
RSS_BOUND = 200 << 20  # bytes a node may stay above its warm RSS after its sessions end


@pytest.fixture(scope="module")
def swarm(tmp_path_factory) -> Iterator[tuple[Node, Node]]:
    nodes = start_two_hop_swarm(cached_tiny_model("llama", layers=4, hidden=64), tmp_path_factory.mktemp("keys"))
    try:
        yield nodes[0], nodes[1]
    finally:
        for node in nodes:
            stop_node(node)
        for node in nodes:
            print(f"---- node output ({' '.join(node.proc.args[-6:])}) ----\n{node.output()[-3000:]}")


def chat(node: Node) -> httpx.Response:
    body = {"model": httpx.get(f"{node.url}/v1/models", timeout=10).json()["data"][0]["id"],
            "messages": MESSAGES, "max_tokens": 8, "temperature": 0}
    return httpx.post(f"{node.url}/v1/chat/completions", json=body, timeout=120)


async def idle_sessions(m: Node, b: Node, model: str, identities: int, per_identity: int, holding: trio.Event,
                        answers: list[str]) -> None:  # fmt: skip
    """``identities`` fresh hosts each open ``per_identity`` sessions at M over M -> B,
    record each answer (``ok`` or the error code), and keep them open until ``holding``."""
    async with trio.open_nursery() as nursery:
        for i in range(identities):
            nursery.start_soon(_one_identity, m, b, model, i, per_identity, holding, answers)


async def _one_identity(m: Node, b: Node, model: str, i: int, count: int, holding: trio.Event, answers: list[str]) -> None:
    async with running_host(create_new_key_pair(), LOCAL) as host:
        await host.connect(m.address)
        streams = []
        for n in range(count):
            fs = FrameStream(await host.open_stream(ID.from_base58(m.peer_id), PROTOCOL))
            route = [{"peer": m.peer_id, "start": 0, "end": 2}, {"peer": b.peer_id, "start": 2, "end": 4}]
            header = {"t": "open", "session": f"idle-{host.peer_id_str[-12:]}-{n}", "model": model, "gateway": host.peer_id_str,
                      "route": route, "max_length": 64, "sampling": {"temperature": 0.0}, "n_prompt": 3}  # fmt: skip
            await fs.write(TicketIssuer(host.peer_id_str, host.key_pair).sign_open(header, time.time()), array("q", [1, 2, 3]).tobytes())
            with trio.fail_after(30):
                reply = await fs.read_frame()
            answers.append("ok" if reply.header.get("ok") is True else str(reply.header.get("code")))
            streams.append(fs)
        await holding.wait()
        for fs in streams:
            await fs.stream.reset()


def test_idle_sessions_of_free_identities_cannot_starve_honest_chains(swarm: tuple[Node, Node]) -> None:
    m, b = swarm
    expected = chat(m).json()["choices"][0]["message"]["content"]
    model = httpx.get(f"{m.url}/v1/swarm", timeout=10).json()["model"]
    limits = Limits()

    async def main() -> tuple[list[str], list[str], httpx.Response]:
        one, many = [], []
        holding = trio.Event()
        async with trio.open_nursery() as nursery:
            # One identity: its 17th session is refused at M, whatever B would say.
            nursery.start_soon(idle_sessions, m, b, model, 1, limits.max_sessions_per_gateway + 1, holding, one)
            with trio.fail_after(60):
                while len(one) < limits.max_sessions_per_gateway + 1:
                    await trio.sleep(0.1)
            # Three more: together 64 sessions from M at B, its limit for M.
            per = limits.max_sessions_per_peer // 4
            nursery.start_soon(idle_sessions, m, b, model, 3, per, holding, many)
            with trio.fail_after(120):
                while len(many) < 3 * per:
                    await trio.sleep(0.1)
            await trio.sleep(RECLAIM_IDLE + 1)  # every attacking session is now idle long enough
            reply = await trio.to_thread.run_sync(chat, m)
            holding.set()
        return one, many, reply

    one, many, reply = trio.run(main)
    assert one == ["ok"] * limits.max_sessions_per_gateway + ["too_many_sessions"], one
    assert many.count("ok") == len(many), many
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == expected
    assert "reclaimed" in b.output(), "B admitted the honest chain without reclaiming an idle session"


def test_a_node_gives_its_kv_memory_back_when_sessions_end(tmp_path: Path) -> None:
    from shardmesh.tools.bench_common import BENCH_MODEL

    node = start_node(cached_tiny_model(**BENCH_MODEL), "--dtype", "float32", key_dir=tmp_path)
    try:
        mid = httpx.get(f"{node.url}/v1/models", timeout=10).json()["data"][0]["id"]

        def one(content: str) -> Any:
            body = {"model": mid, "messages": [{"role": "user", "content": content}], "max_tokens": 2, "temperature": 0}
            return httpx.post(f"{node.url}/v1/chat/completions", json=body, timeout=300).raise_for_status()

        one("hi")  # every weight touched once: the RSS a warm node holds
        time.sleep(1)
        warm = memory_bytes(node.proc.pid)
        long_prompt = " ".join(f"word{i}" for i in range(600))
        done: list[Any] = []
        threads = [threading.Thread(target=lambda: done.append(one(long_prompt))) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(done) == 8, "a long prompt failed"
        time.sleep(2)
        after = memory_bytes(node.proc.pid)
        print(f"RSS warm {warm / 2**20:.0f} MB, after eight 600-token prompts ended {after / 2**20:.0f} MB")
        assert after - warm < RSS_BOUND
    finally:
        stop_node(node)
