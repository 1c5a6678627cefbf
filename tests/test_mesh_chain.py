"""Several node processes serve one model together; the official client sees one model.

Per architecture, three nodes split a 12-layer tiny model (0:4, 4:8, 8:12) and a fourth,
``--layers none``, holds no weights and serves the OpenAI API. Every node is given only
the first node's address: they must learn of each other through gossip and the DHT, and
the gateway must find the route by itself. Greedy output, streamed and not, must equal
single-process transformers ``generate`` token for token, for one chat and for twelve at
once (whose steps every hop must then compute in batches: the servers' ``/metrics``
count them). The same for a MoE model.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import openai
import pytest
from node_process import Node, start_node, stop_node
from reference import Transformers

pytestmark = pytest.mark.slow

N = 10
MESSAGES = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. Tell me more."}]
SPANS = ["0:4", "4:8", "8:12"]
DISCOVERY_TIMEOUT = 30.0


class Swarm:
    def __init__(self, servers: list[Node], gateway: Node, ready_after: float) -> None:
        self.servers = servers
        self.gateway = gateway
        self.ready_after = ready_after  # seconds from the gateway's start to a complete route

    @property
    def nodes(self) -> list[Node]:
        return [*self.servers, self.gateway]


def start_swarm(model: Path, tmp: Path) -> Swarm:
    # The servers have gateways too, for their /metrics (how their stages batch).
    first = start_node(model, "--layers", SPANS[0], key_dir=tmp)
    nodes = [first]
    try:
        with ThreadPoolExecutor(2) as pool:
            rest = pool.map(lambda span: start_node(model, "--layers", span, "--join", first.address, key_dir=tmp), SPANS[1:])
            nodes += list(rest)
        gateway = start_node(model, "--layers", "none", "--join", first.address, key_dir=tmp)
        nodes.append(gateway)
        began = time.monotonic()
        deadline = began + DISCOVERY_TIMEOUT
        while time.monotonic() < deadline:
            if httpx.get(f"{gateway.url}/health", timeout=5).status_code == 200:
                return Swarm(nodes[:3], gateway, time.monotonic() - began)
            time.sleep(0.2)
        raise AssertionError(
            f"the gateway found no complete route within {DISCOVERY_TIMEOUT:.0f} s; its view: "
            f"{httpx.get(f'{gateway.url}/v1/swarm', timeout=5).text}"
        )
    except BaseException:
        for node in nodes:
            stop_node(node)
        raise


@contextmanager
def running_swarm(request: pytest.FixtureRequest, model: Path, tmp: Path) -> Iterator[Swarm]:
    swarm = start_swarm(model, tmp)
    failed_before = request.session.testsfailed
    try:
        yield swarm
    finally:
        for node in swarm.nodes:
            stop_node(node)
        if request.session.testsfailed > failed_before:
            for node in swarm.nodes:
                print(f"---- node output ({' '.join(node.proc.args)}) ----\n{node.output()}")


def client_for(node: Node) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{node.url}/v1", api_key="unused", max_retries=0, timeout=120)


# --------------------------------------------------------------------------- dense llama


@pytest.fixture(scope="module")
def llama_path() -> Path:
    from shardmesh.tools.tiny_model import cached_tiny_model

    return cached_tiny_model("llama", layers=12, hidden=64)


@pytest.fixture(scope="module")
def llama_swarm(request, llama_path: Path, tmp_path_factory) -> Iterator[Swarm]:
    with running_swarm(request, llama_path, tmp_path_factory.mktemp("keys")) as swarm:
        yield swarm


@pytest.fixture(scope="module")
def llama_ref(llama_path: Path) -> Transformers:
    return Transformers(llama_path)


def test_gateway_learns_every_server_from_one_join_address(llama_swarm: Swarm) -> None:
    view = httpx.get(f"{llama_swarm.gateway.url}/v1/swarm", timeout=10).json()
    peers = {p["peer"]: p for p in view["peers"]}
    for node, span in zip(llama_swarm.servers, SPANS):
        assert node.peer_id in peers, f"{node.peer_id} missing from {sorted(peers)}"
        start, end = map(int, span.split(":"))
        assert peers[node.peer_id]["span"] == [start, end]
        assert peers[node.peer_id]["state"] == "online"
        assert peers[node.peer_id]["throughput"] > 0
    assert llama_swarm.gateway.peer_id in peers
    assert view["coverage"] == [1] * 12
    print(f"complete route found {llama_swarm.ready_after:.1f} s after the gateway started")


def test_gateway_measures_and_publishes_rtts(llama_swarm: Swarm) -> None:
    """Routing prices a hop by the RTT from the previous peer: the gateway pings the
    servers and publishes what it measured in its own record."""
    servers = {node.peer_id for node in llama_swarm.servers}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        view = httpx.get(f"{llama_swarm.gateway.url}/v1/swarm", timeout=10).json()
        mine = next(p for p in view["peers"] if p["peer"] == llama_swarm.gateway.peer_id)
        if set(mine["rtt_ms"]) == servers:
            assert all(0 < ms < 1000 for ms in mine["rtt_ms"].values()), mine["rtt_ms"]
            return
        time.sleep(0.5)
    raise AssertionError(f"the gateway's record has RTTs for {sorted(mine['rtt_ms'])}, not {sorted(servers)}")


def test_chat_through_three_nodes_equals_transformers(llama_swarm: Swarm, llama_ref: Transformers) -> None:
    want = llama_ref.greedy(llama_ref.chat_ids(MESSAGES), N)
    client = client_for(llama_swarm.gateway)
    model = client.models.list().data[0].id
    r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=N, temperature=0)
    assert r.choices[0].message.content == want.text
    assert r.usage.completion_tokens == len(want.token_ids)

    chunks = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=N, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text


PROMPTS = [
    "Once upon a time", "The capital of France is", "1 2 3 4 5", "Dear diary, today", "In the beginning",
    "The fox", "Tell me about dogs", "Why is the sky blue?", "A B C", "Swarms of bees", "Hello there", "Last one",
]


def stage_counts(node: Node) -> tuple[float, float]:
    """Steps and batches ``node``'s stage has run so far (its /metrics)."""
    from shardmesh.tools.bench_concurrent import stage_counts_from

    text = httpx.get(f"{node.url}/metrics", timeout=10).text
    counts = stage_counts_from(text)
    assert counts is not None, text
    return counts


