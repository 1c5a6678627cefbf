"""``shardmesh bench --internet``: the internet case, on an emulated internet (as root).

Built from network namespaces (:mod:`.emulated_internet`): public hosts on a shared
segment, and homes each behind its own NAT router. Everything runs on this machine, so
the links add no delay of their own: the figures show what relaying and NAT cost in
set-up and in per-hop work, not distance (``bench --wan`` adds delay). Figures:

* **connection set-up**: a fresh identity dials a public node (TCP, Noise, Yamux), and a
  home node at its circuit address (the same to its relay, then ``CONNECT`` and Noise
  and Yamux again through it); the median of several dials. And from a node in one
  home to a node in another: from the relayed connection up to the direct one hole
  punching makes (both homes behind cone NATs that drop what nobody asked for).
* **decode tokens/s of a 3-hop chain** of the bench model, from a gateway's streamed
  answer: every hop public (direct connections and hop links), and every hop in a home
  of its own behind a NAT with the gateway in a fourth (every hop reached through the
  one public relay, sessions on their libp2p streams).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from .emulated_internet import Host, Internet, can_build
from .node_processes import NodeProcess, start_node, stop_all, wait_gateway, wait_serving

SPANS = ["0:4", "4:8", "8:12"]
DIALS = 7

SETUP = """
import statistics, sys, time, trio
from libp2p.crypto.ed25519 import create_new_key_pair
from shardmesh.mesh.host import running_host

async def main(address, n):
    times = []
    for _ in range(n):
        async with running_host(create_new_key_pair(), []) as me:
            t0 = time.perf_counter()
            await me.connect(address)
            times.append(time.perf_counter() - t0)
    print(statistics.median(times) * 1000)

trio.run(main, sys.argv[1], int(sys.argv[2]))
"""

PUNCH = """
import statistics, sys, time, trio
from libp2p.crypto.ed25519 import create_new_key_pair
from shardmesh.mesh.hole_punch import HolePunching
from shardmesh.mesh.host import running_host

async def main(listen, circuit, peer, n):
    times = []
    for _ in range(n):
        async with running_host(create_new_key_pair(), [listen]) as me, trio.open_nursery() as nursery:
            await nursery.start(HolePunching(me).run)
            await me.connect(circuit)
            t0 = time.perf_counter()
            with trio.move_on_after(30):
                while me.connection_kind(peer) != "direct":
                    await trio.sleep(0.01)
            if me.connection_kind(peer) == "direct":
                times.append(time.perf_counter() - t0)
            nursery.cancel_scope.cancel()
    print(statistics.median(times) * 1000 if times else -1)

