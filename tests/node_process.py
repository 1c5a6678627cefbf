"""Real node processes for tests: start one on a free port, read its URL, stop it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

READY = re.compile(r"gateway ready at (http://[^\s/]+)")
STARTUP_TIMEOUT = 120.0


@dataclass
class Node:
    """A running ``python -m shardmesh run`` process and its gateway URL."""

    proc: subprocess.Popen[str]
    url: str = ""
    lines: list[str] = field(default_factory=list)

    def output(self, since: int = 0) -> str:
        return "".join(self.lines[since:])


def _pump(node: Node) -> None:
    """Drain the node's output forever (a full pipe would block it) into ``node.lines``."""
    assert node.proc.stdout is not None
    for line in node.proc.stdout:
        node.lines.append(line)


def start_node(model: Path, *extra: str) -> Node:
    """Start a node on a free port and wait for its ``gateway ready at`` line."""
    cmd = [sys.executable, "-m", "shardmesh", "run", "--model", str(model), "--api", "127.0.0.1:0", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    node = Node(proc)
    threading.Thread(target=_pump, args=(node,), daemon=True).start()
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        for line in list(node.lines):
            if m := READY.search(line):
                node.url = m.group(1)
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