def trunk_counts(node: Node, items: str = "batched_frame_steps", frames: str = "batched_frames") -> tuple[float, float]:
    """Steps ``node``'s trunks have brought in so far, and the frames they came in (or,
    with the other names, tokens its results trunks brought in and their frames)."""
    from shardmesh.tools.bench_concurrent import stage_counts_from

    text = httpx.get(f"{node.url}/metrics", timeout=10).text
    counts = stage_counts_from(text, items, frames)
    assert counts is not None, text
    return counts


def result_counts(node: Node) -> tuple[float, float]:
    return trunk_counts(node, "batched_result_frame_tokens", "batched_result_frames")


def test_twelve_concurrent_chats_batch_on_every_hop_and_each_get_their_own_answer(llama_swarm: Swarm, llama_ref: Transformers) -> None:
    wants = [llama_ref.greedy(llama_ref.prompt_ids(p), N).text for p in PROMPTS]
    client = client_for(llama_swarm.gateway)
    model = client.models.list().data[0].id

    def complete(prompt: str) -> str:
        # One step per token (no draft tokens), so that the steps counted below are known.
        return client.completions.create(
            model=model, prompt=prompt, max_tokens=N, temperature=0, extra_body={"speculative": False}
        ).choices[0].text

    before = [stage_counts(node) for node in llama_swarm.servers]
    trunks_before = [trunk_counts(node) for node in llama_swarm.servers] + [result_counts(llama_swarm.gateway)]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = list(pool.map(complete, PROMPTS))
    after = [stage_counts(node) for node in llama_swarm.servers]
    trunks_after = [trunk_counts(node) for node in llama_swarm.servers] + [result_counts(llama_swarm.gateway)]
    assert got == wants
    for node, (steps0, batches0), (steps1, batches1) in zip(llama_swarm.servers, before, after):
        steps, batches = steps1 - steps0, batches1 - batches0
        assert steps >= len(PROMPTS) * N, (node.address, steps)  # every session's prefill and decode steps
        assert steps > batches, f"{node.address}: {steps:.0f} steps in {batches:.0f} batches: no two sessions ever shared one"
    # Every step came into every hop on a trunk, and every token back to the gateway on
    # a results trunk, several sessions' to a frame.
    for node, (carried0, frames0), (carried1, frames1) in zip(llama_swarm.nodes, trunks_before, trunks_after):
        frames, carried = frames1 - frames0, carried1 - carried0
        assert carried >= len(PROMPTS) * N, (node.address, carried)
        assert carried > frames, f"{node.address}: {carried:.0f} steps or tokens in {frames:.0f} frames: no frame ever carried two sessions"


