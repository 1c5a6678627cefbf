"""Bad --join and --listen addresses: one plain line and exit code 2, before anything starts."""

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
    ],
)
def test_bad_addresses_are_one_line_errors(flags: list[str], expected: str, tmp_path) -> None:
    cmd = [sys.executable, "-m", "shardmesh", "run", "--model", str(tmp_path), "--no-mdns", *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], proc.stderr
