"""Driving the js-libp2p interop peer (``interop/peer.mjs``) from tests: one ``node``
process, one JSON command per line on its stdin, one reply per line on its stdout."""

from __future__ import annotations

import itertools
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

INTEROP_DIR = Path(__file__).resolve().parent.parent / "interop"
JS_START_TIMEOUT = 30.0


def js_skip_reason() -> str | None:
    node = shutil.which("node")
    if node is None:
        return "node (Node.js >= 18.18) is not installed; `make test` installs it with apt as root"
    version = subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip()
    major, minor = (int(x) for x in version.lstrip("v").split(".")[:2])
    if (major, minor) < (18, 18):  # `node --import` (the polyfills) came in 18.18
        return f"node {version} is too old for the interop peer (need >= 18.18)"
    if not (INTEROP_DIR / "node_modules" / "libp2p").is_dir():
        return "interop/node_modules is missing: run `npm ci` in interop/ (`make test` does)"
    return None


class JsError(Exception):
    """A command the JS peer answered with ok: false."""


class JsPeer:
    """One ``node interop/peer.mjs`` process and its command channel."""

    def __init__(self, swarm_key: Path | None = None, prefix: tuple[str, ...] = ()) -> None:
        env = {**os.environ, "SHARDMESH_SWARM_KEY": str(swarm_key)} if swarm_key else None
        self.proc = subprocess.Popen(
            [*prefix, "node", "--import", "./polyfill.mjs", "peer.mjs"],
            cwd=INTEROP_DIR,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.replies: dict[int, queue.Queue] = {}
        self.ids = itertools.count(1)
        self.lock = threading.Lock()
        self.ready: queue.Queue = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()
        try:
            hello = self.ready.get(timeout=JS_START_TIMEOUT)
        except queue.Empty:
            self.close()
            raise AssertionError(f"the JS peer did not start within {JS_START_TIMEOUT:.0f} s:\n{self.log()}") from None
        self.peer_id: str = hello["peer"]
        self.address: str = hello["addrs"][0]
        self.node_version: str = hello["node"]

    def _read_stdout(self) -> None:
        for line in self.proc.stdout:
            try:
                message = json.loads(line)
            except ValueError:  # a library printing to stdout: keep it for the log
                self.stderr.append(f"(stdout) {line}")
                continue
            if message.get("event") == "ready":
                self.ready.put(message)
            elif message.get("id") in self.replies:
                self.replies[message["id"]].put(message)

    def call(self, cmd: str, timeout: float = 20.0, **args: Any) -> dict[str, Any]:
        """Run one command; its reply, or JsError. The JS side gets the same deadline."""
        request_id = next(self.ids)
        box: queue.Queue = queue.Queue()
        self.replies[request_id] = box
        line = json.dumps({"id": request_id, "cmd": cmd, "timeout_ms": int(timeout * 1000), **args})
        with self.lock:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        try:
            reply = box.get(timeout=timeout + 5)
        except queue.Empty:
            raise AssertionError(f"JS peer: no answer to {cmd} within {timeout + 5:.0f} s\n{self.log()}") from None
        finally:
            del self.replies[request_id]
        if not reply.pop("ok"):
            raise JsError(f"{cmd}: {reply.get('error')}")
        reply.pop("id")
        return reply

    def poll(self, what: str, check, timeout: float) -> Any:
        """``check()`` until it returns something truthy; fail naming ``what`` after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {timeout:.0f} s: {what}\n{self.log()}")
            time.sleep(0.1)

    def log(self) -> str:
        return "".join(self.stderr[-40:])

    def close(self) -> None:
        try:
            self.proc.stdin.close()  # the peer stops when its stdin ends
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()
            self.proc.wait(timeout=10)