def test_a_client_that_leaves_mid_answer_leaves_the_others_exact(llama_swarm: Swarm, llama_ref: Transformers) -> None:
    """One streamed answer is dropped by its client after two chunks while eleven others
    run in the same batches: its session ends alone, and the others finish exactly."""
    prompts = PROMPTS[1:]
    wants = [llama_ref.greedy(llama_ref.prompt_ids(p), N).text for p in prompts]
    client = client_for(llama_swarm.gateway)
    model = client.models.list().data[0].id

    def complete(prompt: str) -> str:
        return client.completions.create(model=model, prompt=prompt, max_tokens=N, temperature=0).choices[0].text

    def leave_early() -> int:
        stream = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=400, temperature=0, stream=True)
        read = 0
        for _ in stream:
            read += 1
            if read == 2:
                break
        stream.close()
        return read

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        left = pool.submit(leave_early)
        got = list(pool.map(complete, prompts))
        assert left.result() == 2
    assert got == wants
    # The gateway still serves: a chat after the disconnect is exact too.
    assert complete(prompts[0]) == wants[0]


def stream_with_a_small_window(url: str, body: dict) -> http.client.HTTPResponse:
    """A streamed request from a client whose socket takes in at most a few KB: once it
    stops reading, the gateway's writes to it block within a few dozen chunks."""
    parts = urlsplit(url)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)  # before connect: it sets the TCP window
    sock.settimeout(300)
    sock.connect((parts.hostname, parts.port))
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=300)
    conn.sock = sock
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200, response.read()
    return response


def sse_texts(lines: Iterator[bytes]) -> Iterator[str]:
    for line in lines:
        if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
            yield "".join(c["text"] for c in json.loads(line[6:])["choices"])


def test_a_client_that_stops_reading_holds_back_no_one(llama_swarm: Swarm, llama_ref: Transformers) -> None:
    """One streamed answer's client reads its first chunk, then nothing until eleven
    other chats have finished: they finish, exactly, without waiting for it (were its
    unread tokens to stall a hop or the gateway, they would time out), and then it reads
    the rest of its own answer, exact too."""
    slow_tokens = 300  # about 75 KB of events: far more than the slow socket takes in
    want_slow = llama_ref.greedy(llama_ref.prompt_ids(PROMPTS[0]), slow_tokens).text
    prompts = PROMPTS[1:]
    wants = [llama_ref.greedy(llama_ref.prompt_ids(p), N).text for p in prompts]
    client = client_for(llama_swarm.gateway)
    model = client.models.list().data[0].id
    others_done = threading.Event()

    def complete(prompt: str) -> str:
        return client.completions.create(model=model, prompt=prompt, max_tokens=N, temperature=0).choices[0].text

    def read_slowly() -> str:
        body = {"model": model, "prompt": PROMPTS[0], "max_tokens": slow_tokens, "temperature": 0, "stream": True}
        response = stream_with_a_small_window(llama_swarm.gateway.url, body)
        texts = sse_texts(iter(response.readline, b""))
        first = next(texts)
        assert others_done.wait(timeout=300), "the other chats never finished"
        return first + "".join(texts)

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        slow = pool.submit(read_slowly)
        try:
            got = list(pool.map(complete, prompts))
        finally:
            others_done.set()
        assert got == wants
        assert slow.result() == want_slow


# --------------------------------------------------------------------------- MoE


@pytest.fixture(scope="module")
def moe_path() -> Path:
    from shardmesh.tools.tiny_model import cached_tiny_model

    return cached_tiny_model("qwen3_moe", layers=12, hidden=64)


def test_moe_chat_through_three_nodes_equals_transformers(request, moe_path: Path, tmp_path_factory) -> None:
    ref = Transformers(moe_path)
    want = ref.greedy(ref.chat_ids(MESSAGES), N)
    with running_swarm(request, moe_path, tmp_path_factory.mktemp("moe-keys")) as swarm:
        client = client_for(swarm.gateway)
        model = client.models.list().data[0].id
        r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=N, temperature=0)
        assert r.choices[0].message.content == want.text
        chunks = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=N, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
        # A second turn starts with the first's prefix on every hop (the prefix cache, in
        # whole 64-token blocks: a longer chat): the MoE routers see the very same keys
        # and values, and answer the same.
        chat = [{"role": "user", "content": " ".join([MESSAGES[0]["content"]] * 6)}]
        for turn in range(2):
            answer = client.chat.completions.create(model=model, messages=chat, max_tokens=N, temperature=0).choices[0].message.content
            assert answer == ref.greedy(ref.chat_ids(chat), N).text, f"turn {turn + 1}"
            chat += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And then?"}]
        metrics = httpx.get(f"{swarm.gateway.url}/metrics", timeout=10).text
        cached = re.search(r"^shardmesh_prompt_tokens_cached_total (\S+)$", metrics, re.M)
        assert cached is not None and float(cached.group(1)) > 0, metrics
