"""``--join /dns4/NAME/tcp/PORT/p2p/ID``: the name is resolved by the system resolver
(``/etc/hosts`` included) on every dial, and a name that does not resolve yet is said
in one line and tried again until it does (mesh/names.py, mesh/discovery.py).

The node test runs real node processes inside a network namespace with its own hosts
file and no name server, so no name ever leaves the machine."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio
from netns import network_namespace
from node_process import start_node, stop_node

from shardmesh.mesh.names import NameNotResolved, has_name, resolve_names
from shardmesh.tools.tiny_model import cached_tiny_model

PEER = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"


def test_a_name_in_a_multiaddr_is_resolved_by_the_system() -> None:
    address = f"/dns4/localhost/tcp/4001/p2p/{PEER}"
    assert has_name(address) and not has_name(f"/ip4/127.0.0.1/tcp/4001/p2p/{PEER}")
    assert trio.run(resolve_names, address) == [f"/ip4/127.0.0.1/tcp/4001/p2p/{PEER}"]
    plain = f"/ip4/10.1.2.3/tcp/4001/p2p/{PEER}"
    assert trio.run(resolve_names, plain) == [plain]


def test_a_malformed_name_is_refused_without_a_lookup() -> None:
    """An empty or illegal label is the resolver's to refuse, fast, with the name said."""
    with pytest.raises(NameNotResolved, match="cannot resolve"):
        trio.run(resolve_names, f"/dns4/bad..name/tcp/4001/p2p/{PEER}")


HOSTS = "127.0.0.1 localhost\n127.0.0.1 boot.shardmesh.test\n"
NO_NAME_SERVER = "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n"  # nothing answers inside the namespace


@pytest.mark.slow
def test_join_by_name_and_a_name_that_resolves_only_later(tmp_path: Path) -> None:
    model = cached_tiny_model("llama", layers=2, hidden=64)
    with network_namespace("joining by name", etc={"hosts": HOSTS, "resolv.conf": NO_NAME_SERVER}) as ns:
        prefix = ("ip", "netns", "exec", ns)
        debug = {"SHARDMESH_DEBUG": "1"}
        boot = start_node(model, "--layers", "all", "--api", "off", api=False, key_dir=tmp_path, prefix=prefix)
        nodes = [boot]
        try:
            port = boot.address.split("/tcp/")[1].split("/")[0]
            by_name = f"/dns4/boot.shardmesh.test/tcp/{port}/p2p/{boot.peer_id}"
            joiner = start_node(model, "--layers", "all", "--api", "off", "--join", by_name,
                                api=False, key_dir=tmp_path, prefix=prefix, env=debug)
            nodes.append(joiner)
            wait_for_line(joiner, f"bootstrapped: connected to join peer {boot.peer_id}", 30)

            later = by_name.replace("boot.shardmesh.test", "later.shardmesh.test")
            waiting = start_node(model, "--layers", "all", "--api", "off", "--join", later,
                                 api=False, key_dir=tmp_path, prefix=prefix, env=debug)
            nodes.append(waiting)
            line = wait_for_line(waiting, "no --join peer answered", 40)
            assert "cannot resolve 'later.shardmesh.test'" in line, line
            # The namespace's hosts file is the one its processes see: the name now exists.
            with open(f"/etc/netns/{ns}/hosts", "a") as hosts:
                hosts.write("127.0.0.1 later.shardmesh.test\n")
            wait_for_line(waiting, f"bootstrapped: connected to join peer {boot.peer_id}", 60)
        finally:
            for node in nodes:
                stop_node(node)


def wait_for_line(node, text: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(node.lines):
            if text in line:
                return line
        time.sleep(0.2)
    pytest.fail(f"no {text!r} within {timeout:.0f} s:\n{node.output()[-4000:]}")
