"""``shardmesh status --join MULTIADDR``: the swarm map, as one of its peers sees it.

The probe is a throwaway libp2p host (a fresh in-memory identity, never the node's key
file) that dials exactly one address, the ``--join`` peer, asks it for its swarm map
(``/shardmesh/swarm/1.0.0``, see :mod:`shardmesh.mesh.swarm_map`) and hangs up. No
mDNS, no DHT, no gossip: nothing else is dialled, and the probe never joins the swarm.

The peer hands over the signed records it holds, and every one is verified here,
against the peer id it names: the peer we asked could leave servers out, but it cannot
make one up or change what another server announced. Invalid records are dropped and
counted. The map is then summarised with :mod:`shardmesh.placement.spans`, the same
arithmetic routing and placement use: per-block coverage by *online* servers, the gaps,
and the bottleneck (the smallest summed throughput of any block, which bounds the
swarm's tokens/s).

Exit status: 0 when a map was shown (even one with gaps: that is information, not a
failure), 2 when none could be had (bad address, peer unreachable or silent).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections import Counter
from typing import Any

import trio

from ..mesh.addresses import parse_join_address
from ..mesh.swarm_key import SwarmKey, read_swarm_key
from ..mesh.host import DIAL_TIMEOUT, HostError, running_host
from ..mesh.records import NodeRecord, record_json
from ..mesh.swarm_map import SwarmMap, SwarmMapError, fetch_swarm_map
from ..mesh.swarm_view import server_views
from ..placement.spans import bottleneck, coverage, gaps, is_complete

DEFAULT_TIMEOUT = 15.0  # seconds for the whole probe: dial, ask, read
PROBE_LISTEN = "/ip4/127.0.0.1/tcp/0"  # a host must listen somewhere; nobody needs to reach it
SHORT_ID = 8  # characters of a peer id shown in the table (its tail: the head is always "12D3KooW")


class StatusError(Exception):
    """No map to show; the message is the one line the user sees."""


# --- asking ----------------------------------------------------------------------------


async def probe(join: str, timeout: float = DEFAULT_TIMEOUT, swarm_key: SwarmKey | None = None) -> tuple[str, SwarmMap]:
    """Dial ``join``, fetch and verify its swarm map; ``(its peer id, the map)``.

    Gives up after about ``timeout`` seconds (a frame already arriving may finish);
    raises :class:`StatusError` with a one-line reason when there is no map. A private
    swarm's peer answers only a probe that holds its ``swarm_key``.
    """
    try:
        _, address = parse_join_address(join)
    except ValueError as exc:
        raise StatusError(str(exc)) from None
    from libp2p.crypto.ed25519 import create_new_key_pair

    deadline = trio.current_time() + timeout
    # A peer that takes the TCP connection and then never completes the handshake is,
    # more often than not, a private swarm's peer and a key that does not match.
    hint = " (does it hold the same --swarm-key?)" if swarm_key else " (a private swarm? pass its --swarm-key)"
    async with running_host(create_new_key_pair(), [PROBE_LISTEN], swarm_key) as mesh:
        try:
            with trio.fail_after(timeout):
                peer_id = await mesh.connect(address)
        except trio.TooSlowError:
            raise StatusError(f"{address}: no answer within {timeout:g} s{hint}") from None
        except HostError as exc:
            cause = _root_cause(exc)
            if isinstance(cause, (trio.Cancelled, trio.TooSlowError, TimeoutError)):  # the dial's own timeout
                raise StatusError(f"{address}: no answer within {DIAL_TIMEOUT:g} s{hint}") from None
            raise StatusError(f"cannot reach {address}: {_one_line(cause)}") from None
        try:
            swarm = await fetch_swarm_map(mesh, peer_id, max(0.5, deadline - trio.current_time()))
        except SwarmMapError as exc:
            raise StatusError(str(exc)) from None
        return peer_id.to_base58(), swarm


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost error of a failed dial ("Connection refused", ...).

    py-libp2p wraps it five deep (swarm, multi-error, transport, exception group), and
    every layer's message only says that the layer below failed.
    """
    for _ in range(32):  # wrappers can be cyclic in principle; give up long before
        inner = (getattr(exc, "exceptions", None) or getattr(exc, "errors", None) or [None])[0]
        inner = inner or exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
        if not isinstance(inner, BaseException):
            break
        exc = inner
    return exc


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


# --- summarising -----------------------------------------------------------------------


def _order(record: NodeRecord) -> tuple:
    # Servers by span start; gateways (empty span) after them.
    return (not record.serves_blocks, record.start, record.end, record.peer)


def summarize(swarm: SwarmMap, via: str, now: float | None = None) -> dict[str, Any]:
    """The map as plain data: what ``--json`` prints and what the table is drawn from."""
    now = time.time() if now is None else now
    records = sorted(swarm.records, key=_order)
    # The registry's own conversion; a peer the asked node finds unreachable counts for
    # nothing, as in its routing.
    views = server_views([r for r in records if r.peer not in swarm.unreachable])
    total = swarm.total_blocks
    peers = []
    for r in records:
        peer = record_json(r, now)
        peer["unreachable"] = r.peer in swarm.unreachable
        if peer["unreachable"]:
            peer["unreachable_for"] = swarm.unreachable[r.peer]
        peers.append(peer)
    return {
        "model": swarm.model,
        "total_blocks": total,
        "via": via,
        "peers": peers,
        "coverage": coverage(views, total),
        "gaps": [list(g) for g in gaps(views, total)],
        "complete": is_complete(views, total),
        "bottleneck": bottleneck(views, total),
        "dropped": [{"reason": e.reason, "detail": e.detail} for e in swarm.dropped],
    }


