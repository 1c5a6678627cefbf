"""A private swarm by peer id: ``--allow-peers FILE``.

Peer ids are authenticated by every libp2p connection (Noise proves the key behind
them), so a list of them is a sound fence: a node given one talks only to those peers.

* A connection from (or to) a peer not on the list is closed as soon as it is up
  (:class:`ConnectionGate`), before that peer can gossip, query the DHT or open a
  session. A dial we make ourselves to such a peer is closed the same way.
* Records of peers not on the list are refused by the swarm view, the gossip
  validator and the DHT, so routing never sees them.
* The hop server refuses an ``open`` whose upstream peer or gateway is not on the
  list (``forbidden``).

Our own peer id is always allowed. The file holds one base58 peer id per line; blank
lines and ``#`` comments are ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import trio

from .notifee import QuietNotifee

MAX_ALLOWED = 100_000  # peer ids in one file: far beyond any private swarm

__all__ = ["AllowList", "ConnectionGate", "read_allow_list"]


class AllowListError(ValueError):
    """The file cannot be used; the message says which line and why."""


class AllowList:
    """The peers a private swarm admits; ``me`` is always one of them."""

    def __init__(self, peers: Iterable[str], me: str) -> None:
        self.peers = frozenset(peers) | {me}

    def __contains__(self, peer: object) -> bool:
        return peer in self.peers

    def allows(self, peer: str) -> bool:
        return peer in self.peers


def read_allow_list(path: str | Path) -> frozenset[str]:
    """The peer ids in ``path``, each checked to be a peer id (AllowListError if not)."""
    from libp2p.peer.id import ID

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AllowListError(f"--allow-peers {path}: cannot read it ({exc})") from exc
    peers: set[str] = set()
    for number, line in enumerate(text.splitlines(), 1):
        peer = line.split("#", 1)[0].strip()
        if not peer:
            continue
        try:
            if ID.from_base58(peer).to_base58() != peer:
                raise ValueError("not in canonical form")
        except Exception as exc:
            raise AllowListError(f"--allow-peers {path}, line {number}: {peer[:60]!r} is not a peer id ({exc})") from exc
        peers.add(peer)
        if len(peers) > MAX_ALLOWED:
            raise AllowListError(f"--allow-peers {path}: more than {MAX_ALLOWED} peer ids")
    if not peers:
        raise AllowListError(f"--allow-peers {path}: no peer ids in it (one base58 peer id per line)")
    return frozenset(peers)


class ConnectionGate(QuietNotifee):
    """Network notifee that closes every connection to a peer the list does not allow.

    It runs in the swarm's notification path, so it only schedules the close; ``closed``
    counts the connections it turned away.
    """

    def __init__(self, allow: AllowList, nursery: trio.Nursery) -> None:
        self.allow = allow
        self.nursery = nursery
        self.closed = 0

    async def connected(self, network, conn) -> None:
        peer = conn.muxed_conn.peer_id
        if not self.allow.allows(peer.to_base58()):
            self.closed += 1
            self.nursery.start_soon(_close, network, peer)
        await trio.lowlevel.checkpoint()


async def _close(network, peer) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(5):
        try:
            await network.close_peer(peer)
        except Exception:
            pass
