"""Real node processes for tests: start one on a free port, read its URL, stop it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

READY = re.compile(r"gateway ready at (http://[^\s/]+)")
SERVING = re.compile(r"^serving ", re.M)
LISTENING = re.compile(r"listening on (/ip4/[\d.]+/tcp/\d+/p2p/\w+)")
STARTUP_TIMEOUT = 120.0


@dataclass
class Node:
    """A running ``python -m shardmesh run`` process, its gateway URL and p2p address."""

    proc: subprocess.Popen[str]
    url: str = ""
    address: str = ""  # /ip4/127.0.0.1/tcp/PORT/p2p/PEER: what others --join
    lines: list[str] = field(default_factory=list)

    @property
    def peer_id(self) -> str:
        return self.address.rsplit("/", 1)[-1]

    def output(self, since: int = 0) -> str:
        return "".join(self.lines[since:])


def _pump(node: Node) -> None:
    """Drain the node's output forever (a full pipe would block it) into ``node.lines``."""
    assert node.proc.stdout is not None
    for line in node.proc.stdout:
        node.lines.append(line)


def start_node(model: Path | str | None, *extra: str, api: bool = True, key_dir: Path | None = None, env: dict[str, str] | None = None,
               prefix: tuple[str, ...] = (), listen: str = "/ip4/127.0.0.1/tcp/0") -> Node:
    """Start a node on free ports (loopback only, mDNS off, its own identity) and wait
    until it is ready: its ``gateway ready at`` line, or with ``api=False`` (pass
    ``--api off`` yourself) its ``serving`` line. ``model`` None leaves ``--model`` out
    (a gateway for whatever the swarm serves). ``prefix`` goes before the command
    (``("ip", "netns", "exec", NAME)`` runs it in a network namespace), whose own
    address ``listen`` may then be."""
    key_dir = Path(key_dir or tempfile.mkdtemp(prefix="shardmesh-key-"))
    key_file = key_dir / f"node-{uuid.uuid4().hex[:8]}.key"
    cmd = [*prefix, sys.executable, "-m", "shardmesh", "run", *(["--model", str(model)] if model is not None else []),
           "--listen", listen, "--no-mdns", "--key-file", str(key_file)]
    if api:
        cmd += ["--api", "127.0.0.1:0"]
    cmd += list(extra)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    node = Node(proc)
    threading.Thread(target=_pump, args=(node,), daemon=True).start()
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        text = node.output()
        if not node.address and (m := LISTENING.search(text)):
            node.address = m.group(1)
        if api and (m := READY.search(text)):
            node.url = m.group(1)
            return node
        if not api and node.address and SERVING.search(text):
            return node
        if proc.poll() is not None:
            time.sleep(0.2)  # let the pump read the last lines
            pytest.fail(f"node exited with {proc.returncode} before it was ready:\n{node.output()}")
        time.sleep(0.1)
    stop_node(node)
    pytest.fail(f"node not ready within {STARTUP_TIMEOUT:.0f} s:\n{node.output()}")


def stop_node(node: Node) -> None:
    node.proc.terminate()
    try:
        node.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        node.proc.kill()
        node.proc.wait(timeout=15)


def stop_showing_failures(nodes: list[Node], failed: bool) -> None:
    """Stop ``nodes``; when a test that used them ``failed``, print what each printed
    (pass ``request.session.testsfailed`` as it stands before the nodes are stopped)."""
    for node in nodes:
        stop_node(node)
    if failed:
        for node in nodes:
            print(f"---- node output ({' '.join(node.proc.args[-8:])}) ----\n{node.output()}")


def wait_for_route(gateway: Node, timeout: float = 30.0) -> None:
    """Until ``gateway``'s ``/health`` says a complete chain of peers serves the model."""
    import httpx

    deadline = time.monotonic() + timeout
    while httpx.get(f"{gateway.url}/health", timeout=5).status_code != 200:
        assert time.monotonic() < deadline, f"no complete route within {timeout:.0f} s"
        time.sleep(0.2)


def start_two_hop_swarm(model: Path, key_dir: Path) -> list[Node]:
    """M (blocks [0, 2), the API) and B ([2, 4), joined to M), once M routes through B.
    Returns ``[M, B]``; what was started is stopped if the swarm does not come up."""
    m = start_node(model, "--layers", "0:2", key_dir=key_dir)
    nodes = [m]
    try:
        nodes.append(start_node(model, "--layers", "2:4", "--api", "off", "--join", m.address, api=False, key_dir=key_dir))
        wait_for_route(m)
    except BaseException:
        for node in nodes:
            stop_node(node)
        raise
    return nodes


def start_doubled_swarm(model: Path, key_dir: Path) -> list[Node]:
    """M (blocks [0, 2), the API, routes logged), two servers of [2, 3) and Y ([3, 4)),
    all joined to M, once M routes and sees all four servers. Returns ``[M, S1, S2, Y]``;
    what was started is stopped if the swarm does not come up."""
    import httpx

    m = start_node(model, "--layers", "0:2", key_dir=key_dir, env={"SHARDMESH_DEBUG": "1"})
    nodes = [m]
    try:
        for span in ("2:3", "2:3", "3:4"):
            nodes.append(start_node(model, "--layers", span, "--api", "off", "--join", m.address, api=False, key_dir=key_dir))
        wait_for_route(m)
        deadline = time.monotonic() + 60
        while len([p for p in httpx.get(f"{m.url}/v1/swarm", timeout=10).json()["peers"] if not p["gateway"]]) < 4:
            assert time.monotonic() < deadline, "M does not see all four servers"
            time.sleep(0.2)
    except BaseException:
        for node in nodes:
            stop_node(node)
        raise
    return nodes


def greedy_chat(node: Node, messages: list[dict], model: str | None = None, max_tokens: int = 12) -> str:
    """One greedy chat through ``node``'s gateway with the official ``openai`` client, on
    a client of its own that is closed afterwards (no pooled connection stays open)."""
    import openai

    with openai.OpenAI(base_url=f"{node.url}/v1", api_key="unused", max_retries=0, timeout=60) as client:
        model = model or client.models.list().data[0].id
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
    return reply.choices[0].message.content or ""


def memory_bytes(pid: int, field: str = "VmRSS") -> int:
    """A memory figure of ``/proc/<pid>/status`` in bytes: ``VmRSS`` (resident now) or
    ``VmHWM`` (the peak, which catches a blow-up that is over by the time we look)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")
