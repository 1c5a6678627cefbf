"""Issue 17 item 9: a finished generation response releases its HTTP connection.

The gateway's generation responses watch for ``http.disconnect`` to cancel the
generation when the client leaves. Hypercorn sends that same message once the response
has been sent, from inside the app's last ``send``; the watcher's cancellation then cut
short hypercorn's end-of-response bookkeeping, so with ``Connection: close`` the socket
was never closed, and on a keep-alive connection the idle timer was never armed: every
finished generation left a socket (and a file descriptor) in the node for as long as the
client kept its end open.

These tests talk raw HTTP/1.1 over sockets (``h11`` parses the responses), because an
HTTP library would close its end on ``Connection: close`` itself and hide whether the
server does. Each request is read to its end, and the client's socket is then kept open
while the test counts the node process's own TCP connections on its API port; they must
come back to zero, and each client socket must see the server's end of stream. The node must keep
serving: a greedy chat gives the same text before and after, and its RSS is printed
against a bound.
"""

from __future__ import annotations

import json
import socket
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import h11
import openai
import psutil
import pytest
from api_helpers import MESSAGES, PROMPT, serve_node
from node_process import Node, greedy_chat

from shardmesh.api.server import KEEP_ALIVE_SECONDS, WRITE_TIMEOUT_SECONDS

pytest_plugins = ["api_fixtures"]
pytestmark = pytest.mark.slow

REQUESTS = 40  # per test: the issue saw 200 lingering; a few dozen show the leak as well
MAX_TOKENS = 4
#: How long the server gets to close a ``Connection: close`` socket once its response has
#: been read. It closes at once; the margin is for a loaded test machine.
CLOSE_WITHIN_S = 15.0
#: A keep-alive connection is closed after the server's keep-alive timeout, plus margin.
KEEP_ALIVE_WAIT_S = KEEP_ALIVE_SECONDS + 15.0
#: The node's RSS may grow by at most this much over one test's requests: a loose bound,
#: the point being that finished requests leave no per-connection state behind.
RSS_GROWTH_BOUND_MB = 100.0


@pytest.fixture(scope="module")
def node(request: pytest.FixtureRequest, model_path: Path) -> Iterator[Node]:
    """A node of this file's own: connections left by other files' clients would count."""
    yield from serve_node(request, model_path)


def api_port(node: Node) -> int:
    return int(node.url.rsplit(":", 1)[1])


def server_connections(node: Node) -> Counter[str]:
    """The node process's TCP connections on its API port, by state (the listener aside).

    These are the server's ends (psutil lists the process's open socket descriptors): a
    socket the server has closed is gone from the list, whatever the client does with its end.
    """
    port = api_port(node)
    return Counter(
        c.status
        for c in psutil.Process(node.proc.pid).net_connections(kind="tcp")
        if c.laddr and c.laddr.port == port and c.status != psutil.CONN_LISTEN
    )


