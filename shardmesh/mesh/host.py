"""The libp2p host every node runs: identity, transports, and the hardening it needs.

py-libp2p 0.8.1 works, but several of its defaults do not suit a swarm of peers that
do not trust each other and send tensors to each other. What this module changes, and why:

* **Noise only.** By default a listener also accepts plaintext, secio and TLS dialers;
  a node that accepts plaintext can be impersonated. We pass Noise alone.
* **Yamux only.** Mplex moves tensor-sized frames several times more slowly.
* **One connection per peer.** With the default (three) every dial is much slower,
  even on loopback; one connection is all a node needs, since Yamux multiplexes every
  stream to that peer over it.
* **Handlers never raise.** An exception escaping a stream handler tears down the
  whole host, so :meth:`MeshHost.set_handler` wraps every handler: it logs, resets
  the stream, and the node keeps serving.
* **Restarted peers can be dialled at once.** After a failed dial the swarm refuses
  that peer for 60 s; an explicit :meth:`MeshHost.connect` lifts the block first.
* **A peer table strangers cannot break** (:mod:`.peer_table`): our own entry and our
  connected peers are never evicted from it, and record addresses stay out of it:
  :meth:`MeshHost.ensure_connected` asks :attr:`MeshHost.address_book` (the swarm
  view) where a peer listens only when something needs to talk to that peer.
* **No dialling of the whole peer table.** py-libp2p's auto-connector dials up to 200
  peers from the table whenever a node has fewer than 100 connections, every 30 s and
  after each disconnect: every peer id a stranger slipped into the table (DHT answers,
  gossipsub peer exchange) would be dialled, an attacker-chosen address hundreds of
  times. A node dials a peer when a chain, a sync or a lookup needs it, not before.
"""

from __future__ import annotations

import logging
import os
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

import trio
from multiaddr import Multiaddr

from .addresses import advertised_addrs
from .names import NameNotResolved, dial_targets, resolve_names
from .relay_dial import UPGRADE_TIMEOUT, dial_through_relay, is_circuit
from .peer_table import PinnedPeerStore
from .record_checks import MAX_ADDRS
from .swarm_key import SwarmKey, require_swarm_key

log = logging.getLogger("shardmesh.mesh.host")

# py-libp2p's Yamux answers every read with a WINDOW_UPDATE frame unless told to batch
# them the way go-yamux does (one update per half window). On a decode step's small
# frames that doubles the messages each hop handles, and a frame's round trip between
# two processes gets measurably faster with batching. The setting is read on every
# read, so setting it before any host runs is enough.
os.environ.setdefault("PY_YAMUX_RELEASE_ON_READ", "0")

DEFAULT_LISTEN = "/ip4/0.0.0.0/tcp/4001"
DIAL_TIMEOUT = 10.0  # seconds for one dial (TCP + Noise + Yamux)
STREAM_OPEN_TIMEOUT = 10.0  # seconds to open a stream and agree on its protocol
STREAM_OPEN_ATTEMPTS = 4


class HostError(Exception):
    """A dial or stream that could not be made; the message says to whom and why."""


def port_in_use(address: str) -> bool:
    """True if another process listens on ``address``'s TCP port (``/ip4|ip6/HOST/tcp/PORT``).

    py-libp2p listens with SO_REUSEPORT (for hole punching), so a second node started on
    the same port binds without error and the kernel then splits incoming connections
    between the two nodes. A plain bind, without that option, tells us first.
    """
    import socket

    parts = address.split("/")
    if len(parts) < 5 or parts[1] not in ("ip4", "ip6") or parts[3] != "tcp" or not parts[4].isdigit():
        return False
    port = int(parts[4])
    if port == 0:
        return False
    family = socket.AF_INET6 if parts[1] == "ip6" else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((parts[2], port))
        except OSError:
            return True
    return False


def remote_ip(stream) -> str | None:
    """The IP of the libp2p connection under ``stream``; None for the in-process pipe and
    for a relayed connection (whose socket's far end is the relay, not the peer)."""
    if is_relayed(stream):
        return None
    address = getattr(stream, "get_remote_address", lambda: None)()
    return address[0] if address else None


