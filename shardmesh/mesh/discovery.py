"""Finding peers and staying connected to them: ``--join`` addresses, mDNS, reconnects.

A node learns about other nodes in three ways, and this module turns all three into
one list of *peers worth being connected to*, which a single loop keeps dialling:

* **Join addresses** (``--join /ip4/.../tcp/4001/p2p/12D3Koo...``), given by the user.
  They are checked when :class:`Discovery` is built (a typo is a ``ValueError`` that
  names the address, before anything starts) and are never forgotten: a bootstrap
  node that starts after us, or restarts, is dialled again until it answers. Without
  ``--join`` the node simply starts a new swarm. There is no built-in list of public
  bootstrap nodes: we never dial an address nobody gave us.
* **mDNS** on the local network (``--no-mdns`` turns it off). We use ``zeroconf``
  directly rather than py-libp2p's ``MDNSDiscovery``; see :class:`_Mdns` for why.
  Only private, loopback and link-local addresses learned this way are dialled, so a
  LAN host cannot make us dial out to the internet by advertising a public address.
* **add_known()**, for other components (the registry, from signed records).

The loop wakes every ``retry_interval`` seconds (sooner when a peer is added) and
dials every listed peer that is not connected. Each peer has its own back-off
(``retry_interval``, doubled on every failure, capped at ``max_backoff``) so a dead
peer is not hammered, and a peer that is not a join peer is forgotten once it has
failed for ``forget_after`` seconds. A peer that was connected and drops is dialled
again at the next wake-up; :meth:`MeshHost.connect` lifts py-libp2p's 60 s negative
dial cache, so a restarted peer is reached again at once.

Nothing here raises into the host: dial errors and mDNS errors are logged and the
node keeps going.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import secrets
import string
from dataclasses import dataclass
from typing import Callable

import trio
from multiaddr import Multiaddr

from .host import DIAL_TIMEOUT, HostError, MeshHost, advertised_addrs

log = logging.getLogger("shardmesh.mesh.discovery")

MAX_BACKOFF = 30.0  # seconds: the longest a dead peer waits between dials
FORGET_AFTER = 180.0  # seconds of continuous failure before a non-join peer is dropped
MAX_KNOWN_PEERS = 512  # non-join peers kept; beyond this add_known refuses new ones
MAX_ADDRS_PER_PEER = 8  # addresses kept per peer (records come from the network)
MAX_CONCURRENT_DIALS = 16
ATTEMPT_TIMEOUT = 2 * DIAL_TIMEOUT + 5  # one attempt may try a couple of addresses

MDNS_SERVICE = "_p2p._udp.local."  # the libp2p mDNS spec's service type
MDNS_QUERY_TIMEOUT_MS = 3000  # waiting for a found service's TXT and A records
MDNS_STOP_TIMEOUT = 5.0  # seconds: unregistering sends goodbye packets


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

    @property
    def is_join(self) -> bool:
        return self.source == "join"


def parse_join_address(address: str) -> tuple[str, str]:
    """Check one ``--join`` address; returns ``(peer id, address)``.

    The address must be a multiaddr with a transport part and a trailing
    ``/p2p/<peer id>``: without the peer id the Noise handshake could not prove we
    reached the node we meant. Raises ``ValueError`` naming the address otherwise.
    """
    from libp2p.peer.id import ID

    text = str(address).strip()
    try:
        ma = Multiaddr(text)
        protos = [p.name for p in ma.protocols()]
    except Exception as exc:
        raise ValueError(f"--join {address!r}: not a multiaddr ({exc})") from None
    if not protos or protos[-1] != "p2p":
        example = "/ip4/10.0.0.5/tcp/4001/p2p/12D3KooW..."
        raise ValueError(f"--join {address!r}: must end in /p2p/<peer id> (e.g. {example})")
    if len(protos) < 2:
        raise ValueError(f"--join {address!r}: a peer id but no address to dial (put /ip4/.../tcp/... before it)")
    peer_text = text.rsplit("/p2p/", 1)[1].strip("/")
    try:
        peer_id = ID.from_base58(peer_text).to_base58()
    except Exception:
        raise ValueError(f"--join {address!r}: {peer_text!r} is not a valid peer id") from None
    return peer_id, text


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
                peer.failures, peer.failing_since, peer.next_attempt = 0, None, 0.0
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
            full = _with_peer_id(a, peer_id)
            if full is None or (source == "mdns" and not _is_local_address(full)):
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
        """Advertise and browse until cancelled; on any failure, log and go without."""
        token = trio.lowlevel.current_trio_token()

        def found(peer_id: str, addrs: list[str]) -> None:  # runs in the trio thread
            if self._add(peer_id, addrs, "mdns"):
                log.debug("mDNS: found %s at %s", peer_id, addrs)

        service = _Mdns(self._me, advertised_addrs(self._mesh.addrs())[:MAX_ADDRS_PER_PEER], found, token)
        try:
            # Zeroconf() opens sockets and register_service() probes the network for
            # ~1.6 s, synchronously: on the event loop that would freeze the node.
            await trio.to_thread.run_sync(service.start)
            log.info("mDNS: advertising %s", ", ".join(service.addrs) or "nothing (no usable address)")
            await trio.sleep_forever()
        except Exception as exc:  # noqa: BLE001 - no multicast is a reason to go on without mDNS
            log.warning("mDNS disabled: %s: %s", type(exc).__name__, exc)
        finally:
            # Shielded so the goodbye packets go out on cancellation; abandoned after a
            # deadline so a wedged zeroconf cannot hold up shutdown.
            with trio.CancelScope(shield=True):
                with trio.move_on_after(MDNS_STOP_TIMEOUT):
                    await trio.to_thread.run_sync(service.stop, abandon_on_cancel=True)


class _Mdns:
    """The libp2p mDNS spec on top of zeroconf, kept off the trio loop.

    Why not py-libp2p's ``MDNSDiscovery`` (0.8.1): its ``start()`` calls
    ``trio.lowlevel.spawn_system_task`` and so cannot run in a worker thread, yet it
    blocks the loop ~1.6 s; it finds its own IP by a UDP ``connect()`` to 8.8.8.8;
    it writes the peerstore from zeroconf's threads; and it puts each address under
    its own TXT key (``dnsaddr``, ``dnsaddr2``...) where the spec (and go/js-libp2p)
    repeat ``dnsaddr=``. Here: service ``<random>._p2p._udp.local.``, one
    ``dnsaddr=<multiaddr>/p2p/<id>`` TXT string per address.

    ``start`` and ``stop`` block (call them through ``trio.to_thread``). Found peers
    are handed to ``found`` in the trio thread via ``trio.from_thread``. An mDNS
    answer is unauthenticated; that is fine because the Noise handshake proves the
    peer id when we dial.
    """

    def __init__(self, peer_id: str, addrs: list[str], found: Callable[[str, list[str]], None], token) -> None:
        self.peer_id = peer_id
        self.addrs = addrs
        self._found = found
        self._token = token
        alphabet = string.ascii_lowercase + string.digits
        # Spec: a random peer name of 32-63 characters, not the peer id.
        self.name = "".join(secrets.choice(alphabet) for _ in range(40))
        self._zc = None
        self._browser = None
        self._stopped = False

    def start(self) -> None:
        from zeroconf import ServiceBrowser, ServiceInfo, Zeroconf

        self._zc = Zeroconf()
        ips = sorted({_ip_of(a) for a in self.addrs} - {None})
        if ips:
            txt = b"".join(_txt_string(f"dnsaddr={a}") for a in self.addrs if len(a) <= 240)
            info = ServiceInfo(
                MDNS_SERVICE,
                f"{self.name}.{MDNS_SERVICE}",
                port=_port_of(self.addrs[0]) or 0,
                properties=txt,
                server=f"{self.name}.local.",
                parsed_addresses=ips,
            )
            self._zc.register_service(info, allow_name_change=True)
        if self._stopped:  # stop() ran while we were starting
            return
        self._browser = ServiceBrowser(self._zc, MDNS_SERVICE, handlers=[self._on_change])

    def stop(self) -> None:
        self._stopped = True
        try:
            if self._browser is not None:
                self._browser.cancel()
        except Exception as exc:
            log.debug("mDNS browser cancel: %s", exc)
        try:
            if self._zc is not None:
                self._zc.close()  # unregisters (goodbye packets) and closes sockets
        except Exception as exc:
            log.debug("mDNS close: %s", exc)

    def _on_change(self, zeroconf, service_type: str, name: str, state_change) -> None:
        """Runs in zeroconf's browser thread, so it may block (get_service_info)."""
        from zeroconf import ServiceStateChange

        if self._stopped or state_change not in (ServiceStateChange.Added, ServiceStateChange.Updated):
            return
        if name == f"{self.name}.{MDNS_SERVICE}":
            return
        try:
            info = zeroconf.get_service_info(service_type, name, timeout=MDNS_QUERY_TIMEOUT_MS)
            if info is None or not info.text:
                return
            by_peer: dict[str, list[str]] = {}
            for entry in _txt_strings(info.text):
                if entry.startswith(b"dnsaddr="):
                    addr = entry[len(b"dnsaddr=") :].decode("utf-8", "replace")
                    if "/p2p/" in addr:
                        by_peer.setdefault(addr.rsplit("/p2p/", 1)[1], []).append(addr)
            for peer_id, addrs in by_peer.items():
                if peer_id != self.peer_id and not self._stopped:
                    trio.from_thread.run_sync(self._found, peer_id, addrs, trio_token=self._token)
        except trio.RunFinishedError:
            pass
        except Exception as exc:  # noqa: BLE001 - a bad answer from the LAN is not our crash
            log.debug("mDNS: ignoring %s: %s: %s", name, type(exc).__name__, exc)