trio.run(main, sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
"""

RATE = """
import sys, time, httpx, trio
from shardmesh.tools.bench_common import http_decode_rate

url, tokens, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
deadline = time.monotonic() + 120
while httpx.get(url + "/health", timeout=5).status_code != 200:  # a complete chain
    assert time.monotonic() < deadline, "no complete chain within 120 s"
    time.sleep(1)
name = httpx.get(url + "/v1/models", timeout=5).json()["data"][0]["id"]
prompt = "The history of the fox, told in many parts: " * 3
print(max(trio.run(http_decode_rate, url, name, prompt, tokens) for _ in range(repeats)))
"""


def _python_on(host: Host, code: str, *args: str, timeout: float = 600) -> float:
    done = subprocess.run([*host.exec, sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return float(done.stdout.strip().splitlines()[-1])


WAIT_CIRCUIT = """
import httpx, sys, time
url, peer = sys.argv[1], sys.argv[2]
deadline = time.monotonic() + 60  # a NAT that drops the dial-back makes the verdict wait out a dial timeout
while time.monotonic() < deadline:
    peers = {p["peer"]: p for p in httpx.get(url + "/v1/swarm", timeout=5).json()["peers"]}
    if any("/p2p-circuit/" in a for a in peers.get(peer, {}).get("addrs", [])):
        print(1)
        break
    time.sleep(0.5)
else:
    print(0)
"""


def _wait_for_circuit(host: Host, node: NodeProcess, peer: str) -> None:
    """Until ``node``'s view (asked on ``host``) shows ``peer`` with a relay address."""
    if not _python_on(host, WAIT_CIRCUIT, node.url, peer):
        raise RuntimeError(f"{peer} published no relay address within 60 s")


def _node(path: Path, host: Host, layers: str, dtype: str, keys: Path, join: str | None, api: bool = False) -> NodeProcess:
    return start_node(path, layers, dtype, keys, join, threads=1, api=api, name=f"{host.ns}-{layers.replace(':', '-')}",
                      prefix=host.exec, listen=f"/ip4/{host.ip}/tcp/0")


def _chain_rate(path: Path, dtype: str, tokens: int, repeats: int, servers: list[Host], gateway: Host, relay: Host) -> tuple[float, list[str]]:
    """Decode tokens/s through a 3-hop chain on ``servers``, read at ``gateway``; and how
    the gateway is connected to each hop."""
    keys = Path(tempfile.mkdtemp(prefix="shardmesh-bench-"))
    nodes: list[NodeProcess] = []
    try:
        boot = _node(path, relay, "none", dtype, keys, None, api=True)
        nodes.append(boot)
        wait_gateway(boot)
        nodes += [_node(path, host, span, dtype, keys, boot.address) for host, span in zip(servers, SPANS)]
        front = _node(path, gateway, "none", dtype, keys, boot.address, api=True)
        nodes.append(front)
        for node in nodes[1:-1]:
            wait_serving(node)
        wait_gateway(front)
        rate = _python_on(gateway, RATE, front.url, str(tokens), str(repeats))
        code = f"import httpx, json\nprint(json.dumps(httpx.get({front.url + '/v1/swarm'!r}, timeout=5).json()))"
        done = subprocess.run([*gateway.exec, sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
        peers = {p["peer"]: p for p in json.loads(done.stdout)["peers"]}
        kinds = [str(peers.get(n.peer, {}).get("connection")) for n in nodes[1:-1]]
        return rate, kinds
    finally:
        stop_all(nodes)


def run_internet_bench(path: Path, dtype: str, tokens: int, repeats: int) -> int:
    why = can_build()
    if why is not None:
        print(f"bench --internet: the emulated internet {why}", file=sys.stderr)
        return 2
    internet = Internet()
    try:
        relay, publics = internet.public(), [internet.public() for _ in range(4)]
        homes = [internet.home_host(internet.home("cone")) for _ in range(4)]
        punched = [internet.home_host(internet.home("cone", drop_unsolicited=True)) for _ in range(2)]

        print("connection set-up (fresh identity; median of", DIALS, "dials):", flush=True)
        keys = Path(tempfile.mkdtemp(prefix="shardmesh-bench-"))
        setup_nodes = []
        try:
            boot = _node(path, relay, "none", dtype, keys, None, api=True)
            setup_nodes.append(boot)
            wait_gateway(boot)
            home = _node(path, homes[0], "none", dtype, keys, boot.address, api=True)
            far = _node(path, punched[0], "none", dtype, keys, boot.address, api=True)
            setup_nodes += [home, far]
            wait_gateway(home)
            wait_gateway(far)
            circuit = f"{boot.address}/p2p-circuit/p2p/{home.peer}"
            for node in (home, far):  # their dial-back verdicts, then their reservations on the relay
                _wait_for_circuit(relay, boot, node.peer)
            direct_ms = _python_on(publics[0], SETUP, boot.address, str(DIALS))
            relayed_ms = _python_on(publics[0], SETUP, circuit, str(DIALS))
            far_circuit = f"{boot.address}/p2p-circuit/p2p/{far.peer}"
            punch_ms = _python_on(punched[1], PUNCH, f"/ip4/{punched[1].ip}/tcp/4001", far_circuit, far.peer, "3")
        finally:
            stop_all(setup_nodes)
        print(f"  direct to a public node          {direct_ms:8.1f} ms")
        print(f"  relayed to a node behind a NAT   {relayed_ms:8.1f} ms")
        punch = f"{punch_ms:8.1f} ms" if punch_ms >= 0 else "  failed"
        print(f"  hole-punched, home to home       {punch}   (after the relayed one; cone NATs that drop the unasked)", flush=True)

        print(f"\ndecode tokens/s, 3-hop chain, {tokens} tokens, best of {repeats} (each node --threads 1):", flush=True)
        direct, kinds = _chain_rate(path, dtype, tokens, repeats, publics[:3], publics[3], relay)
        print(f"  every hop public (direct)        {direct:8.1f} tok/s   gateway's connections: {', '.join(kinds)}", flush=True)
        relayed, kinds = _chain_rate(path, dtype, tokens, repeats, homes[:3], homes[3], relay)
        print(f"  every hop behind a NAT (relayed) {relayed:8.1f} tok/s   gateway's connections: {', '.join(kinds)}")
        print(f"  relayed / direct                 {relayed / direct:8.2f}")
        return 0
    finally:
        internet.close()