# --- drawing ---------------------------------------------------------------------------


def _rate(tok_s: float) -> str:
    return f"{tok_s:,.1f}" if tok_s < 100 else f"{tok_s:,.0f}"


def coverage_line(counts: list[int]) -> str:
    """Online servers per block as one digit each ('.' for none, '+' for 10 or more),
    in groups of ten so a block is easy to find: ``1111111111 22..``."""
    digits = "".join("." if n == 0 else "+" if n > 9 else str(n) for n in counts)
    return " ".join(digits[i : i + 10] for i in range(0, len(digits), 10))


def _table(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  " + "  ".join(cells).rstrip())
    return lines


def render(summary: dict[str, Any]) -> str:
    """The summary as the human-readable report ``shardmesh status`` prints."""
    peers = summary["peers"]
    servers = sum(1 for p in peers if not p["gateway"])
    lines = [
        f"model       {summary['model']}  ({summary['total_blocks']} blocks)",
        f"asked       {summary['via']}",
        f"peers       {len(peers)} ({servers} serving blocks, {len(peers) - servers} gateway-only)",
    ]
    if summary["dropped"]:
        reasons = Counter(d["reason"] for d in summary["dropped"])
        what = ", ".join(f"{reason} x{n}" for reason, n in sorted(reasons.items()))
        lines.append(f"dropped     {len(summary['dropped'])} record(s) that failed verification ({what})")
    lines.append("")

    rows = [["PEER", "SPAN", "STATE", "REACH", "TOK/S/BLOCK", "CACHE FREE", "BACKEND", "API"]]
    for p in peers:
        mark = " *" if p["peer"] == summary["via"] else "  "
        start, end = p["span"]
        rows.append([
            p["peer"][-SHORT_ID:] + mark,
            "gateway" if p["gateway"] else f"[{start},{end})",
            f"unreachable {p['unreachable_for']:.0f}s" if p.get("unreachable") else p["state"],
            p.get("reach", "unknown"),
            "-" if p["gateway"] else _rate(p["throughput"]),
            "-" if p["gateway"] else f"{p['cache_tokens_free']:,}",
            "-" if p["gateway"] else f"{p['backend']} {p['device']} {p['dtype']}",
            p["api"] or "-",
        ])
    lines += _table(rows, right={4, 5}) if peers else ["  (no valid records)"]
    lines.append("")

    if summary["complete"]:
        verdict = "complete"
    else:
        verdict = "gaps: " + " ".join(f"[{a},{b})" for a, b in summary["gaps"]) if summary["gaps"] else "empty model"
    lines.append(f"coverage    {coverage_line(summary['coverage'])}   {verdict}")
    if summary["complete"]:
        lines.append(f"bottleneck  {_rate(summary['bottleneck'])} tok/s  (weakest block, online servers summed)")
    else:
        lines.append("bottleneck  0 tok/s  (some block has no online server)")
    lines.append("")
    lines.append("* the peer asked; coverage: online servers per block, '.' none, '+' ten or more")
    lines.append("unreachable Ns: the peer asked lost its connection to that one N s ago and could not dial it again")
    return "\n".join(lines)


# --- the command -----------------------------------------------------------------------


def _quiet_logging() -> None:
    """py-libp2p logs every failed dial and closed stream; a CLI shows one line instead."""
    import libp2p  # noqa: F401 - it sets its own log level on import; ours must come after

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if os.environ.get("SHARDMESH_DEBUG"):
        logging.getLogger("shardmesh").setLevel(logging.DEBUG)
    if not os.environ.get("LIBP2P_DEBUG"):
        logging.getLogger("libp2p").setLevel(logging.CRITICAL)


def main(join: str, *, as_json: bool = False, timeout: float = DEFAULT_TIMEOUT, swarm_key: str | None = None) -> int:
    """Run ``shardmesh status``; returns the exit status."""
    if not timeout > 0:
        print(f"shardmesh status: --timeout must be positive, got {timeout:g}", file=sys.stderr)
        return 2
    try:
        parse_join_address(join)  # a typo fails here, before libp2p is even imported
        key = read_swarm_key(swarm_key) if swarm_key is not None else None
    except ValueError as exc:  # SwarmKeyError is one
        print(f"shardmesh status: {exc}", file=sys.stderr)
        return 2
    _quiet_logging()
    try:
        via, swarm = trio.run(probe, join, timeout, key)
    except BaseException as exc:
        # Nurseries inside the host may wrap our error in exception groups.
        leaves = _leaves(exc)
        if not all(isinstance(e, StatusError) for e in leaves):
            raise
        print(f"shardmesh status: {leaves[0]}", file=sys.stderr)
        return 2
    summary = summarize(swarm, via)
    print(json.dumps(summary, indent=2) if as_json else render(summary))
    return 0


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]
