"""The emulated WAN link (shardmesh/tools/delay_line.py): each direction delayed, bytes
in order, back-pressure kept, under a 3 MB frame (the size of a 2,048-token prefill's
hidden states at hidden 768 in bfloat16)."""

from __future__ import annotations

import os
import time

import trio

from shardmesh.tools.delay_line import CHUNK, DelayLine

FRAME = os.urandom(3 << 20)


async def echo(stream: trio.SocketStream) -> None:
    async for data in stream:
        await stream.send_all(data)


def test_a_frame_comes_back_whole_in_order_and_late() -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            nursery.start_soon(trio.serve_listeners, echo, listeners)
            line = DelayLine(("127.0.0.1", listeners[0].socket.getsockname()[1]), delay=0.05)
            port = await nursery.start(line.serve)
            client = await trio.open_tcp_stream("127.0.0.1", port)

            start = trio.current_time()
            await client.send_all(b"ping")
            assert await client.receive_some(4) == b"ping"
            assert trio.current_time() - start >= 0.1  # through the line twice: 50 ms each way

            got = bytearray()

            async def read_back() -> None:
                while len(got) < len(FRAME):
                    got.extend(await client.receive_some(1 << 20))

            async with trio.open_nursery() as both:
                both.start_soon(read_back)
                await client.send_all(FRAME)
            assert bytes(got) == FRAME
            await client.aclose()
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_receiver_that_does_not_read_holds_the_sender_back() -> None:
    """While the far end reads nothing, the line holds at most its bound (plus one
    read), not the whole frame; once it reads, the frame arrives whole and in order."""
    async def main() -> None:
        reading = trio.Event()
        received = bytearray()

        async def slow_reader(stream: trio.SocketStream) -> None:
            await reading.wait()
            async for data in stream:
                received.extend(data)

        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            nursery.start_soon(trio.serve_listeners, slow_reader, listeners)
            bound = 256 << 10
            line = DelayLine(("127.0.0.1", listeners[0].socket.getsockname()[1]), delay=0.01, max_in_flight=bound)
            port = await nursery.start(line.serve)
            client = await trio.open_tcp_stream("127.0.0.1", port)

            async def send() -> None:
                await client.send_all(FRAME)
                await client.send_eof()

            nursery.start_soon(send)
            await trio.sleep(1.0)  # the kernel's buffers fill; the line stops reading
            assert 0 < line.peak_in_flight <= bound + CHUNK
            reading.set()
            with trio.fail_after(30):
                while len(received) < len(FRAME):
                    await trio.sleep(0.05)
            assert bytes(received) == FRAME
            assert line.peak_in_flight <= bound + CHUNK
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_node_behind_a_line_is_reached_through_it_hop_links_included(tmp_path) -> None:
    """A server that announces a delay line's address: the gateway's libp2p connection
    and its session's hop link both cross the line (the link is offered at the announced
    port), and the answer is exact."""
    import socket
    import threading

    import httpx
    from node_process import start_node, stop_node
    from reference import Transformers

    from shardmesh.tools.tiny_model import cached_tiny_model

    model = cached_tiny_model("llama", layers=4, hidden=64)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    line = DelayLine(("127.0.0.1", port), delay=0.005)
    ready = threading.Event()

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(line.serve)
            ready.set()

    threading.Thread(target=trio.run, args=(serve,), daemon=True).start()
    assert ready.wait(10)
    server = start_node(model, "--layers", "all", "--api", "off", "--announce", f"/ip4/127.0.0.1/tcp/{line.port}",
                        api=False, key_dir=tmp_path, listen=f"/ip4/127.0.0.1/tcp/{port}")
    gateway = None
    try:
        via_line = f"/ip4/127.0.0.1/tcp/{line.port}/p2p/{server.peer_id}"
        gateway = start_node(model, "--layers", "none", "--join", via_line, key_dir=tmp_path)
        ref = Transformers(model)
        prompt = [1, 17, 42, 99]
        want = ref.greedy(prompt, 8)
        deadline = time.monotonic() + 60
        while httpx.get(f"{gateway.url}/health", timeout=5).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.5)
        time.sleep(3)  # the dial-backs at joining cross the line too: let them pass
        before = line.connections
        name = httpx.get(f"{gateway.url}/v1/models", timeout=5).json()["data"][0]["id"]
        body = {"model": name, "prompt": prompt, "max_tokens": 8, "temperature": 0}
        answer = httpx.post(f"{gateway.url}/v1/completions", json=body, timeout=60).json()
        assert answer["choices"][0]["text"] == want.text
        assert answer["usage"]["completion_tokens"] == len(want.token_ids)
        metrics = httpx.get(f"{gateway.url}/metrics", timeout=5).text
        assert any(line_.startswith("shardmesh_hop_links_total") and float(line_.split()[-1]) >= 1 for line_ in metrics.splitlines())
        assert line.connections > before  # the session's hop link crossed the line
    finally:
        if gateway is not None:
            stop_node(gateway)
        stop_node(server)
