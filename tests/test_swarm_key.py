"""A private swarm by pre-shared key (``--swarm-key FILE``, mesh/swarm_key.py).

The cipher is checked against two independent references (NaCl's published XSalsa20
test and PyNaCl's secretbox, whose ciphertext is the same keystream XOR). Then, with
real nodes: M (blocks [0, 2), the API) and B ([2, 4)) share a key; E (no key) and W
(another key) serve [2, 4) as B does and join M. Only B is ever routed to, and no host
without the key gets as far as asking M anything.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import nacl.secret
import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from node_process import Node, start_node, stop_node, wait_for_route

from shardmesh.mesh.host import HostError, running_host
from shardmesh.mesh.swarm_key import SwarmKey, SwarmKeyError, parse_swarm_key, read_swarm_key, write_new_swarm_key, xsalsa20
from shardmesh.mesh.swarm_map import fetch_swarm_map
from shardmesh.tools.tiny_model import cached_tiny_model

LOCAL = ["/ip4/127.0.0.1/tcp/0"]


# --- the cipher and the key file -------------------------------------------------------------


def test_xsalsa20_matches_nacl() -> None:
    # NaCl's tests/stream.c: 4 MiB of keystream under this key and nonce hash to this digest.
    key = bytes.fromhex("1b27556473e985d462cd51197a9a46c76009549eac6474f206c4ee0844f68389")
    nonce = bytes.fromhex("69696ee955b62b73cd62bda875fc73d68219e0036b7a0b37")
    digest = hashlib.sha256(xsalsa20(key, nonce).encrypt(bytes(4 << 20))).hexdigest()
    assert digest == "662b9d0e3463029156069b12f918691a98f7dfb2ca0393c96bbfc6b1fbd630a2"
    # secretbox = Poly1305 tag + (plaintext XOR keystream from byte 32 on).
    key, nonce = os.urandom(32), os.urandom(24)
    box = nacl.secret.SecretBox(key).encrypt(bytes(5000), nonce).ciphertext
    assert xsalsa20(key, nonce).encrypt(bytes(5032))[32:] == box[16:]


def test_the_keystream_runs_on_across_writes_of_any_size() -> None:
    key, nonce = os.urandom(32), os.urandom(24)
    whole = xsalsa20(key, nonce).encrypt(bytes(10_000))
    stream, parts = xsalsa20(key, nonce), []
    for size in (1, 63, 64, 65, 7, 4096, 5704):
        parts.append(stream.encrypt(bytes(size)))
    assert b"".join(parts) == whole


def test_the_key_file_is_checked(tmp_path: Path) -> None:
    key = write_new_swarm_key(tmp_path / "swarm.key")
    assert stat.S_IMODE((tmp_path / "swarm.key").stat().st_mode) == 0o600
    assert read_swarm_key(tmp_path / "swarm.key") == key
    text = (tmp_path / "swarm.key").read_text()
    assert text.splitlines()[:2] == ["/key/swarm/psk/1.0.0/", "/base16/"] and key.psk.hex() in text
    assert key.psk.hex() not in repr(key) and key.psk.hex()[:12] != key.fingerprint()
    with pytest.raises(SwarmKeyError, match="exists"):
        write_new_swarm_key(tmp_path / "swarm.key")
    assert read_swarm_key(tmp_path / "swarm.key") == key  # not overwritten

    assert parse_swarm_key(b"/key/swarm/psk/1.0.0/\r\n/base16/\r\n" + key.psk.hex().encode() + b"\r\n") == key
    import base64

    assert parse_swarm_key(b"/key/swarm/psk/1.0.0/\n/base64/\n" + base64.b64encode(key.psk)) == key
    for bad, reason in [
        (b"/key/swarm/psk/2.0.0/\n/base16/\n" + b"00" * 32, "first line"),
        (b"/key/swarm/psk/1.0.0/\n/base58/\n" + b"00" * 32, "unknown encoding"),
        (b"/key/swarm/psk/1.0.0/\n/base16/\nzz" + b"00" * 31, "not valid"),
        (b"/key/swarm/psk/1.0.0/\n/base16/\n" + b"00" * 31, "31 bytes"),
        (b"/key/swarm/psk/1.0.0/\n/base16/\n" + b"00" * 2000, "a swarm key file is about 90"),
    ]:
        with pytest.raises(SwarmKeyError, match=reason):
            parse_swarm_key(bad)
    with pytest.raises(SwarmKeyError, match="cannot read"):
        read_swarm_key(tmp_path / "missing.key")


# --- a private swarm of real nodes -----------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_swarm(tmp_path_factory) -> Iterator[tuple[Node, Node, Node, Node, Path]]:
    model = cached_tiny_model("llama", layers=4, hidden=64)
    keys = tmp_path_factory.mktemp("keys")
    write_new_swarm_key(keys / "swarm.key")
    write_new_swarm_key(keys / "other.key")
    nodes: list[Node] = []
    try:

        def start(*args: str, api: bool = False) -> Node:
            nodes.append(start_node(model, *args, *(() if api else ("--api", "off")), api=api, key_dir=keys))
            return nodes[-1]

        m = start("--layers", "0:2", "--swarm-key", str(keys / "swarm.key"), api=True)
        b = start("--layers", "2:4", "--join", m.address, "--swarm-key", str(keys / "swarm.key"))
        e = start("--layers", "2:4", "--join", m.address)
        w = start("--layers", "2:4", "--join", m.address, "--swarm-key", str(keys / "other.key"))
        wait_for_route(m)
        yield m, b, e, w, keys / "swarm.key"
    finally:
        for node in nodes:
            stop_node(node)
        for node in nodes:
            print(f"---- node output ({' '.join(node.proc.args[-6:])}) ----\n{node.output()[-2500:]}")


def test_only_key_holders_serve_and_chats_are_exact(keyed_swarm) -> None:
    from reference import Transformers

    m, b, e, w, _ = keyed_swarm
    assert "private swarm: every connection needs the key" in m.output()
    model_path = cached_tiny_model("llama", layers=4, hidden=64)
    model = httpx.get(f"{m.url}/v1/models", timeout=10).json()["data"][0]["id"]
    reference = Transformers(model_path)
    expected = reference.greedy(reference.prompt_ids("The fox"), 8)
    for _ in range(3):
        reply = httpx.post(f"{m.url}/v1/completions", timeout=60,
                           json={"model": model, "prompt": "The fox", "max_tokens": 8, "temperature": 0})  # fmt: skip
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"] == expected.text
    peers = {p["peer"] for p in httpx.get(f"{m.url}/v1/swarm", timeout=10).json()["peers"]}
    assert peers == {m.peer_id, b.peer_id}, peers
    assert e.proc.poll() is None and w.proc.poll() is None  # up and serving: only the key keeps them out


def test_no_stranger_without_the_key_gets_an_answer(keyed_swarm) -> None:
    m, _, e, _, key_file = keyed_swarm

    async def ask(key: SwarmKey | None) -> str:
        async with running_host(create_new_key_pair(), LOCAL, key) as stranger:
            try:
                peer = await stranger.connect(m.address)
            except HostError as exc:
                return f"refused: {exc}"
            swarm = await fetch_swarm_map(stranger, peer, 10)
            return f"answered with {len(swarm.records)} records"

    assert trio.run(ask, None).startswith("refused")
    assert trio.run(ask, SwarmKey(os.urandom(32))).startswith("refused")
    assert trio.run(ask, read_swarm_key(key_file)) == "answered with 2 records"  # the key, and only it, admits

    def status(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "shardmesh", "status", "--join", m.address, *extra],
                              capture_output=True, text=True, timeout=60)  # fmt: skip

    keyed = status("--swarm-key", str(key_file))
    assert keyed.returncode == 0 and "coverage" in keyed.stdout.lower(), keyed.stdout + keyed.stderr
    unkeyed = status("--timeout", "3")
    assert unkeyed.returncode == 2 and "swarm-key" in unkeyed.stderr, unkeyed.stderr

    # The node without the key says why it is alone, in one line.
    deadline = time.monotonic() + 30
    while "no --join peer answered" not in e.output() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "of their swarm, if it is private" in e.output(), e.output()[-2000:]
