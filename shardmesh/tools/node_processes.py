"""Node processes for the benches: ``shardmesh run`` started, read and stopped.

Each node is a real process on loopback; its output is read on a thread so that a
bench can wait for the line it needs (its address, or that it serves its blocks).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

LISTENING = re.compile(r"listening on (/ip4/[\d.]+/tcp/\d+/p2p/(\w+))")
READY = re.compile(r"gateway ready at (http://\S+) ")


@dataclass
class NodeProcess:
    proc: subprocess.Popen
    lines: list[str] = field(default_factory=list)
    address: str = ""
    peer: str = ""
    url: str = ""  # the OpenAI gateway's base, once it is ready (``api=True`` only)


def start_node(
    path: Path, layers: str, dtype: str, key_dir: Path, join: str | None = None, threads: int | None = None, links: bool = True,
    api: bool = False, name: str | None = None, extra: tuple[str, ...] = (), prefix: tuple[str, ...] = (),
    listen: str = "/ip4/127.0.0.1/tcp/0",
) -> NodeProcess:
    """``shardmesh run`` on loopback; ``api`` adds a gateway on a free port (else ``--api off``).
    ``name`` names its key file (default: from ``layers``); ``extra`` are more flags;
    ``prefix`` goes before the command (``ip netns exec NS``), ``listen`` is its address."""
    cmd = [
        *prefix, sys.executable, "-m", "shardmesh", "run", "--model", str(path), "--layers", layers,
        "--api", "127.0.0.1:0" if api else "off",
        "--listen", listen, "--no-mdns", "--dtype", dtype,
        "--key-file", str(key_dir / f"{name or layers.replace(':', '-')}.key"),
    ] + (["--join", join] if join else []) + ([] if links else ["--no-links"]) + (["--threads", str(threads)] if threads else []) + list(extra)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    node = NodeProcess(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))

    def pump() -> None:
        for line in node.proc.stdout:  # type: ignore[union-attr]
            node.lines.append(line)

    threading.Thread(target=pump, daemon=True).start()
    return node


def wait_serving(node: NodeProcess, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = "".join(node.lines)
        if (m := LISTENING.search(text)) and "\nserving " in "\n" + text:
            node.address, node.peer = m.group(1), m.group(2)
            return
        if node.proc.poll() is not None:
            raise RuntimeError(f"a bench node exited:\n{text}")
        time.sleep(0.1)
    raise RuntimeError("a bench node did not start in time:\n" + "".join(node.lines))


def wait_gateway(node: NodeProcess, timeout: float = 300) -> None:
    """Until the node's gateway is ready (its ``gateway ready at`` line): sets ``url``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = "".join(node.lines)
        if (m := READY.search(text)) and (a := LISTENING.search(text)):
            node.url, node.address, node.peer = m.group(1), a.group(1), a.group(2)
            return
        if node.proc.poll() is not None:
            raise RuntimeError(f"a bench node exited:\n{text}")
        time.sleep(0.1)
    raise RuntimeError("a bench gateway did not start in time:\n" + "".join(node.lines))


def start_chain(
    path: Path, dtype: str, spans: list[str], key_dir: Path, threads: int | None, links: bool = True, api: bool = False,
    extra: tuple[str, ...] = (),
) -> list[NodeProcess]:
    """Node processes for ``spans``; the first starts the swarm, the others join it.
    ``api``: each has a gateway too (for its ``/metrics``); ``extra``: more flags for each."""
    first = start_node(path, spans[0], dtype, key_dir, threads=threads, links=links, api=api, extra=extra)
    nodes = [first]
    try:
        wait_serving(first)
        nodes += [start_node(path, span, dtype, key_dir, first.address, threads, links, api=api, extra=extra) for span in spans[1:]]
        for node in nodes:
            wait_serving(node)
            if api:
                wait_gateway(node)
        time.sleep(3)  # a gossip round or two, so every hop knows the next one's address
        return nodes
    except BaseException:
        stop_all(nodes)
        raise


def add_gateway(nodes: list[NodeProcess], path: Path, dtype: str, key_dir: Path, threads: int | None) -> NodeProcess:
    """A ``--layers none`` gateway joined to ``nodes[0]``, appended to ``nodes`` once it
    serves; on failure every node of ``nodes`` is stopped."""
    try:
        gateway = start_node(path, "none", dtype, key_dir, nodes[0].address, threads, api=True, name="gateway")
        nodes.append(gateway)
        wait_gateway(gateway)
    except BaseException:
        stop_all(nodes)
        raise
    return gateway


def stop_all(nodes: list[NodeProcess]) -> None:
    for node in nodes:
        node.proc.terminate()
    for node in nodes:
        try:
            node.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            node.proc.kill()