def is_relayed(stream_or_conn) -> bool:
    """Whether a stream's (or muxed connection's) connection runs through a relay."""
    from libp2p.connection_types import ConnectionType

    conn = getattr(stream_or_conn, "muxed_conn", stream_or_conn)
    try:
        return conn.get_connection_type() == ConnectionType.RELAYED
    except Exception:  # noqa: BLE001 - the in-process pipe, or a connection being torn down
        return False


def peer_id_of(key_pair):
    from libp2p.peer.id import ID

    return ID.from_pubkey(key_pair.public_key)


def _new_host(key_pair, listen: list[Multiaddr]):
    from libp2p import new_host
    from libp2p.crypto.x25519 import create_new_key_pair as new_x25519
    from libp2p.network.config import ConnectionConfig
    from libp2p.security.noise.transport import PROTOCOL_ID as NOISE, Transport as Noise
    from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX, Yamux

    return new_host(
        key_pair=key_pair,
        peerstore_opt=PinnedPeerStore(peer_id_of(key_pair)),
        sec_opt={NOISE: Noise(key_pair, noise_privkey=new_x25519().private_key)},
        muxer_opt={YAMUX: Yamux},
        listen_addrs=listen,
        connection_config=ConnectionConfig(max_connections_per_peer=1, dial_timeout=DIAL_TIMEOUT),
    )


Handler = Callable[[object], Awaitable[None]]


