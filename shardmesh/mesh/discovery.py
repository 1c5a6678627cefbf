"""Finding peers and staying connected to them: ``--join`` addresses, mDNS, reconnects.

A node learns about other nodes in three ways, and this module turns all three into
one list of *peers worth being connected to*, which a single loop keeps dialling:

* **Join addresses** (``--join /ip4/.../tcp/4001/p2p/12D3Koo...``, or ``/dns4/NAME/...``
  resolved by the system on each dial), given by the user. They are checked when
  :class:`Discovery` is built (a typo is a ``ValueError`` that names the address,
  before anything starts) and are never forgotten: a bootstrap node that starts after
  us, or restarts, or a name that does not resolve yet, is dialled again until it
  answers. Without
  ``--join`` the node simply starts a new swarm. There is no built-in list of public
  bootstrap nodes: we never dial an address nobody gave us.
* **mDNS** on the local network (``--no-mdns`` turns it off), run by
  :mod:`~shardmesh.mesh.mdns`. Only private, loopback and link-local addresses learned
  this way are dialled, so a LAN host cannot make us dial out to the internet by
  advertising a public address.
* **add_known()**, for other components (the registry, from signed records).

The loop wakes every ``retry_interval`` seconds (sooner when a peer is added) and
dials every listed peer that is not connected. Each peer has its own back-off
(``retry_interval``, doubled on every failure, capped at ``max_backoff``) so a dead
peer is not hammered, and a peer that is not a join peer is forgotten once it has
failed for ``forget_after`` seconds. A peer that was connected and drops is dialled
again at the next wake-up; :meth:`MeshHost.connect` lifts py-libp2p's 60 s negative
dial cache, so a restarted peer is reached again at once.

Nothing here raises into the host: dial errors and mDNS errors are logged and the
node keeps going. Checking and choosing addresses is :mod:`~shardmesh.mesh.addresses`'s
job; this module decides whom to dial, and when.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import trio

from .addresses import advertised_addrs, is_local_address, parse_join_address, with_peer_id
from .host import DIAL_TIMEOUT, HostError, MeshHost
from .mdns import run_mdns

log = logging.getLogger("shardmesh.mesh.discovery")

MAX_BACKOFF = 30.0  # seconds: the longest a dead peer waits between dials
FORGET_AFTER = 180.0  # seconds of continuous failure before a non-join peer is dropped
MAX_KNOWN_PEERS = 512  # non-join peers kept; beyond this add_known refuses new ones
MAX_ADDRS_PER_PEER = 8  # addresses kept per peer (records come from the network)
MAX_CONCURRENT_DIALS = 16
ATTEMPT_TIMEOUT = 2 * DIAL_TIMEOUT + 5  # one attempt may try a couple of addresses


@dataclass
class KnownPeer:
    """One peer the loop keeps dialling, and how its dials have been going."""

    peer_id: str
    addrs: list[str]  # full multiaddrs ending in /p2p/<peer_id>, best first
    source: str  # "join", "known" (add_known) or "mdns"
    failures: int = 0  # consecutive failed attempts
    failing_since: float | None = None  # trio clock of the first of those failures
    next_attempt: float = 0.0  # trio clock; 0 = as soon as the loop looks
    dialing: bool = False
    last_error: str = ""  # why the last dial failed, for the user (a join peer's, say)

    @property
    def is_join(self) -> bool:
        return self.source == "join"


def backoff(failures: int, base: float, cap: float) -> float:
    """Seconds to wait after ``failures`` consecutive failed dials: base, 2x, 4x... cap."""
    return min(cap, base * 2 ** max(0, failures - 1))


class Discovery:
    """Keeps this node connected to the peers it was told about or found on the LAN.

    Usage (``node/run.py``)::

        discovery = Discovery(mesh_host, config.join, mdns=config.mdns)  # ValueError on a bad --join
        await nursery.start(discovery.run)  # returns at once; bootstrapping goes on
        if not await discovery.wait_bootstrapped(10):
            log.warning("no --join peer reachable yet; still trying")

    Everything except :meth:`run` is synchronous and must be called from the trio
    thread that runs the node.
    """

    def __init__(
        self,
        mesh_host: MeshHost,
        join: list[str],
        *,
        mdns: bool,
        retry_interval: float = 5.0,
        max_backoff: float = MAX_BACKOFF,
        forget_after: float = FORGET_AFTER,
    ) -> None:
        if retry_interval <= 0:
            raise ValueError(f"retry_interval must be positive, got {retry_interval}")
        self._mesh = mesh_host
        self._mdns_enabled = mdns
        self.retry_interval = retry_interval
        self.max_backoff = max(max_backoff, retry_interval)
        self.forget_after = forget_after
        self._me = mesh_host.peer_id_str
        self._peers: dict[str, KnownPeer] = {}
        self._join_ids: set[str] = set()
        for address in join:
            peer_id, addr = parse_join_address(address)  # raises before anything starts
            if peer_id == self._me:
                # Handing every node the same --join list is convenient; the
                # bootstrap node then finds itself in it.
                log.info("--join %s is this node; skipped", addr)
                continue
            self._join_ids.add(peer_id)
            self._merge(peer_id, [addr], "join")
        self._bootstrapped = trio.Event()
        if not self._join_ids:
            self._bootstrapped.set()  # nothing to join: we are a new swarm
        self._wake = trio.Event()
        self._dial_limit = trio.CapacityLimiter(MAX_CONCURRENT_DIALS)

    # ---- what other components call -------------------------------------------

    @property
    def bootstrapped(self) -> trio.Event:
        """Set once a join peer is connected (at once when there are none)."""
        return self._bootstrapped

    async def wait_bootstrapped(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a join peer; True if one is connected."""
        with trio.move_on_after(timeout):
            await self._bootstrapped.wait()
        return self._bootstrapped.is_set()

    def join_errors(self) -> list[str]:
        """Why each ``--join`` peer's last dial failed (those that have failed)."""
        return [p.last_error for p in self._peers.values() if p.is_join and p.last_error]

    def add_known(self, peer_id_str: str, addrs: list[str]) -> bool:
        """Keep ``peer_id_str`` connected, dialling ``addrs`` (from its signed record).

        Addresses may or may not end in ``/p2p/<peer id>``; ones that name another
        peer or do not parse are dropped, never raised about, because records come
        from the network. New addresses for a peer we already know mean it may have
        restarted, so its back-off is reset and it is dialled at once. Returns
        whether the peer is (now) on the list.
        """
        return self._add(peer_id_str, addrs, "known")

    def known_peers(self) -> dict[str, KnownPeer]:
        """A snapshot of the peers the loop keeps dialling, by peer id."""
        return dict(self._peers)

    def connected(self) -> set[str]:
        """Peer ids (base58) with at least one open connection, whoever dialled."""
        network = self._mesh.host.get_network()
        live = set()
        for pid, conns in list(network.connections.items()):
            if any(not getattr(c, "is_closed", False) for c in conns):
                live.add(pid.to_base58())
        return live

    # ---- the loop ---------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Dial join peers, run mDNS if enabled, and redial until cancelled.

        ``task_status.started()`` is called at once: a node must come up even when
        its bootstrap peers are not up yet. Use :meth:`wait_bootstrapped` to wait.
        """
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._maintain)
            if self._mdns_enabled:
                nursery.start_soon(self._run_mdns)
            task_status.started()

    async def _maintain(self) -> None:
        async with trio.open_nursery() as dials:
            while True:
                now = trio.current_time()
                live = self.connected()
                self._note_live(live)
                self._forget_stale(now)
                next_due = now + self.retry_interval
                for peer in list(self._peers.values()):
                    if peer.peer_id in live or peer.dialing:
                        continue
                    if peer.next_attempt <= now:
                        peer.dialing = True
                        dials.start_soon(self._attempt, peer)
                    else:
                        next_due = min(next_due, peer.next_attempt)
                # A fresh event per round: add_known() or a finished dial sets it, so
                # new information is acted on without waiting out the interval.
                self._wake = trio.Event()
                with trio.move_on_at(next_due):
                    await self._wake.wait()

    def _note_live(self, live: set[str]) -> None:
        for pid in live & self._peers.keys():
            peer = self._peers[pid]
            peer.failures, peer.failing_since, peer.next_attempt = 0, None, 0.0
        if self._join_ids & live and not self._bootstrapped.is_set():
            log.info("bootstrapped: connected to join peer(s) %s", ", ".join(sorted(self._join_ids & live)))
            self._bootstrapped.set()

    def _forget_stale(self, now: float) -> None:
        for pid, peer in list(self._peers.items()):
            if peer.is_join or peer.failing_since is None or peer.dialing:
                continue
            if now - peer.failing_since >= self.forget_after:
                log.info("forgetting %s (%s): unreachable for %.0f s", pid, peer.source, now - peer.failing_since)
                del self._peers[pid]

    async def _attempt(self, peer: KnownPeer) -> None:
        """One dial attempt: each address in turn until one works. Never raises."""
        ok = False
        tried = list(peer.addrs)
        try:
            async with self._dial_limit:
                with trio.move_on_after(ATTEMPT_TIMEOUT):
                    for addr in list(peer.addrs):
                        if await self._dial(peer.peer_id, addr):
                            # Try what worked first next time.
                            peer.addrs = [addr] + [a for a in peer.addrs if a != addr]
                            ok = True
                            break
        except Exception as exc:  # noqa: BLE001 - a dial must never take the node down
            log.warning("dialling %s failed unexpectedly: %s: %s", peer.peer_id, type(exc).__name__, exc)
        finally:
            peer.dialing = False
            now = trio.current_time()
            if ok:
                peer.failures, peer.failing_since, peer.next_attempt, peer.last_error = 0, None, 0.0, ""
                if peer.is_join and not self._bootstrapped.is_set():
                    log.info("bootstrapped: connected to join peer %s", peer.peer_id)
                    self._bootstrapped.set()
            elif any(a not in tried for a in peer.addrs):
                # add_known() brought new addresses while we dialled the old ones:
                # that is news, not a failure; try them straight away.
                peer.next_attempt = 0.0
            else:
                peer.failures += 1
                if peer.failing_since is None:
                    peer.failing_since = now
                delay = backoff(peer.failures, self.retry_interval, self.max_backoff)
                # Jitter, so a swarm that lost a bootstrap node does not redial in step.
                peer.next_attempt = now + delay * random.uniform(0.8, 1.2)
                log.debug("%s unreachable (%d failures); next try in %.1f s", peer.peer_id, peer.failures, delay)
            self._wake.set()

    async def _dial(self, peer_id: str, addr: str) -> bool:
        if peer_id in self.connected():
            return True
        try:  # MeshHost.connect dials exactly this address (see its docstring)
            await self._mesh.connect(addr)
        except HostError as exc:
            log.debug("%s", exc)
            if (peer := self._peers.get(peer_id)) is not None:
                peer.last_error = str(exc)
            return False
        log.info("connected to %s at %s", peer_id, addr)
        return True

    # ---- adding peers -----------------------------------------------------------

    def _add(self, peer_id_str: str, addrs: list[str], source: str) -> bool:
        from libp2p.peer.id import ID

        try:
            peer_id = ID.from_base58(str(peer_id_str)).to_base58()
        except Exception:
            log.debug("ignoring peer with an invalid id %r", peer_id_str)
            return False
        if peer_id == self._me:
            return False
        cleaned = []
        for a in addrs or []:
            full = with_peer_id(a, peer_id)
            if full is None or (source == "mdns" and not is_local_address(full)):
                continue
            cleaned.append(full)
        if not cleaned:
            return peer_id in self._peers
        if peer_id not in self._peers and len(self._peers) - len(self._join_ids) >= MAX_KNOWN_PEERS:
            log.warning("not tracking %s: already tracking %d peers", peer_id, MAX_KNOWN_PEERS)
            return False
        if self._merge(peer_id, cleaned, source):
            self._wake.set()
        return True

    def _merge(self, peer_id: str, addrs: list[str], source: str) -> bool:
        """Add addresses to a peer (creating it); True when any were new."""
        peer = self._peers.get(peer_id)
        if peer is None:
            peer = self._peers[peer_id] = KnownPeer(peer_id, [], source)
        elif source == "join":
            peer.source = "join"  # join peers are never forgotten
        new = [a for a in addrs if a not in peer.addrs]
        if not new:
            return False
        # New addresses first: they are the freshest news of where the peer is.
        # Loopback last: from another machine it reaches ourselves, not the peer.
        merged = new + peer.addrs
        merged.sort(key=lambda a: "/ip4/127." in a or "/ip6/::1/" in a)
        peer.addrs = merged[:MAX_ADDRS_PER_PEER]
        # News about a peer (it may have restarted elsewhere): try it now.
        peer.failures, peer.next_attempt = 0, 0.0
        return True

    # ---- mDNS -------------------------------------------------------------------

    async def _run_mdns(self) -> None:
        """Advertise and browse until cancelled; peers found join the list as "mdns"."""

        def found(peer_id: str, addrs: list[str]) -> None:  # runs in the trio thread
            if self._add(peer_id, addrs, "mdns"):
                log.debug("mDNS: found %s at %s", peer_id, addrs)

        await run_mdns(self._me, advertised_addrs(self._mesh.addrs())[:MAX_ADDRS_PER_PEER], found)


__all__ = ["Discovery", "KnownPeer", "backoff"]