# ---- small helpers --------------------------------------------------------------


def _with_peer_id(addr: str, peer_id: str) -> str | None:
    """``addr`` ending in ``/p2p/<peer_id>``; None if it names another peer or is junk."""
    text = str(addr).strip()
    if "/p2p/" in text:
        base, named = text.rsplit("/p2p/", 1)
        if named.strip("/") != peer_id:
            return None
    else:
        base = text
    try:
        if not Multiaddr(base).protocols():
            return None
        return str(Multiaddr(f"{base}/p2p/{peer_id}"))
    except Exception:
        return None


def _ip_of(addr: str) -> str | None:
    parts = addr.split("/")
    if len(parts) > 2 and parts[1] in ("ip4", "ip6"):
        return parts[2]
    return None


def _port_of(addr: str) -> int | None:
    parts = addr.split("/")
    for i, p in enumerate(parts[:-1]):
        if p == "tcp":
            try:
                return int(parts[i + 1])
            except ValueError:
                return None
    return None


_CGNAT = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT; also Tailscale


def _is_local_address(addr: str) -> bool:
    """Whether an mDNS-learned address stays on this machine or the LAN.

    Private, loopback, link-local and CGNAT IPs, and ``.local`` names. A public IP in
    an mDNS answer is refused: answering mDNS must not be a way to make us dial out.
    """
    parts = addr.split("/")
    if len(parts) < 3:
        return False
    kind, value = parts[1], parts[2]
    if kind in ("dns", "dns4", "dns6"):
        return value.lower().rstrip(".").endswith(".local")
    if kind not in ("ip4", "ip6"):
        return False
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        return False
    if ip.is_unspecified or ip.is_multicast:
        return False
    return ip.is_private or ip.is_loopback or ip.is_link_local or (ip.version == 4 and ip in _CGNAT)


def _txt_string(text: str) -> bytes:
    data = text.encode()[:255]  # callers keep strings short; a TXT string holds 255 bytes
    return bytes([len(data)]) + data


def _txt_strings(raw: bytes) -> list[bytes]:
    """Split a raw TXT record into its length-prefixed strings (RFC 1035 3.3.14)."""
    out, i = [], 0
    while i < len(raw):
        n = raw[i]
        out.append(raw[i + 1 : i + 1 + n])
        i += 1 + n
    return out


__all__ = ["Discovery", "KnownPeer", "backoff", "parse_join_address"]