@dataclass
class MeshHost:
    """A running libp2p host plus the few operations the rest of the mesh uses."""

    host: object  # libp2p IHost
    key_pair: object
    # Where a peer we are not connected to listens (base58 peer id -> multiaddrs with
    # /p2p/): the registry points this at the swarm view's signed records.
    address_book: Callable[[str], list[str]] = lambda peer: []
    # Told each peer we reach through a relay (hole_punch.py starts punching at once).
    relayed_dial: Callable[[object], None] = lambda peer_id: None
    _dial_locks: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        peerstore = self.host.get_peerstore()
        if isinstance(peerstore, PinnedPeerStore):
            connections = self.host.get_network().connections
            peerstore.keep = lambda peer_id: peer_id in connections

    @property
    def peer_id(self):
        return self.host.get_id()

    @property
    def peer_id_str(self) -> str:
        return self.host.get_id().to_base58()

    def addrs(self) -> list[Multiaddr]:
        """Listening addresses with ``/p2p/<peer id>``, ready to hand to ``--join``."""
        return list(self.host.get_addrs())

    def dialable_addrs(self) -> list[str]:
        """Addresses worth publishing, with ``/p2p/<peer id>``: a wildcard listen address
        becomes one address per interface (loopback included, so local swarms work).
        A record holds at most ``MAX_ADDRS``: on a machine with more interfaces (container
        bridges, many IPv6 addresses) loopback addresses are left out first, then the last ones."""
        addrs = advertised_addrs(self.addrs())
        if len(addrs) > MAX_ADDRS:
            loopback = ("/ip4/127.", "/ip6/::1/")
            addrs = [a for a in addrs if not a.startswith(loopback)] + [a for a in addrs if a.startswith(loopback)]
        return addrs[:MAX_ADDRS]

    def set_handler(self, protocol: str, handler: Handler) -> None:
        """Serve ``protocol``; whatever ``handler`` raises is logged and the stream reset."""

        async def guarded(stream) -> None:
            try:
                await handler(stream)
            except trio.Cancelled:
                raise
            except BaseException as exc:  # noqa: BLE001 - nothing may reach the host
                if not isinstance(exc, Exception):
                    raise
                log.warning("%s handler failed: %s: %s", protocol, type(exc).__name__, exc)
                await reset_quietly(stream)

        self.host.set_stream_handler(protocol, guarded)

    async def connect(self, address: str | Multiaddr):
        """Dial ``address`` (which must end in ``/p2p/<peer id>``); returns the peer id.
        A DNS name in it is resolved by the system resolver on each call (:mod:`.names`)."""
        from libp2p.peer.peerinfo import info_from_p2p_addr

        try:
            info = info_from_p2p_addr(Multiaddr(str(address)))
        except Exception as exc:
            raise HostError(f"{address}: not a multiaddr ending in /p2p/<peer id> ({exc})") from exc
        if info.peer_id == self.peer_id:
            return info.peer_id
        async with self._dial_lock(info.peer_id):
            if info.peer_id in self.host.get_network().connections:
                return info.peer_id
            try:  # a /dns4/ name: the system resolver's addresses (see names.py)
                targets = await resolve_names(str(address))
            except NameNotResolved as exc:
                raise HostError(f"dialling {address} failed: {exc}") from exc
            failure: HostError | None = None
            for target in targets:
                # py-libp2p dials only the *first* TCP address in the peerstore, whatever
                # address connect() was given: a peer that restarted on a new port would
                # be dialled at its old one forever. Drop the stale ones first.
                self.host.get_peerstore().clear_addrs(info.peer_id)
                try:
                    await self._dial(info_from_p2p_addr(Multiaddr(target)), str(address))
                    return info.peer_id
                except HostError as exc:
                    failure = exc
            assert failure is not None  # resolve_names returns at least one address
            raise failure

    def _dial_lock(self, peer_id) -> trio.Lock:
        """One dial per peer at a time. Concurrent dials to one peer (five sessions
        opening at once) make several connections; the one-connection limit then
        closes some of them, with the streams just opened on them."""
        lock = self._dial_locks.get(peer_id)
        if lock is None:
            lock = self._dial_locks[peer_id] = trio.Lock()
        return lock

    async def _dial(self, info, what: str) -> None:
        if len(info.addrs) == 1 and is_circuit(info.addrs[0]):
            await self._dial_through_relay(info.peer_id, str(info.addrs[0]), what)
            return
        self.host.get_network().unblock_peer(info.peer_id)  # a restarted peer: dial it now
        try:
            with trio.fail_after(DIAL_TIMEOUT + 1):
                await self.host.connect(info)
        except trio.TooSlowError as exc:
            raise HostError(f"dialling {what} timed out") from exc
        except Exception as exc:
            raise HostError(f"dialling {what} failed: {exc}") from exc

    async def _dial_through_relay(self, peer_id, circuit: str, what: str) -> None:
        """``circuit`` is ``<relay address>/p2p/<relay>/p2p-circuit``: reach the relay, then
        ask it to connect us (:mod:`.relay_dial`)."""
        relay_address = circuit.split("/p2p-circuit")[0]
        try:
            relay = await self.connect(relay_address)
            with trio.fail_after(DIAL_TIMEOUT + UPGRADE_TIMEOUT):
                await dial_through_relay(self.host, relay, peer_id, Multiaddr(f"{circuit}/p2p/{peer_id.to_base58()}"))
            self.relayed_dial(peer_id)
        except HostError as exc:
            raise HostError(f"dialling {what} through its relay: {exc}") from exc
        except trio.TooSlowError as exc:
            raise HostError(f"dialling {what} through its relay timed out") from exc
        except Exception as exc:
            raise HostError(f"dialling {what} through its relay failed: {exc}") from exc

    def protect(self, peer_id) -> None:
        """Never trim connections to ``peer_id``. Two peers that dial each other at
        once end up with two connections; py-libp2p then closes one of them, possibly
        the one carrying a running chain's streams. Peers we run inference with are
        protected from that (a few extra idle connections cost nothing)."""
        try:
            self.host.get_network().protect(peer_id, "shardmesh-infer")
        except Exception as exc:
            log.debug("protecting %s: %s", peer_id, exc)

    async def ensure_connected(self, peer_id) -> None:
        """Dial ``peer_id`` unless connected: at the addresses its record names (the
        :attr:`address_book`), else at those the peer table holds (a peer we dialled
        by address, e.g. ``--join``).

        Record addresses are tried one by one, in the record's order, loopback ones
        last: py-libp2p given several dials only the first of each kind, so a record
        whose first address is stale or wrong (a lying dial-back peer) would make the
        peer undialable although a later address works."""
        from libp2p.peer.peerinfo import PeerInfo

        async with self._dial_lock(peer_id):
            if peer_id in self.host.get_network().connections:
                return
            addrs = [Multiaddr(a) for a in await dial_targets(self.address_book(peer_id.to_base58()))]
            peerstore = self.host.get_peerstore()
            if not addrs:
                try:
                    addrs = peerstore.addrs(peer_id)
                except Exception:  # PeerStoreError: never heard of, or expired
                    addrs = []
                if not addrs:
                    raise HostError(f"no known address for {peer_id}")
                await self._dial(PeerInfo(peer_id, addrs), str(peer_id))
                return
            failure: HostError | None = None
            for addr in addrs:
                peerstore.clear_addrs(peer_id)  # py-libp2p dials the first one it holds
                try:
                    await self._dial(PeerInfo(peer_id, [addr]), f"{peer_id} at {addr}")
                    return
                except HostError as exc:
                    failure = exc
            assert failure is not None
            raise failure

    async def dial_peer(self, peer: str) -> None:
        """:meth:`ensure_connected` by base58 peer id."""
        from libp2p.peer.id import ID

        await self.ensure_connected(ID.from_base58(peer))

    def connection_kind(self, peer: str) -> str | None:
        """How we are connected to ``peer`` now: ``direct``, ``relayed`` or None."""
        from libp2p.peer.id import ID

        try:
            conns = self.host.get_network().get_connections(ID.from_base58(peer))
        except Exception:  # noqa: BLE001 - not a peer id
            return None
        if not conns:
            return None
        return "relayed" if all(is_relayed(c.muxed_conn) for c in conns) else "direct"

    def is_connected(self, peer: str) -> bool:
        return any(p.to_base58() == peer for p in self.host.get_network().connections)

    async def open_stream(self, peer_id, protocol: str):
        """A new stream to a peer we know addresses for (dialling if needed).

        Retried a few times: when two peers dial each other at once, the one-connection
        limit closes one of the two connections, and a stream opened on it just then
        fails with "no valid connections" although the peer is perfectly reachable.
        """
        last: Exception | None = None
        with trio.move_on_after(STREAM_OPEN_TIMEOUT):
            for attempt in range(STREAM_OPEN_ATTEMPTS):
                try:
                    await self.ensure_connected(peer_id)
                    return await self.host.new_stream(peer_id, [protocol])
                except Exception as exc:
                    last = exc
                    log.debug("opening %s to %s failed (attempt %d): %s", protocol, peer_id, attempt + 1, exc)
                    await trio.sleep(0.05 * (attempt + 1))
        if last is None:
            raise HostError(f"opening {protocol} to {peer_id} timed out")
        raise HostError(f"opening {protocol} to {peer_id} failed: {last}") from last

    def connected_peers(self) -> list:
        return list(self.host.get_network().connections.keys())


