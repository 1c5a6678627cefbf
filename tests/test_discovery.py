"""Discovery: --join, reconnecting to restarted peers, add_known, and mDNS.

Real libp2p hosts on 127.0.0.1, several in one trio.run. mDNS runs only inside a
network namespace this file creates, so no multicast leaves the test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from netns import network_namespace

from shardmesh.mesh.addresses import parse_join_address
from shardmesh.mesh.discovery import Discovery, backoff
from shardmesh.mesh.host import MeshHost, peer_id_of, running_host

LOCAL = "/ip4/127.0.0.1/tcp/0"
TEST_TIMEOUT = 40.0  # each trio test as a whole; the asserts below use tighter deadlines


@dataclass
class Running:
    """A host served in a nursery task, which a test can stop (as if the process died)."""

    mesh: MeshHost
    scope: trio.CancelScope
    done: trio.Event

    @property
    def addr(self) -> str:
        return str(self.mesh.addrs()[0])

    @property
    def port(self) -> int:
        return int(self.addr.split("/tcp/")[1].split("/")[0])

    async def stop(self) -> None:
        self.scope.cancel()
        await self.done.wait()


async def start_host(nursery: trio.Nursery, key_pair=None, listen: str = LOCAL) -> Running:
    key_pair = key_pair or create_new_key_pair()

    async def serve(task_status=trio.TASK_STATUS_IGNORED) -> None:
        done = trio.Event()
        try:
            with trio.CancelScope() as scope:
                async with running_host(key_pair, [listen]) as mesh:
                    try:
                        task_status.started(Running(mesh, scope, done))
                        await trio.sleep_forever()
                    finally:
                        # py-libp2p 0.8.1: leaving host.run() leaves the TCP listener
                        # open (it lives in a system task); close() really closes it.
                        with trio.CancelScope(shield=True), trio.move_on_after(5):
                            await mesh.host.close()
        finally:
            done.set()

    return await nursery.start(serve)


async def start_discovery(nursery: trio.Nursery, mesh: MeshHost, join: list[str], **kw) -> Discovery:
    kw.setdefault("retry_interval", 0.3)
    discovery = Discovery(mesh, join, mdns=False, **kw)
    await nursery.start(discovery.run)
    return discovery


async def wait_until(predicate, timeout: float, what: str) -> float:
    """Poll ``predicate`` until true; returns the seconds it took, fails the test after ``timeout``."""
    start = trio.current_time()
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.05)
        return trio.current_time() - start
    pytest.fail(f"{what}: not within {timeout} s")


def run(test_body) -> None:
    async def main() -> None:
        with trio.fail_after(TEST_TIMEOUT):
            async with trio.open_nursery() as nursery:
                await test_body(nursery)
                nursery.cancel_scope.cancel()

    trio.run(main)


# ---- join ----------------------------------------------------------------------------


def test_join_connects_and_sets_bootstrapped():
    async def body(nursery):
        a = await start_host(nursery)
        b = await start_host(nursery)
        da = await start_discovery(nursery, a.mesh, [])
        assert await da.wait_bootstrapped(0), "no --join: a new swarm is bootstrapped at once"

        t0 = trio.current_time()
        db = await start_discovery(nursery, b.mesh, [a.addr])
        assert trio.current_time() - t0 < 0.5, "run() must not block startup on bootstrap"
        assert await db.wait_bootstrapped(10), "B did not connect to its join peer"
        assert a.mesh.peer_id_str in db.connected()
        await wait_until(lambda: b.mesh.peer_id_str in da.connected(), 5, "A sees B")
        assert da.known_peers() == {}, "A was given nobody to dial"

    run(body)


class _FakeMesh:
    """Enough of a MeshHost for the checks that need no network."""

    # A fixed key: the peer id appears in test ids, which pytest-xdist workers must agree on.
    peer_id_str = peer_id_of(create_new_key_pair(b"\x01" * 32)).to_base58()


@pytest.mark.parametrize(
    "address",
    [
        "/ip4/127.0.0.1/tcp/4001",  # no /p2p/<peer id>
        "127.0.0.1:4001",  # not a multiaddr
        "/ip4/127.0.0.1/tcp/4001/p2p/not-a-peer-id",
        f"/p2p/{_FakeMesh.peer_id_str}",  # a peer id but nowhere to dial
        "/ip4/999.0.0.1/tcp/4001/p2p/" + _FakeMesh.peer_id_str,
    ],
)
def test_bad_join_address_is_a_clear_error(address):
    good = f"/ip4/127.0.0.1/tcp/4001/p2p/{peer_id_of(create_new_key_pair()).to_base58()}"
    with pytest.raises(ValueError) as info:
        Discovery(_FakeMesh(), [good, address], mdns=False)
    assert address in str(info.value)


def test_join_list_may_name_this_node():
    me = f"/ip4/127.0.0.1/tcp/4001/p2p/{_FakeMesh.peer_id_str}"
    assert parse_join_address(me) == (_FakeMesh.peer_id_str, me)
    d = Discovery(_FakeMesh(), [me], mdns=False)
    assert d.known_peers() == {} and d.bootstrapped.is_set()


def test_join_peer_that_starts_later_is_reached():
    async def body(nursery):
        key_b = create_new_key_pair()
        b = await start_host(nursery, key_b)  # only to learn a free port
        b_addr, b_port = b.addr, b.port
        await b.stop()

        a = await start_host(nursery)
        da = await start_discovery(nursery, a.mesh, [b_addr])
        # A's first dials fail, which also puts B in py-libp2p's negative dial cache.
        assert not await da.wait_bootstrapped(1.0)
        assert da.known_peers()[b.mesh.peer_id_str].failures >= 1

        await start_host(nursery, key_b, f"/ip4/127.0.0.1/tcp/{b_port}")
        assert await da.wait_bootstrapped(10), "A never reached its join peer once it came up"

    run(body)


# ---- reconnect ------------------------------------------------------------------------


def test_restarted_join_peer_on_same_port_is_reconnected():
    async def body(nursery):
        key_b = create_new_key_pair()
        b = await start_host(nursery, key_b)
        a = await start_host(nursery)
        da = await start_discovery(nursery, a.mesh, [b.addr])
        assert await da.wait_bootstrapped(10)
        b_id, port = b.mesh.peer_id_str, b.port

        await b.stop()
        await wait_until(lambda: b_id not in da.connected(), 5, "A notices B is gone")
        await trio.sleep(1.0)  # A fails a few dials meanwhile: back-off and negative cache

        # The same identity on the same port, with no Discovery of its own: only A can dial.
        b2 = await start_host(nursery, key_b, f"/ip4/127.0.0.1/tcp/{port}")
        took = await wait_until(lambda: b_id in da.connected(), 8, "A reconnects to restarted B")
        assert a.mesh.peer_id_str in {p.to_base58() for p in b2.mesh.connected_peers()}
        print(f"reconnected in {took:.2f} s")

    run(body)


def test_restarted_known_peer_on_new_port_is_reconnected():
    """add_known with new addresses reaches a peer that moved (stale peerstore entries)."""

    async def body(nursery):
        key_b = create_new_key_pair()
        b = await start_host(nursery, key_b)
        a = await start_host(nursery)
        da = await start_discovery(nursery, a.mesh, [])
        b_id = b.mesh.peer_id_str
        assert da.add_known(b_id, [b.addr])
        await wait_until(lambda: b_id in da.connected(), 8, "A dials a peer given by add_known")

        old_port = b.port
        await b.stop()
        await wait_until(lambda: b_id not in da.connected(), 5, "A notices B is gone")
        b2 = await start_host(nursery, key_b)  # a new port
        assert b2.port != old_port
        # As the registry would, from B's new signed record (without /p2p/: also accepted).
        da.add_known(b_id, [b2.addr.split("/p2p/")[0]])
        took = await wait_until(lambda: b_id in da.connected(), 8, "A reaches B at its new port")
        print(f"reconnected in {took:.2f} s")

    run(body)


def test_backoff_doubles_up_to_the_cap():
    assert [backoff(n, 5.0, 30.0) for n in range(1, 7)] == [5.0, 10.0, 20.0, 30.0, 30.0, 30.0]


def test_unreachable_known_peer_backs_off_then_is_forgotten_but_join_peers_stay():
    async def body(nursery):
        dead = await start_host(nursery)
        dead_addr, dead_id = dead.addr, dead.mesh.peer_id_str
        await dead.stop()
        dead2 = await start_host(nursery)
        dead2_addr, dead2_id = dead2.addr, dead2.mesh.peer_id_str
        await dead2.stop()

        a = await start_host(nursery)
        da = await start_discovery(nursery, a.mesh, [dead2_addr], retry_interval=0.2, max_backoff=0.8, forget_after=2.0)
        da.add_known(dead_id, [dead_addr])
        await wait_until(lambda: da.known_peers()[dead_id].failures >= 2, 5, "A retries a dead known peer")
        peer = da.known_peers()[dead_id]
        assert peer.failing_since is not None
        await wait_until(lambda: dead_id not in da.known_peers(), 8, "A forgets an unreachable known peer")
        assert dead2_id in da.known_peers(), "join peers are never forgotten"
        assert da.known_peers()[dead2_id].failures >= 2
        assert not da.bootstrapped.is_set()

    run(body)


def test_add_known_ignores_bad_input():
    d = Discovery(_FakeMesh(), [], mdns=False)
    other = peer_id_of(create_new_key_pair()).to_base58()
    third = peer_id_of(create_new_key_pair()).to_base58()
    assert d.add_known("not a peer id", ["/ip4/127.0.0.1/tcp/1"]) is False
    assert d.add_known(_FakeMesh.peer_id_str, ["/ip4/127.0.0.1/tcp/1"]) is False  # ourselves
    assert d.add_known(other, ["garbage", f"/ip4/127.0.0.1/tcp/1/p2p/{third}"]) is False
    assert d.known_peers() == {}
    assert d.add_known(other, ["garbage", "/ip4/10.0.0.7/tcp/4001", "/ip4/127.0.0.1/tcp/4001"]) is True
    assert d.known_peers()[other].addrs == [
        f"/ip4/10.0.0.7/tcp/4001/p2p/{other}",
        f"/ip4/127.0.0.1/tcp/4001/p2p/{other}",  # loopback last
    ]
    # mDNS answers are unauthenticated: a public address in one is not dialled.
    assert d._add(third, ["/ip4/8.8.8.8/tcp/4001"], "mdns") is False
    assert d._add(third, ["/ip4/192.168.1.9/tcp/4001"], "mdns") is True


def test_mdns_failure_is_logged_and_the_node_goes_on(monkeypatch, caplog):
    """No multicast (or port 5353 refused) must not take the node down; no real mDNS here."""
    from shardmesh.mesh.mdns import MdnsService

    def fail(self):
        raise OSError("no multicast here (test)")

    monkeypatch.setattr(MdnsService, "start", fail)

    async def body(nursery):
        a = await start_host(nursery)
        b = await start_host(nursery)
        db = Discovery(b.mesh, [a.addr], mdns=True, retry_interval=0.3)
        await nursery.start(db.run)
        assert await db.wait_bootstrapped(10), "join still works without mDNS"

    run(body)
    assert "mDNS disabled: OSError: no multicast here (test)" in caplog.text


# ---- mDNS (inside a network namespace only) ------------------------------------------

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def netns():
    """A throwaway network namespace with multicast on loopback; deleted afterwards."""
    with network_namespace("the mDNS test", multicast=True) as name:
        yield name


@dataclass
class PeerProcess:
    proc: subprocess.Popen
    lines: list[str]

    def value(self, tag: str) -> list[str]:
        return [line.split()[1] for line in list(self.lines) if line.startswith(tag + " ")]


def _start_peer(ns: str) -> PeerProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, str(REPO / "tests" / "mdns_peer.py"), "--lifetime", "60"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        env=env,
    )
    lines: list[str] = []

    def pump() -> None:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()
    return PeerProcess(proc, lines)


@pytest.mark.slow
def test_mdns_peers_find_each_other_without_join(netns):
    peers = [_start_peer(netns), _start_peer(netns)]
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ids = [p.value("ID") for p in peers]
            if all(ids) and ids[1][0] in peers[0].value("CONNECTED") and ids[0][0] in peers[1].value("CONNECTED"):
                break
            if any(p.proc.poll() is not None for p in peers):
                break
            time.sleep(0.1)
        else:
            pass
        ids = [p.value("ID") for p in peers]
        report = "\n".join(f"--- peer {i}:\n" + "\n".join(p.lines) for i, p in enumerate(peers))
        assert all(ids), f"a peer did not start:\n{report}"
        assert ids[1][0] in peers[0].value("CONNECTED"), f"peer 0 never connected to peer 1:\n{report}"
        assert ids[0][0] in peers[1].value("CONNECTED"), f"peer 1 never connected to peer 0:\n{report}"

        for p in peers:  # closing stdin asks for a clean stop (mDNS goodbye, host close)
            p.proc.stdin.close()
        for p in peers:
            assert p.proc.wait(timeout=15) == 0, report
        time.sleep(0.1)
        for p in peers:
            assert "STOPPED" in p.lines, "\n".join(p.lines)
            # mDNS start (~1.6 s of blocking zeroconf work) must not stall the event loop.
            gap_ms = int(p.value("LOOP_MAX_GAP_MS")[0])
            assert gap_ms < 500, f"event loop stalled {gap_ms} ms while mDNS started"
    finally:
        for p in peers:
            if p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait(timeout=10)
