"""Throwaway network namespaces for tests (``ip netns``, as root): traffic in them never
leaves the machine, and each may have its own ``/etc/hosts`` and ``/etc/resolv.conf``
(``/etc/netns/NAME/...``, which ``ip netns exec`` mounts over the real ones)."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def sh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=20)


@contextmanager
def network_namespace(why: str, *, multicast: bool = False, etc: dict[str, str] | None = None) -> Iterator[str]:
    """A namespace with loopback up (and multicast on it, for mDNS); ``etc`` files (name
    -> text, e.g. ``{"hosts": ...}``) replace the real ones inside it. Skips the test,
    saying ``why`` it needs one, where a namespace cannot be made."""
    if os.geteuid() != 0:
        pytest.skip(f"{why} needs root to create a network namespace (ip netns)")
    if shutil.which("ip") is None:
        pytest.skip(f"{why} needs iproute2's `ip netns`")
    name = f"shardmesh-test-{uuid.uuid4().hex[:8]}"
    made = sh("ip", "netns", "add", name)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace: {made.stderr.strip()}")
    etc_dir = Path("/etc/netns") / name
    try:
        commands = [["ip", "-n", name, "link", "set", "lo", "up"]]
        if multicast:
            commands += [["ip", "-n", name, "link", "set", "lo", "multicast", "on"],
                         ["ip", "-n", name, "route", "add", "224.0.0.0/4", "dev", "lo"]]
        for cmd in commands:
            done = sh(*cmd)
            assert done.returncode == 0, f"{' '.join(cmd)}: {done.stderr}"
        if etc:
            etc_dir.mkdir(parents=True, exist_ok=True)
            for file, text in etc.items():
                (etc_dir / file).write_text(text)
        yield name
    finally:
        sh("ip", "netns", "del", name)
        shutil.rmtree(etc_dir, ignore_errors=True)