def wait_for_no_connections(node: Node, within_s: float) -> Counter[str]:
    """Poll until the node holds no connection on its API port, or ``within_s`` passes."""
    deadline = time.monotonic() + within_s
    while (left := server_connections(node)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def rss_mb(node: Node) -> float:
    return psutil.Process(node.proc.pid).memory_info().rss / 2**20


def model_id(node: Node) -> str:
    with openai.OpenAI(base_url=f"{node.url}/v1", api_key="unused", max_retries=0, timeout=60) as client:
        return client.models.list().data[0].id


def generation_body(i: int, model: str) -> tuple[str, dict]:
    """Request ``i``: chat or completion, streamed or whole, in turn."""
    common = {"model": model, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": i % 2 == 1}
    if (i // 2) % 2 == 0:
        return "/v1/chat/completions", {**common, "messages": MESSAGES}
    return "/v1/completions", {**common, "prompt": PROMPT}


def request(
    port: int, path: str, body: dict, *, close: bool, sock: socket.socket | None = None
) -> tuple[socket.socket, int, bytes]:
    """POST ``body`` on a fresh socket (or ``sock``, kept alive from an earlier request)
    and read the response to its end, not to EOF.

    Returns the still open socket, the status and the body. ``close`` adds
    ``Connection: close``.
    """
    sock = sock or socket.create_connection(("127.0.0.1", port), timeout=60)
    conn = h11.Connection(h11.CLIENT)
    data = json.dumps(body).encode()
    headers = [("host", f"127.0.0.1:{port}"), ("content-type", "application/json"), ("content-length", str(len(data)))]
    if close:
        headers.append(("connection", "close"))
    sock.sendall(conn.send(h11.Request(method="POST", target=path, headers=headers)))
    sock.sendall(conn.send(h11.Data(data=data)) + conn.send(h11.EndOfMessage()))
    status, chunks = 0, []
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(sock.recv(65536))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            chunks.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            return sock, status, b"".join(chunks)
        elif isinstance(event, h11.ConnectionClosed):
            raise AssertionError(f"{path}: the connection closed before the response ended")


def send_generations(node: Node, *, close: bool) -> list[socket.socket]:
    """``REQUESTS`` generations, each read to its end; returns their sockets, still open."""
    port, model = api_port(node), model_id(node)
    kept = []
    for i in range(REQUESTS):
        path, body = generation_body(i, model)
        sock, status, data = request(port, path, body, close=close)
        assert status == 200, f"{path} stream={body['stream']}: {status} {data[:300]!r}"
        if body["stream"]:
            # The stream ends properly: its terminator is the last thing in the body.
            assert data.endswith(b"data: [DONE]\n\n"), data[-200:]
        else:
            assert json.loads(data)["choices"][0]["finish_reason"] in ("length", "stop"), data[:300]
        kept.append(sock)
    return kept


def assert_closed_by_server(sockets: list[socket.socket]) -> None:
    """Each client socket sees the server's end of stream (its FIN), not just silence."""
    for sock in sockets:
        sock.settimeout(10)
        assert sock.recv(1) == b"", "the server sent bytes after the response"


def close_all(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


def test_connection_close_is_honoured(node: Node) -> None:
    """``Connection: close``: the server closes each socket once its response is sent."""
    model = model_id(node)
    before_text, before_rss = greedy_chat(node, MESSAGES, model), rss_mb(node)
    kept = send_generations(node, close=True)
    try:
        left = wait_for_no_connections(node, CLOSE_WITHIN_S)
        print(f"after {REQUESTS} Connection: close generations: {sum(left.values())} connections left on the API port {dict(left)}")
        assert not left, f"the node still holds {dict(left)} after {CLOSE_WITHIN_S:.0f} s"
        assert_closed_by_server(kept)
    finally:
        close_all(kept)
    after_rss = rss_mb(node)
    print(f"node RSS {before_rss:.0f} MB -> {after_rss:.0f} MB (bound: +{RSS_GROWTH_BOUND_MB:.0f} MB)")
    assert after_rss - before_rss <= RSS_GROWTH_BOUND_MB
    assert greedy_chat(node, MESSAGES, model) == before_text


def test_keep_alive_connections_time_out(node: Node) -> None:
    """Without ``Connection: close`` the socket is kept for a next request, but only for
    the keep-alive timeout; then the server closes it."""
    model = model_id(node)
    before_text, before_rss = greedy_chat(node, MESSAGES, model), rss_mb(node)
    kept = send_generations(node, close=False)
    try:
        # Kept alive means reusable: a second request on the last connection (the others
        # may already have timed out) is answered.
        path, body = generation_body(1, model)
        _, status, data = request(api_port(node), path, body, close=False, sock=kept[-1])
        assert status == 200 and data.endswith(b"data: [DONE]\n\n"), (status, data[-200:])
        left = wait_for_no_connections(node, KEEP_ALIVE_WAIT_S)
        print(f"after {REQUESTS} keep-alive generations and {KEEP_ALIVE_SECONDS:.0f} s idle: "
              f"{sum(left.values())} connections left on the API port {dict(left)}")
        assert not left, f"the node still holds {dict(left)} after {KEEP_ALIVE_WAIT_S:.0f} s"
        assert_closed_by_server(kept)
    finally:
        close_all(kept)
    after_rss = rss_mb(node)
    print(f"node RSS {before_rss:.0f} MB -> {after_rss:.0f} MB (bound: +{RSS_GROWTH_BOUND_MB:.0f} MB)")
    assert after_rss - before_rss <= RSS_GROWTH_BOUND_MB
    assert greedy_chat(node, MESSAGES, model) == before_text


def test_a_client_that_stops_reading_is_dropped(node: Node) -> None:
    """A streaming client that never reads: once the response fills the socket buffers
    the server's writes stall, and after the write timeout the server drops the
    connection (the generation is cancelled with it) instead of holding it forever."""
    model = model_id(node)
    before_text = greedy_chat(node, MESSAGES, model)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window stays small
    sock.connect(("127.0.0.1", api_port(node)))
    try:
        body = {"model": model, "messages": MESSAGES, "max_tokens": 1500, "temperature": 0, "stream": True,
                "logprobs": True, "top_logprobs": 20}  # about 2 KB per token: far more than the buffers hold
        data = json.dumps(body).encode()
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                f"content-length: {len(data)}\r\n\r\n").encode()  # fmt: skip
        sock.sendall(head + data)
        time.sleep(2)
        assert server_connections(node), "the node closed the connection before it could stall"
        started = time.monotonic()
        left = wait_for_no_connections(node, WRITE_TIMEOUT_SECONDS + 60)
        print(f"a client that stopped reading was dropped {time.monotonic() - started + 2:.0f} s after its request "
              f"(write timeout {WRITE_TIMEOUT_SECONDS:.0f} s)")  # fmt: skip
        assert not left, f"the node still holds {dict(left)} for a client that stopped reading"
        # Dropped, not finished: what the client can still read stops short of the end.
        sock.settimeout(2)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except OSError:  # a timeout (the server sent no FIN: it gave up on this peer) or a reset
            pass
        assert received.startswith(b"HTTP/1.1 200") and b"data: [DONE]" not in received, received[-200:]
    finally:
        sock.close()
    assert greedy_chat(node, MESSAGES, model) == before_text