async def reset_quietly(stream) -> None:
    """Reset, never raising. Shielded, like every stream write (see wire.FrameStream.write)."""
    with trio.CancelScope(shield=True), trio.move_on_after(5):
        try:
            await stream.reset()
        except Exception:
            pass


async def close_quietly(stream) -> None:
    """Close our side (the peer reads an end of stream), never raising; shielded."""
    with trio.CancelScope(shield=True), trio.move_on_after(5):
        try:
            await stream.close()
        except Exception:
            pass


async def _dial_nobody() -> None:
    """The auto-connector's round, replaced (see the module docstring)."""
    await trio.lowlevel.checkpoint()


@asynccontextmanager
async def running_host(key_pair, listen: list[str], swarm_key: SwarmKey | None = None) -> AsyncIterator[MeshHost]:
    """Start a host listening on ``listen`` and stop it when the block exits. With
    ``swarm_key``, every connection it makes or takes needs that key (:mod:`.swarm_key`)."""
    try:
        maddrs = [Multiaddr(a) for a in listen]
    except Exception as exc:
        raise ValueError(f"--listen {listen}: not a multiaddr ({exc})") from exc
    host = _new_host(key_pair, maddrs)
    host.get_network().auto_connector.maybe_connect = _dial_nobody
    if swarm_key is not None:
        require_swarm_key(host, swarm_key)
    try:
        async with host.run(listen_addrs=maddrs):
            yield MeshHost(host, key_pair)
    finally:
        # Leaving run() leaves the TCP listener open (it lives in a system task);
        # close() really stops accepting.
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            try:
                await host.close()
            except Exception as exc:
                log.debug("closing the host: %s", exc)
