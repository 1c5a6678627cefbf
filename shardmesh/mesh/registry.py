"""The registry: this node's live view of the swarm, built from signed NodeRecords.

It composes three parts and owns what ties them together, our own record:

* the **view** (:mod:`.swarm_view`): the verified records, one per peer, highest
  ``seq`` winning, each gone at its expiry; what routing, the span keeper,
  ``shardmesh status`` and ``/v1/swarm`` read, through :meth:`Registry.servers`;
* **gossip** (:mod:`.gossip`): every node publishes its signed record on change and
  every ``publish_interval`` seconds, and merges everyone else's;
* the **DHT** (:mod:`.dht`): every node stores its record there and provides the
  blocks it serves, so a newcomer in a large swarm can ask "who serves block i?"
  (:meth:`Registry.lookup_block`) instead of waiting for gossip.

A newcomer that must see everyone now (a ``--layers auto`` node about to choose its
blocks) also asks a few peers for their whole view: :meth:`Registry.sync_from`.

Everything that enters the view is verified (signature from the peer id itself, model,
expiry); ``docs/PROTOCOL.md`` gives the record's wire format and the checks.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable

import trio

from ..placement.spans import ServerView, coverage
from .dht import LOOKUP_TIMEOUT, REPROVIDE_INTERVAL, SwarmDht
from .gossip import Gossip, records_topic
from .liveness import DisconnectWatcher, check_peer
from .host import MeshHost
from .without_cancel import StillRunning
from .records import MAX_RECORD_LIFETIME, RECORD_TTL, NodeRecord, expires_at, record_json, sign_record
from .registry_stats import RegistryStats
from .swarm_map import SwarmMapError, fetch_swarm_map
from .swarm_view import SwarmView
from .view_room import ViewRoom

__all__ = ["Registry", "RegistryStats", "records_topic"]

log = logging.getLogger("shardmesh.mesh.registry")

SYNC_TIMEOUT = 5.0  # for a newcomer to get a peer's whole view (sync_from)
MIN_PUBLISH_GAP = 0.2  # a burst of update_local() calls becomes one message per gap


class Registry:
    """Live, verified, expiring table of the swarm's NodeRecords for one model.

    ``local`` is this node's own record (None for a pure observer, e.g. a
    ``shardmesh status`` probe). The registry owns its ``seq`` and ``expires``: every
    publish re-signs it with ``seq`` = max(seq + 1, unix ms) (monotonic across restarts,
    so a restarted node's record beats its old one) and ``expires`` = now + ttl.

    ``allowed`` (a private swarm's list, :mod:`.allow_list`) keeps every other peer's
    record out of the view, gossip and the DHT.

    Run it inside the node's nursery: ``await nursery.start(registry.run)``; it returns
    once subscribed, and keeps publishing, providing and merging until cancelled.
    """

    def __init__(
        self,
        mesh_host: MeshHost,
        model_id: str,
        local: NodeRecord | None,
        *,
        ttl: float = RECORD_TTL,
        publish_interval: float = 5.0,
        reprovide_interval: float = REPROVIDE_INTERVAL,
        allowed: Callable[[str], bool] | None = None,
    ) -> None:
        if not 0 < ttl <= MAX_RECORD_LIFETIME:
            raise ValueError(f"ttl must be in (0, {MAX_RECORD_LIFETIME:.0f}] s, got {ttl}")
        if not 0 < publish_interval < ttl:
            raise ValueError(f"publish_interval ({publish_interval}) must be below the ttl ({ttl}) or records lapse")
        if local is not None:
            if local.peer != mesh_host.peer_id_str:
                raise ValueError(f"local record is for {local.peer}, but this host is {mesh_host.peer_id_str}")
            if local.model != model_id:
                raise ValueError(f"local record is for model {local.model}, registry for {model_id}")
        self.mesh_host = mesh_host
        self.model_id = model_id
        self.topic = records_topic(model_id)
        self.ttl = ttl
        self.publish_interval = publish_interval
        self.reprovide_interval = reprovide_interval
        self.stats = RegistryStats()

        self._me = mesh_host.peer_id_str
        self._local = local
        self._seq = local.seq if local is not None else 0
        self._latest: tuple[NodeRecord, bytes] | None = None  # last signed local record
        self._publish_wake = trio.Event()
        self._running = False
        own = self._me if local is not None else None
        total = local.total_blocks if local is not None else None  # records disagreeing are refused
        room = ViewRoom(pinned=self.is_connected)
        self.view = SwarmView(model_id, own, stats=self.stats, total_blocks=total, room=room, allowed=allowed)
        # Record addresses stay out of py-libp2p's peer table: a dial looks them up here.
        mesh_host.address_book = self.view.addresses
        self.gossip = Gossip(mesh_host, model_id, self.view, self.stats)
        self.swarm_dht = SwarmDht(
            mesh_host, model_id, self.view, self.stats, ttl=ttl, reprovide_interval=reprovide_interval
        )

    @property
    def pubsub(self) -> Any:
        """py-libp2p's Pubsub while :meth:`run` runs, else None."""
        return self.gossip.pubsub

    @property
    def dht(self) -> Any:
        """py-libp2p's KadDHT while :meth:`run` runs, else None."""
        return self.swarm_dht.kad

    # --- reading the view --------------------------------------------------------------

    def records(self) -> list[NodeRecord]:
        """Live verified records, ours included, sorted by peer id."""
        return self.view.records()

    def get(self, peer: str) -> NodeRecord | None:
        return self.view.get(peer)

    def servers(self) -> list[ServerView]:
        """The one view of servers: what placement and routing see of the live records
        that serve blocks."""
        return self.view.servers()

    def peers_serving(self, block: int) -> list[NodeRecord]:
        """Live records whose span covers ``block`` (any state; routing decides)."""
        return self.view.peers_serving(block)

    def unreachable_for(self) -> dict[str, float]:
        """Peer -> seconds since this node found it unreachable (liveness.py), for the
        peers in the view."""
        now = time.time()
        marks = ((r.peer, self.view.liveness.since(r.peer)) for r in self.records())
        return {peer: now - since for peer, since in marks if since is not None}

    def signed_records(self) -> list[bytes]:
        """The signed envelopes of :meth:`records` (ours as last signed), in the same order."""
        return self.view.signed_records()

    @property
    def local(self) -> NodeRecord | None:
        """Our record as last signed (or as given, before the first publish)."""
        if self._local is None:
            return None
        return self.view.own_record() or self._local

    def total_blocks(self) -> int:
        if self._local is not None:
            return self._local.total_blocks
        return max((r.total_blocks for r in self.records()), default=0)

    async def wait_changed(self, timeout: float | None = None) -> bool:
        """Wait for the next change of the view; False if ``timeout`` passed first.

        A change is a peer appearing or expiring, or a record saying something new
        (span, state, load, addresses...); a plain refresh (new seq/expiry) is not one.
        """
        return await self.view.wait_changed(timeout)

    def to_json(self) -> dict[str, Any]:
        """The swarm map for ``GET /v1/swarm``: records plus per-block coverage.

        ``coverage[i]`` counts the ``online`` servers of block i: joining nodes have
        not loaded their weights yet and draining ones take no new sessions.
        """
        now = time.time()
        total = self.total_blocks()
        return {
            "model": self.model_id,
            "total_blocks": total,
            "local_peer": self._me,
            "peers": [self._peer_json(r, now) for r in self.records()],
            "coverage": coverage(self.servers(), total),
        }

    def _peer_json(self, record: NodeRecord, now: float) -> dict[str, Any]:
        peer = record_json(record, now)
        since = self.view.liveness.since(record.peer)
        peer["connection"] = self.mesh_host.connection_kind(record.peer)  # direct, relayed or None
        peer["unreachable"] = since is not None
        if since is not None:
            peer["unreachable_for"] = round(now - since, 1)  # seconds since this node found it so
        return peer

    # --- changing our record -----------------------------------------------------------

    def update_local(self, **changes: Any) -> NodeRecord:
        """Change fields of our record (span, state, throughput, rtt...) and publish soon.

        ``peer`` and ``model`` are fixed for the registry's life; ``seq`` and ``expires``
        are set on every publish. The new record is checked now (sign_record's checks),
        so a bad span fails here rather than being silently dropped by peers.
        """
        if self._local is None:
            raise RuntimeError("this registry has no local record to update")
        fixed = {"peer", "model", "seq", "expires"} & changes.keys()
        if fixed:
            raise ValueError(f"{sorted(fixed)} cannot be changed with update_local")
        if "addrs" in changes:
            changes["addrs"] = tuple(changes["addrs"])
        updated = dataclasses.replace(self._local, **changes)
        sign_record(dataclasses.replace(updated, expires=expires_at(self.ttl)), self.mesh_host.key_pair)
        self._local = updated
        self._publish_wake.set()
        return updated

    def _sign_next(self) -> tuple[NodeRecord, bytes]:
        """Re-sign our record with a higher seq and a fresh expiry; install it in the view."""
        assert self._local is not None
        self._seq = max(self._seq + 1, int(time.time() * 1000))
        record = dataclasses.replace(self._local, seq=self._seq, expires=expires_at(self.ttl))
        envelope = sign_record(record, self.mesh_host.key_pair)
        previous = self.view.own_record()
        self.view.set_own(record, envelope)
        self._latest = (record, envelope)
        self.swarm_dht.record_signed(span_changed=previous is None or previous.span != record.span)
        return record, envelope

    def _signed(self) -> tuple[NodeRecord, bytes]:
        assert self._latest is not None
        return self._latest

    # --- running -----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Registry] = trio.TASK_STATUS_IGNORED) -> None:
        """Start gossip and DHT, subscribe, then publish/provide/merge until cancelled."""
        if self._running:
            raise RuntimeError("Registry.run() is already running")
        self._running = True
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.gossip.run)
                publishing = self._local is not None
                if publishing:
                    self._sign_next()  # our record is in the view before anyone asks
                signed = self._signed if publishing else None
                await nursery.start(self.swarm_dht.run, self.gossip.ensure_peer_stream, signed)
                nursery.start_soon(self.view.purge_loop)
                nursery.start_soon(self._watch_connections)
                if publishing:
                    nursery.start_soon(self._publish_loop)
                task_status.started(self)
        finally:
            self._running = False

    async def _publish_loop(self) -> None:
        first = True
        while True:
            self._publish_wake = trio.Event()  # a wake during the publish below is kept
            try:
                _, envelope = self._signed() if first else self._sign_next()
                first = False
                await self.gossip.publish(envelope)
                self.stats.published += 1
            except StillRunning as exc:
                log.debug("%s", exc)
            except Exception as exc:
                log.warning("publishing our record failed: %s: %s", type(exc).__name__, exc)
            await trio.sleep(MIN_PUBLISH_GAP)
            with trio.move_on_after(max(0.0, self.publish_interval - MIN_PUBLISH_GAP)):
                await self._publish_wake.wait()

    async def _watch_connections(self) -> None:
        """A dropped connection to a serving peer is checked by dialling it again; one
        that cannot be dialled is unreachable in our view from then on (liveness.py)."""
        network = self.mesh_host.host.get_network()

        def serving(peer: str) -> bool:
            record = self.view.get(peer)
            return record is not None and record.serves_blocks

        async with trio.open_nursery() as checks:

            def recheck(peer: str) -> None:
                try:
                    checks.start_soon(check_peer, peer, self.mesh_host.dial_peer, self.view.liveness, time.time)
                except RuntimeError:  # stopping: nothing left to route
                    pass

            watcher = DisconnectWatcher(self.view.liveness, serving, recheck)
            network.register_notifee(watcher)
            try:
                await trio.sleep_forever()
            finally:
                network.remove_notifee(watcher)

    def is_connected(self, peer: str) -> bool:
        """Do we hold a connection to ``peer`` now? (Such peers keep their place in the view.)"""
        from libp2p.peer.id import ID

        try:
            return ID.from_base58(peer) in self.mesh_host.host.get_network().connections
        except Exception:
            return False

    def neighbours(self) -> list[str]:
        """Peers in the view that we are connected to: the ones to ask for their whole
        view (:meth:`sync_from`) without dialling anyone a record merely names."""
        return [r.peer for r in self.records() if r.peer != self._me and self.is_connected(r.peer)]

    # --- asking the swarm --------------------------------------------------------------

    async def lookup_block(self, block: int, *, timeout: float = LOOKUP_TIMEOUT) -> list[NodeRecord]:
        """Who serves ``block``? Asks the DHT (providers, then each provider's record).

        The path for a newcomer or gateway in a swarm too large for gossip to have
        shown it everyone. Records found are verified and merged into the view; the
        result is the live records, from the view, of providers whose span covers
        ``block``. Empty if the registry is not running or nothing answered in time.
        """
        return await self.swarm_dht.lookup_block(block, timeout)

    async def sync_from(self, peers: list[str], *, timeout: float = SYNC_TIMEOUT) -> int:
        """Merge the whole view of each of ``peers`` (``/shardmesh/swarm/1.0.0``, served
        by every node); how many records entered ours.

        Gossip shows a newcomer each record only at its node's next publish, up to
        ``publish_interval`` later, so a node that chose blocks on what gossip had said
        so far could take a span someone already holds. Every record is verified
        against its own peer id (:func:`~.swarm_map.parse_swarm_map`), so a peer can
        leave records out but not forge one. A peer that fails to answer is skipped.
        """
        from libp2p.peer.id import ID

        merged = 0

        async def sync(peer: str) -> None:
            nonlocal merged
            try:
                swarm = await fetch_swarm_map(self.mesh_host, ID.from_base58(peer), timeout)
            except (SwarmMapError, ValueError) as exc:
                log.debug("no swarm map from %s: %s", peer, exc)
                return
            if swarm.model != self.model_id:
                return
            for record in swarm.records:
                if self.view.merge(record, swarm.envelopes[record.peer], origin=peer):
                    merged += 1

        with trio.move_on_after(timeout):
            async with trio.open_nursery() as nursery:
                for peer in peers:
                    if peer != self._me:
                        nursery.start_soon(sync, peer)
        self.stats.synced += merged
        return merged
