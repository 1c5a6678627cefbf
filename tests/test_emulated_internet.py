"""Issue 19's ground: node processes on an emulated internet
(shardmesh/tools/emulated_internet.py, the ``internet`` fixture in conftest.py).

What holds before reachability, relays and hole punching: a gateway at home, behind its
router's NAT, uses a swarm of public servers (it dials out to each; the NAT lets the
answers back in; the servers chain to each other directly). And a server at home serves
a public gateway: it dialled out to every peer it learned of, so each has a connection
to it that streams can reuse, though none could dial it. Both answers are exactly
transformers'. The fixture's NAT is real: nothing on the internet can dial a home host.
(A gateway in one home and a server in another cannot chain yet: neither can dial the
other, which is what relays and hole punching are for.)
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from js_peer import JsPeer, js_skip_reason
from node_process import Node, start_node, stop_node
from reference import Transformers

from shardmesh.tools.emulated_internet import Host
from shardmesh.tools.tiny_model import cached_tiny_model

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Tell me about foxes."}]
TOKENS = 12

CHAT = """
import json, sys, openai
url, messages, tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
name = client.models.list().data[0].id
answer = client.chat.completions.create(model=name, messages=messages, max_tokens=tokens, temperature=0)
print(json.dumps(answer.choices[0].message.content))
"""


def python_on(host: Host, code: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run ``code`` with this Python on ``host`` (in its namespace)."""
    return subprocess.run([*host.exec, sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout)


def chat_from(host: Host, url: str) -> str:
    """One greedy chat through ``url``, by the official client running on ``host``."""
    done = python_on(host, CHAT, url, json.dumps(MESSAGES), str(TOKENS), timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def dial_from(host: Host, ip: str, port: int) -> str:
    """What a TCP dial from ``host`` to ``ip:port`` gives: "connected" or the error."""
    code = f"import socket\ntry:\n socket.create_connection(({ip!r}, {port}), timeout=3); print('connected')\nexcept OSError as e:\n print(e)"
    return python_on(host, code).stdout.strip()


def wait_for_route(host: Host, gateway: Node, timeout: float = 60.0) -> None:
    """Until the gateway's /health, asked from its own host, says a chain is complete."""
    code = f"import httpx\nprint(httpx.get({gateway.url + '/health'!r}, timeout=5).status_code)"
    deadline = time.monotonic() + timeout
    while python_on(host, code).stdout.strip() != "200":
        assert time.monotonic() < deadline, f"no complete chain within {timeout:.0f} s:\n{gateway.output()[-3000:]}"
        time.sleep(1)


def stage_steps(host: Host, node: Node) -> float:
    """How many steps ``node``'s stage has run (its /metrics, asked from its host)."""
    code = f"import httpx\nprint(httpx.get({node.url + '/metrics'!r}, timeout=5).text)"
    text = python_on(host, code).stdout
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("shardmesh_stage_steps_total"))


def swarm_from(host: Host, node: Node) -> dict[str, dict]:
    """``node``'s /v1/swarm peers by peer id, asked from its own host."""
    done = python_on(host, f"import httpx, json\nprint(json.dumps(httpx.get({node.url + '/v1/swarm'!r}, timeout=5).json()))")
    assert done.returncode == 0, done.stderr[-2000:]
    return {p["peer"]: p for p in json.loads(done.stdout)["peers"]}


@contextmanager
def swarm_on(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    """``start(host, model, *args, port=0, **kw)`` starts a node on ``host`` at its own
    address; every node started is stopped at the end, its output printed."""
    nodes: list[Node] = []

    def start(host: Host, model: Path, *args: str, port: int = 0, **kw) -> Node:
        nodes.append(start_node(model, *args, key_dir=tmp_path, prefix=host.exec, listen=f"/ip4/{host.ip}/tcp/{port}", **kw))
        return nodes[-1]

    try:
        yield start
    finally:
        for node in nodes:
            stop_node(node)
        for node in nodes:
            print(f"---- {' '.join(node.proc.args[4:8])} ----\n{node.output()[-2000:]}")


def test_a_gateway_at_home_chains_through_public_servers(internet, tmp_path: Path) -> None:
    model = cached_tiny_model("llama", layers=4, hidden=64)
    ref = Transformers(model)
    want = ref.greedy(ref.chat_ids(MESSAGES), TOKENS).text
    first, second = internet.public(), internet.public()
    home = internet.home("cone")
    laptop = internet.home_host(home)

    with swarm_on(tmp_path) as start:
        a = start(first, model, "--layers", "0:2", "--api", "off", api=False)
        start(second, model, "--layers", "2:4", "--api", "off", "--join", a.address, api=False)
        gateway = start(laptop, model, "--layers", "none", "--join", a.address)
        assert a.address.startswith(f"/ip4/{first.ip}/") and gateway.address.startswith(f"/ip4/{laptop.ip}/")

        # The NAT is real: the laptop reaches the internet, the internet not the laptop.
        gateway_port = int(gateway.address.split("/tcp/")[1].split("/")[0])
        a_port = int(a.address.split("/tcp/")[1].split("/")[0])
        assert dial_from(laptop, first.ip, a_port) == "connected"
        assert dial_from(first, laptop.ip, gateway_port) != "connected"

        wait_for_route(laptop, gateway)
        assert chat_from(laptop, gateway.url) == want


def test_a_server_at_home_serves_a_public_gateway(internet, tmp_path: Path) -> None:
    model = cached_tiny_model("llama", layers=4, hidden=64)
    ref = Transformers(model)
    want = ref.greedy(ref.chat_ids(MESSAGES), TOKENS).text
    first, second = internet.public(), internet.public()
    home = internet.home("cone")
    desk = internet.home_host(home)
    with swarm_on(tmp_path) as start:
        a = start(first, model, "--layers", "0:2", "--api", "off", api=False)
        start(desk, model, "--layers", "2:4", "--api", "off", "--join", a.address, api=False)
        gateway = start(second, model, "--layers", "none", "--join", a.address)
        wait_for_route(second, gateway)
        assert chat_from(second, gateway.url) == want


def test_each_node_learns_whether_others_can_dial_it(internet, tmp_path: Path) -> None:
    """Its record's reach and addresses: a public node is public; a node behind its home
    NAT is private and never publishes its private address; one whose router forwards
    its listening port is public at the router's address, which goes first; one with
    ``--announce`` publishes exactly that."""
    model = cached_tiny_model("llama", layers=2, hidden=64)
    public = internet.public()
    closed, forwarded, announced = internet.home("cone"), internet.home("cone"), internet.home("cone")
    behind, served, named = internet.home_host(closed), internet.home_host(forwarded), internet.home_host(announced)
    internet.forward(forwarded, served, 4001)
    internet.forward(announced, named, 4001)
    with swarm_on(tmp_path) as start:
        a = start(public, model, "--layers", "all")
        joined = ("--layers", "all", "--api", "off", "--join", a.address)
        home_nodes = [start(host, model, *joined, *extra, api=False, port=port, env={"SHARDMESH_DEBUG": "1"})
                      for host, port, extra in ((behind, 0, ()), (served, 4001, ()),
                                                (named, 4001, ("--announce", f"/ip4/{announced.router.ip}/tcp/4001")))]
        private, forwarded_node, announced_node = home_nodes
        want = {a.peer_id: "public", private.peer_id: "private", forwarded_node.peer_id: "public", announced_node.peer_id: "public"}
        deadline = time.monotonic() + 60
        while True:
            peers = swarm_from(public, a)
            if private.peer_id in peers:  # from the first time it is seen
                assert not any(behind.ip in addr for addr in peers[private.peer_id]["addrs"]), peers[private.peer_id]
            seen = {peer: peers[peer]["reach"] for peer in want if peer in peers}
            if seen == want:
                break
            assert time.monotonic() < deadline, f"reach seen {seen}, expected {want}"
            time.sleep(1)
        assert all("/p2p-circuit/" in addr for addr in peers[private.peer_id]["addrs"])  # relays only
        assert peers[forwarded_node.peer_id]["addrs"] == [
            f"/ip4/{forwarded.router.ip}/tcp/4001/p2p/{forwarded_node.peer_id}", f"/ip4/{served.ip}/tcp/4001/p2p/{forwarded_node.peer_id}"]
        assert peers[announced_node.peer_id]["addrs"] == [f"/ip4/{announced.router.ip}/tcp/4001/p2p/{announced_node.peer_id}"]


def split_across_two_homes(start: Callable[..., Node], model: Path, public: Host, desk: Host, laptop: Host) -> tuple[Node, Node, Node]:
    """Blocks 0:2 on a public node, 2:4 on a server at one home, a gateway at another;
    returned once the gateway sees a complete chain."""
    a = start(public, model, "--layers", "0:2", "--api", "off", api=False)
    server = start(desk, model, "--layers", "2:4", "--api", "off", "--join", a.address, api=False, env={"SHARDMESH_DEBUG": "1"})
    gateway = start(laptop, model, "--layers", "none", "--join", a.address, env={"SHARDMESH_DEBUG": "1"})
    wait_for_route(laptop, gateway, timeout=90)
    return a, server, gateway


@pytest.mark.parametrize("gateway_nat", ["cone", "random"])
def test_homes_behind_two_nats_chain_through_a_relay(internet, tmp_path: Path, gateway_nat: str) -> None:
    """A server in one home and a gateway in another (behind a cone NAT, or one that
    maps each connection to a random port): neither can dial the other. The server,
    private, reserves on the public node (its only public peer) and publishes a circuit
    address; the gateway dials it through the relay. Exact answer. Then a public server
    for the same blocks joins, and the next answer goes through it: direct beats relayed."""
    model = cached_tiny_model("llama", layers=4, hidden=64)
    ref = Transformers(model)
    want = ref.greedy(ref.chat_ids(MESSAGES), TOKENS).text
    public = internet.public()
    desk = internet.home_host(internet.home("cone"))
    laptop = internet.home_host(internet.home(gateway_nat))
    with swarm_on(tmp_path) as start:
        a, server, gateway = split_across_two_homes(start, model, public, desk, laptop)
        assert chat_from(laptop, gateway.url) == want
        record = swarm_from(laptop, gateway)[server.peer_id]
        assert record["connection"] == "relayed" and swarm_from(laptop, gateway)[a.peer_id]["connection"] == "direct"
        assert record["reach"] == "private"
        assert record["addrs"] == [f"{a.address}/p2p-circuit/p2p/{server.peer_id}"]

        # A public server for the same blocks: routing prefers the direct path.
        second = internet.public()
        direct = start(second, model, "--layers", "2:4", "--join", a.address)
        deadline = time.monotonic() + 60
        while swarm_from(laptop, gateway).get(direct.peer_id, {}).get("state") != "online":
            assert time.monotonic() < deadline, "the public server never came online"
            time.sleep(0.5)
        assert chat_from(laptop, gateway.url) == want
        assert stage_steps(second, direct) > 0


STREAM = """
import json, sys, openai
url, messages, tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
name = client.models.list().data[0].id
for chunk in client.chat.completions.create(model=name, messages=messages, max_tokens=tokens, temperature=0, stream=True):
    if chunk.choices and chunk.choices[0].delta.content:
        print(json.dumps(chunk.choices[0].delta.content), flush=True)
"""


def test_a_relay_that_goes_away_mid_answer(internet, tmp_path: Path) -> None:
    """The home server holds reservations on two of three public relays (the public
    server relays for nobody: ``--relay-service off``); the relay
    the gateway reaches it through is killed while an answer streams. The server
    reserves on the third within 10 s; the answer fails over and ends exactly."""
    model = cached_tiny_model("llama", layers=4, hidden=64)
    ref = Transformers(model)
    tokens = 60
    want = ref.greedy(ref.chat_ids(MESSAGES), tokens).text
    publics = [internet.public() for _ in range(4)]
    desk = internet.home_host(internet.home("cone"))
    laptop = internet.home_host(internet.home("cone"))
    with swarm_on(tmp_path) as start:
        a = start(publics[0], model, "--layers", "0:2", "--api", "off", "--relay-service", "off", api=False)
        relays = {}
        for host in publics[1:]:
            node = start(host, model, "--layers", "none", "--join", a.address)  # relays that serve nothing
            relays[node.peer_id] = node
        server = start(desk, model, "--layers", "2:4", "--api", "off", "--join", a.address, "--max-blocks", "2", api=False)
        gateway = start(laptop, model, "--layers", "none", "--join", a.address)
        wait_for_route(laptop, gateway, timeout=90)

        def circuits() -> list[str]:
            return [addr.split("/p2p/")[1].split("/")[0] for addr in swarm_from(laptop, gateway)[server.peer_id]["addrs"]]

        deadline = time.monotonic() + 30
        while len(circuits()) < 2:  # two reservations, published
            assert time.monotonic() < deadline, circuits()
            time.sleep(0.5)
        client = subprocess.Popen([*laptop.exec, sys.executable, "-c", STREAM, gateway.url, json.dumps(MESSAGES), str(tokens)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert client.stdout is not None
        pieces = [json.loads(client.stdout.readline()) for _ in range(3)]
        used = circuits()[0]  # the gateway dials a record's addresses in order
        assert used in relays and swarm_from(laptop, gateway)[server.peer_id]["connection"] == "relayed"
        relays[used].proc.kill()
        killed = time.monotonic()
        pieces += [json.loads(line) for line in client.stdout]
        assert client.wait(timeout=60) == 0, client.stderr.read() if client.stderr else ""
        assert "".join(pieces) == want

        while True:  # the dead relay replaced: two circuits again, on live relays
            now = circuits()
            if len(now) == 2 and used not in now:
                break
            assert time.monotonic() - killed < 10 + 5, f"still {now} (dead relay {used})"  # 5 s: the record's travel
            time.sleep(0.5)


@pytest.mark.skipif(js_skip_reason() is not None, reason=js_skip_reason() or "")
def test_a_js_libp2p_peer_dials_a_home_node_through_a_relay(internet, tmp_path: Path) -> None:
    """Our relay speaks standard circuit relay v2: js-libp2p's own relay transport
    dials a node behind a NAT at the circuit address its record names, and reads its
    swarm map over that connection."""
    model = cached_tiny_model("llama", layers=2, hidden=64)
    public, elsewhere = internet.public(), internet.public()
    desk = internet.home_host(internet.home("cone"))
    with swarm_on(tmp_path) as start:
        a = start(public, model, "--layers", "none")
        server = start(desk, model, "--layers", "all", "--api", "off", "--join", a.address, api=False)
        deadline = time.monotonic() + 30
        while not (addrs := swarm_from(public, a).get(server.peer_id, {}).get("addrs")):
            assert time.monotonic() < deadline, "no circuit address published"
            time.sleep(0.5)
        js = JsPeer(prefix=elsewhere.exec)
        try:
            connection = js.call("dial", addr=addrs[0], timeout=30)
            assert connection["peer"] == server.peer_id and "/p2p-circuit" in connection["remote_addr"]
            swarm = js.call("swarm_map", peer=server.peer_id)
            assert server.peer_id in {r["peer"] for r in swarm["records"]}
        finally:
            js.close()


def links_taken(host: Host, node: Node) -> float:
    """Session hops ``node`` moved to hop links (its /metrics, asked from its host)."""
    code = f"import httpx\nprint(httpx.get({node.url + '/metrics'!r}, timeout=5).text)"
    text = python_on(host, code).stdout
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("shardmesh_hop_links_total"))


def test_one_forwarded_port_carries_libp2p_and_hop_links(internet, tmp_path: Path) -> None:
    """A server at home whose router forwards only its one listening port: it is public,
    and the gateway's session moves to a hop link through that same port."""
    model = cached_tiny_model("llama", layers=4, hidden=64)
    ref = Transformers(model)
    want = ref.greedy(ref.chat_ids(MESSAGES), TOKENS).text
    public = internet.public()
    home = internet.home("cone")
    desk = internet.home_host(home)
    internet.forward(home, desk, 4001)
    with swarm_on(tmp_path) as start:
        gateway = start(public, model, "--layers", "none")
        server = start(desk, model, "--layers", "all", "--join", gateway.address, port=4001)
        wait_for_route(public, gateway)
        deadline = time.monotonic() + 30
        while swarm_from(public, gateway)[server.peer_id]["reach"] != "public":
            assert time.monotonic() < deadline, "the forwarded server never became public"
            time.sleep(0.5)
        assert chat_from(public, gateway.url) == want
        assert links_taken(public, gateway) >= 1 and links_taken(desk, server) >= 1
        assert swarm_from(public, gateway)[server.peer_id]["addrs"][0] == f"/ip4/{home.router.ip}/tcp/4001/p2p/{server.peer_id}"


def test_two_homes_behind_cone_nats_end_up_direct(internet, tmp_path: Path) -> None:
    """Blocks split across two homes (cone NATs that drop what nobody asked for) and a
    public node: the gateway first reaches the home server through the relay, then hole
    punching makes that connection direct; answers are exact before and after."""
    model = cached_tiny_model("llama", layers=4, hidden=64)
    ref = Transformers(model)
    want = ref.greedy(ref.chat_ids(MESSAGES), TOKENS).text
    public = internet.public()
    desk = internet.home_host(internet.home("cone", drop_unsolicited=True))
    laptop = internet.home_host(internet.home("cone", drop_unsolicited=True))
    with swarm_on(tmp_path) as start:
        a, server, gateway = split_across_two_homes(start, model, public, desk, laptop)
        assert chat_from(laptop, gateway.url) == want
        deadline = time.monotonic() + 30
        while swarm_from(laptop, gateway)[server.peer_id]["connection"] != "direct":
            assert time.monotonic() < deadline, "the relayed connection was never made direct"
            time.sleep(0.5)
        assert swarm_from(laptop, gateway)[server.peer_id]["reach"] == "private"  # still nobody can dial it
        assert chat_from(laptop, gateway.url) == want
