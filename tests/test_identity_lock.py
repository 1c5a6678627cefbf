"""Issue 18, item 4: one node per key file (mesh/identity.py).

Two nodes on one key file would be one peer id twice. The first node holds a lock on
its key file; a second one, started on the same file, exits 2 at once with one line
that names the first node's pid. The lock goes with the process that held it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from node_process import start_node, stop_node

from shardmesh.mesh.identity import IdentityInUse, holding_identity
from shardmesh.tools.tiny_model import cached_tiny_model


def test_a_key_file_is_held_by_one_holder_at_a_time(tmp_path: Path) -> None:
    key = tmp_path / "node.key"
    with holding_identity(key) as first:
        with pytest.raises(IdentityInUse, match=f"pid {os.getpid()}"):
            with holding_identity(key):
                pass
    with holding_identity(key) as again:  # released: the same identity, held anew
        assert again.public_key.to_bytes() == first.public_key.to_bytes()


def test_a_second_node_on_the_same_key_file_exits_2_with_one_line(tmp_path: Path) -> None:
    model = cached_tiny_model("llama", layers=4, hidden=64)
    key = tmp_path / "shared.key"
    first = start_node(model, "--key-file", str(key), key_dir=tmp_path)
    try:
        second = subprocess.run(
            [sys.executable, "-m", "shardmesh", "run", "--model", str(model), "--key-file", str(key), "--no-mdns",
             "--listen", "/ip4/127.0.0.1/tcp/0", "--api", "off"],
            capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )  # fmt: skip
    finally:
        stop_node(first)
    assert second.returncode == 2, second.stderr
    lines = second.stderr.strip().splitlines()
    assert lines == [f"shardmesh: {key} is in use by another shardmesh node (pid {first.proc.pid}); give this node its own --key-file"]
