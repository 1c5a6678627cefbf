"""A node's identity: its ed25519 key file, and one node per key file at a time.

The file holds the key's 32-byte seed (mode 0600) and is created on first run; a peer id
is derived from the public key, so keeping the file keeps the node's identity across
restarts. Two processes on one key would be one peer id twice: each other's dials are
"this node; skipped", and every peer's view would flip between two records. So a node
holds a lock on its key file while it runs (:func:`holding_identity`), and a second one
started on the same file is told which process holds it.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["IdentityInUse", "default_key_file", "holding_identity", "load_or_create_identity"]


class IdentityInUse(Exception):
    """Another running process holds this key file."""


def default_key_file() -> Path:
    """``$XDG_DATA_HOME/shardmesh/node.key`` (``~/.local/share/...``): the node's identity."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "shardmesh" / "node.key"


def load_or_create_identity(path: Path):
    """The node's ed25519 key pair, created (mode 0600) on first run.

    The file holds the 32-byte seed only. A peer id is derived from the public key, so
    keeping the file keeps the node's identity across restarts.
    """
    from libp2p.crypto.ed25519 import create_new_key_pair

    path = Path(path)
    if path.exists():
        seed = path.read_bytes()
        if len(seed) != 32:
            raise ValueError(f"{path} is not a shardmesh key file (expected 32 bytes, found {len(seed)})")
        return create_new_key_pair(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    seed = os.urandom(32)
    key_pair = create_new_key_pair(seed)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pair.private_key.to_bytes()[:32])
    os.replace(tmp, path)
    return key_pair


@contextmanager
def holding_identity(path: Path) -> Iterator[object]:
    """The key pair of ``path`` (created if missing), locked for as long as the block runs.

    The lock is ``flock`` on ``<path>.lock``, which also records the holder's pid; the
    kernel drops it when the process ends, however it ends, so a crash leaves no stale
    lock. :class:`IdentityInUse` names the holder's pid.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise IdentityInUse(
                f"{path} is in use by another shardmesh node (pid {holder}); give this node its own --key-file"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield load_or_create_identity(path)
    finally:
        os.close(fd)
