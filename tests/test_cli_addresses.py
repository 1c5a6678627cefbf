"""Bad --join and --listen addresses (and other bad flags): one plain line and exit code 2,
before anything starts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--join", "/ip4/10.0.0.5/tcp/4001"], "must end in /p2p/"),
        (["--join", "not-an-address"], "--join"),
        (["--listen", "garbage"], "--listen garbage: not a multiaddr"),
        (["--threads", "0"], "--threads wants a positive number"),
        (["--announce", "garbage"], "--announce garbage: not a multiaddr"),
        (["--announce", "/ip4/198.18.0.1/udp/4001"], "wants an IP or DNS name and a TCP port"),
    ],
)
def test_bad_addresses_are_one_line_errors(flags: list[str], expected: str, tmp_path) -> None:
    cmd = [sys.executable, "-m", "shardmesh", "run", "--model", str(tmp_path), "--no-mdns", *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], proc.stderr


def test_a_port_in_use_is_refused(tmp_path) -> None:
    """py-libp2p listens with SO_REUSEPORT, so without this check a second node on the
    same port would start and the kernel would split connections between the two."""
    import socket

    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        cmd = [sys.executable, "-m", "shardmesh", "run", "--model", str(tmp_path), "--no-mdns",
               "--listen", f"/ip4/127.0.0.1/tcp/{port}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr
    assert "port is in use" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_a_link_port_in_use_is_refused(tmp_path) -> None:
    import socket

    from shardmesh.tools.tiny_model import cached_tiny_model

    model = cached_tiny_model("llama", layers=4, hidden=64)
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        cmd = [sys.executable, "-m", "shardmesh", "run", "--model", str(model), "--no-mdns", "--layers", "none", "--api", "off",
               "--listen", "/ip4/127.0.0.1/tcp/0", "--link-port", str(port), "--key-file", str(tmp_path / "key")]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert f"--link-port {port}: cannot listen" in last and "--no-links" in last, proc.stderr
