"""The registry: this node's live view of the swarm, built from signed NodeRecords.

Two channels feed it, and it feeds both:

* **Gossip** (gossipsub topic ``shardmesh/<model>/records/1``): every node publishes its
  own signed record on change and every ``publish_interval`` seconds. This is the fast
  path: joins, load changes and ``draining`` reach every subscriber in about a second.
* **Kademlia DHT** (py-libp2p ``KadDHT``, standard ``/ipfs/kad/1.0.0``): every node
  stores its record under :func:`~shardmesh.mesh.records.record_key` and announces
  itself as a provider of :func:`~shardmesh.mesh.records.block_key` for each block it
  serves. A newcomer in a large swarm asks "who serves block i?" with
  :meth:`Registry.lookup_block` instead of waiting for gossip.

A newcomer that must see everyone now (a ``--layers auto`` node about to choose its
blocks) also asks a few peers for their whole view: :meth:`Registry.sync_from`.

Everything that enters the view is verified (signature from the peer id itself, model,
expiry); per peer the highest ``seq`` wins; records expire unless refreshed, so a node
that vanishes leaves the view within a TTL.

py-libp2p 0.8.1 needs some help to behave (see ../shared/FIELD-NOTES.md); each work-
around is commented where it is made:

* gossipsub's heartbeat defaults to 120 s and its spam limit (10 msg/s per forwarding
  peer per topic) would drop a large swarm's refreshes: both are set here;
* ``KadDHT`` does not put connected peers into its routing table: we do it on every
  connection (and for connections made before we started), once identify has shown
  the peer speaks the DHT protocol, or peers could not be found through each other;
  pubsub likewise misses connections made before it started (``ensure_peer_stream``);
* the DHT's ``select`` sees ``[existing, new]`` on one path and ``[new, existing]`` on
  the other, and refuses an identical re-put: our selector ranks by content (valid and
  highest ``seq``), and every put carries a fresh, higher ``seq``;
* ``find_providers`` answers from the local store alone once it holds anything for a
  key (and caches remote answers there for 48 h), so a repeat lookup would never see
  servers that joined later: :meth:`Registry.lookup_block` always asks the network;
* ``get_value`` returns a local copy without validating it, even a stale one: we verify
  it and drop it if it has expired;
* an ``ADD_PROVIDER`` receiver accepts at most 10 messages per 10 s from one peer:
  provides are paced by a token bucket that never exceeds that;
* the DHT handler logs a WARNING for every stream a peer closes cleanly: filtered.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.abc import INotifee
from libp2p.records.validator import Validator

from ..placement.spans import DRAINING, ServerView, coverage
from .host import StillRunning, reset_quietly, without_cancel
from .records import (
    RECORD_NAMESPACE,
    RECORD_TTL,
    MAX_RECORD_LIFETIME,
    NodeRecord,
    RecordError,
    block_key,
    block_key_multihash,
    content_of,
    expires_at,
    record_json,
    server_view,
    record_key,
    sign_record,
    verify_record,
)
from .swarm_map import SwarmMapError, fetch_swarm_map

log = logging.getLogger("shardmesh.mesh.registry")

# Deadlines for network operations (seconds). A DHT walk on a slow swarm can take a
# while; nothing here may hang forever.
PUBLISH_TIMEOUT = 5.0
DHT_PUT_TIMEOUT = 30.0
PROVIDE_TIMEOUT = 30.0
LOOKUP_TIMEOUT = 20.0
SYNC_TIMEOUT = 5.0  # for a newcomer to get a peer's whole view (sync_from)
ADOPT_PEER_TIMEOUT = 15.0  # how long to wait for identify before giving up on a new peer
MIN_PUBLISH_GAP = 0.2  # a burst of update_local() calls becomes one message per gap

# gossipsub: go-libp2p's defaults, except the heartbeat (py default 120 s) and the spam
# limit (py default 10 msg/s per forwarding peer and topic). Every node refreshes every
# few seconds, so a neighbour relays about N/interval messages/s for a swarm of N: the
# default would start dropping records at ~50 nodes. Our topic validator does the real
# checking (signature, owner, expiry) on every message anyway.
GOSSIP_DEGREE, GOSSIP_DEGREE_LOW, GOSSIP_DEGREE_HIGH = 6, 4, 12
GOSSIP_HEARTBEAT = 1
GOSSIP_MAX_MSGS_PER_S = 500.0

# ADD_PROVIDER pacing: py-libp2p accepts at most 10 ADD_PROVIDER per 10 s from one
# peer. Each provide sends one to each of the k closest peers, so a bucket of 5 that
# refills at 0.5/s keeps any receiver at <= 5 + 0.5 * 10 = 10 per 10 s.
PROVIDE_BURST = 5
PROVIDE_RATE = 0.5  # tokens per second
REPROVIDE_INTERVAL = 300.0  # provider records live 48 h in py-libp2p; this re-seeds new/restarted peers


@dataclass
class RegistryStats:
    """Counters for /metrics and for tests: what came in and what was thrown away."""

    published: int = 0
    gossip_accepted: int = 0  # records that entered (or refreshed) the view from gossip
    invalid_dropped: int = 0  # gossip messages that failed verification
    dht_puts: int = 0
    dht_put_failures: int = 0
    provides: int = 0
    dht_records_fetched: int = 0
    dht_records_invalid: int = 0
    synced: int = 0  # records that entered the view from a peer's whole map (sync_from)
    expired_purged: int = 0


class RecordValidator(Validator):
    """KadDHT validator for the ``/shardmesh/`` namespace.

    ``validate``: the value is a signed NodeRecord, not expired, and the key is the one
    derived from the record's own model and peer, so a node can write only its own key
    (the DHT's own signatures say who *stored* a value, not who wrote it).

    ``select``: index of the best value: valid records beat invalid or expired ones,
    then the highest ``seq``; ties keep the earlier index. Ranking by content makes it
    indifferent to py-libp2p passing ``[existing, new]`` on one path and
    ``[new, existing]`` on the other, and lets a restarted node (fresh record) replace
    its stale one even if the stale one somehow had a higher seq.
    """

    def validate(self, key: str, value: bytes) -> None:
        self._check(key, value)

    def select(self, key: str, values: list[bytes]) -> int:
        best, best_seq = 0, -1
        for i, value in enumerate(values):
            try:
                seq = self._check(key, value).seq
            except RecordError:
                continue
            if seq > best_seq:
                best, best_seq = i, seq
        return best

    @staticmethod
    def _check(key: str, value: bytes) -> NodeRecord:
        record = verify_record(value)
        expected = record_key(record.model, record.peer)
        if key != expected:
            raise RecordError(RecordError.WRONG_KEY, f"record of {record.peer} stored under {key}, not {expected}")
        return record


class _TokenBucket:
    """``take()`` waits until a token is free: at most ``burst`` at once, then ``rate``/s."""

    def __init__(self, burst: float, rate: float) -> None:
        self.burst, self.rate = burst, rate
        self.tokens = burst
        self.stamp = trio.current_time()

    async def take(self) -> None:
        while True:
            now = trio.current_time()
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= 1:
                self.tokens -= 1
                return
            await trio.sleep((1 - self.tokens) / self.rate)

    def refund(self) -> None:
        """Give back a token whose message never went out."""
        self.tokens = min(self.burst, self.tokens + 1)


class _ConnectionWatcher(INotifee):
    """Network notifee: hands each new connection's peer id to the registry.

    Runs inside the swarm's notification path, so it must neither block nor raise:
    it only drops the id into a buffered channel (or drops the id if the buffer is
    full; a later connection or the DHT's own traffic will add the peer).
    """

    def __init__(self, send: trio.MemorySendChannel) -> None:
        self.send = send

    async def connected(self, network, conn) -> None:
        try:
            self.send.send_nowait(conn.muxed_conn.peer_id)
        except Exception:
            pass

    async def disconnected(self, network, conn) -> None:
        await trio.lowlevel.checkpoint()

    async def opened_stream(self, network, stream) -> None:
        await trio.lowlevel.checkpoint()

    async def closed_stream(self, network, stream) -> None:
        await trio.lowlevel.checkpoint()

    async def listen(self, network, multiaddr) -> None:
        await trio.lowlevel.checkpoint()

    async def listen_close(self, network, multiaddr) -> None:
        await trio.lowlevel.checkpoint()


class _DropCleanCloseWarnings(logging.Filter):
    """py-libp2p's DHT handler logs a WARNING each time a peer closes a stream between
    requests (``StreamEOF``), which is how most DHT requests end: dozens a second in a
    busy swarm. Drop exactly those; real read errors still get through."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            isinstance(record.msg, str)
            and record.msg.startswith("Failed to read DHT message from stream")
            and record.args
            and type(record.args[0]).__name__ == "StreamEOF"
        )


_CLEAN_CLOSE_FILTER = _DropCleanCloseWarnings()


def records_topic(model_id: str) -> str:
    return f"shardmesh/{model_id}/records/1"


class Registry:
    """Live, verified, expiring table of the swarm's NodeRecords for one model.

    ``local`` is this node's own record (None for a pure observer, e.g. a
    ``shardmesh status`` probe). The registry owns its ``seq`` and ``expires``: every
    publish re-signs it with ``seq`` = max(seq + 1, unix ms) (monotonic across restarts,
    so a restarted node's record beats its old one) and ``expires`` = now + ttl.

    Run it inside the node's nursery: ``await nursery.start(registry.run)``; it returns
    once subscribed, and keeps publishing, providing and merging until cancelled.
    """

    def __init__(
        self,
        mesh_host,
        model_id: str,
        local: NodeRecord | None,
        *,
        ttl: float = RECORD_TTL,
        publish_interval: float = 5.0,
        reprovide_interval: float = REPROVIDE_INTERVAL,
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
            if not local.addrs:
                local = dataclasses.replace(local, addrs=tuple(mesh_host.dialable_addrs()))
        self.mesh_host = mesh_host
        self.model_id = model_id
        self.topic = records_topic(model_id)
        self.ttl = ttl
        self.publish_interval = publish_interval
        self.reprovide_interval = reprovide_interval
        self.stats = RegistryStats()
        self.pubsub = None  # libp2p Pubsub, set while run() runs
        self.dht = None  # libp2p KadDHT, set while run() runs

        self._me = mesh_host.peer_id_str
        self._local = local
        self._seq = local.seq if local is not None else 0
        self._view: dict[str, NodeRecord] = {}
        # The signed envelope of each peer's record in _view, exactly as received, so
        # the view can be handed on (``/shardmesh/swarm/1.0.0``) and checked by anyone.
        self._raw: dict[str, bytes] = {}
        self._changed = trio.Event()
        self._publish_wake = trio.Event()
        self._dht_wake = trio.Event()
        self._provide_wake = trio.Event()
        self._purge_wake = trio.Event()
        self._purge_at = math.inf  # when _purge_loop wakes next (the earliest expiry it saw)
        self._nursery: trio.Nursery | None = None
        self._in_flight: set[str] = set()  # kinds of network call still running past their deadline
        self._latest: tuple[NodeRecord, bytes] | None = None  # last signed local record
        self._new_dht_peers = False
        self._running = False

    # --- reading the view --------------------------------------------------------------

    def records(self) -> list[NodeRecord]:
        """Live verified records, ours included, sorted by peer id."""
        now = time.time()
        return sorted((r for r in self._view.values() if r.expires >= now), key=lambda r: r.peer)

    def get(self, peer: str) -> NodeRecord | None:
        record = self._view.get(peer)
        return record if record is not None and record.expires >= time.time() else None

    def servers(self) -> list[ServerView]:
        """What placement and routing see of the live records that serve blocks."""
        return [server_view(r) for r in self.records() if r.serves_blocks]

    def peers_serving(self, block: int) -> list[NodeRecord]:
        """Live records whose span covers ``block`` (any state; routing decides)."""
        return [r for r in self.records() if r.serves(block)]

    def signed_records(self) -> list[bytes]:
        """The signed envelopes of :meth:`records` (ours as last signed), in the same order.

        Records are self-certifying, so whoever receives these can verify each one
        without trusting us; a record whose envelope we do not hold is left out.
        """
        out = []
        for record in self.records():
            if record.peer == self._me and self._local is not None:
                raw = self._latest[1] if self._latest is not None else None
            else:
                raw = self._raw.get(record.peer)
            if raw is not None:
                out.append(raw)
        return out

    @property
    def local(self) -> NodeRecord | None:
        """Our record as last signed (or as given, before the first publish)."""
        return self._view.get(self._me, self._local) if self._local is not None else None

    def total_blocks(self) -> int:
        if self._local is not None:
            return self._local.total_blocks
        return max((r.total_blocks for r in self.records()), default=0)

    async def wait_changed(self, timeout: float | None = None) -> bool:
        """Wait for the next change of the view; False if ``timeout`` passed first.

        A change is a peer appearing or expiring, or a record saying something new
        (span, state, load, addresses...); a plain refresh (new seq/expiry) is not one.
        """
        event = self._changed
        if timeout is None:
            await event.wait()
            return True
        with trio.move_on_after(timeout):
            await event.wait()
            return True
        return False

    def to_json(self) -> dict[str, Any]:
        """The swarm map for ``GET /v1/swarm``: records plus per-block coverage.

        ``coverage[i]`` counts the ``online`` servers of block i: joining nodes have
        not loaded their weights yet and draining ones take no new sessions.
        """
        now = time.time()
        records = self.records()
        total = self.total_blocks()
        return {
            "model": self.model_id,
            "total_blocks": total,
            "local_peer": self._me,
            "peers": [record_json(r, now) for r in records],
            "coverage": coverage([server_view(r) for r in records], total),
        }

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

    # --- running -----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Registry] = trio.TASK_STATUS_IGNORED) -> None:
        """Start gossip and DHT, subscribe, then publish/provide/merge until cancelled."""
        if self._running:
            raise RuntimeError("Registry.run() is already running")
        self._running = True
        from libp2p.kad_dht.common import PROTOCOL_ID as KAD_PROTOCOL
        from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
        from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, PROTOCOL_ID_V12, GossipSub
        from libp2p.pubsub.pubsub import Pubsub
        from libp2p.tools.anyio_service import background_trio_service

        logging.getLogger("libp2p.kad_dht.kad_dht").addFilter(_CLEAN_CLOSE_FILTER)  # idempotent
        host = self.mesh_host.host
        network = host.get_network()
        notifees_before = list(network.notifees)
        gossipsub = GossipSub(
            protocols=[PROTOCOL_ID_V12, PROTOCOL_ID_V11, PROTOCOL_ID],
            degree=GOSSIP_DEGREE,
            degree_low=GOSSIP_DEGREE_LOW,
            degree_high=GOSSIP_DEGREE_HIGH,
            heartbeat_interval=GOSSIP_HEARTBEAT,
            max_messages_per_topic_per_second=GOSSIP_MAX_MSGS_PER_S,
        )
        pubsub = Pubsub(host, gossipsub)
        # Drop invalid records inside gossipsub itself, so they are neither delivered
        # nor forwarded (and the forwarding peer's score pays for them).
        pubsub.set_topic_validator(self.topic, self._gossip_validator, False)
        dht = KadDHT(host, DHTMode.SERVER, strict_validation=True)
        dht.register_validator(RECORD_NAMESPACE, RecordValidator())

        # Pubsub and KadDHT registered raw stream handlers, which outlive the services: a
        # message that reaches Pubsub's handler while it stops raises out of it (run_task
        # on a closed nursery) and takes the host down. Re-register both behind
        # MeshHost's guard, which turns any exception into a reset stream.
        inbound: set = set()  # gossip streams peers opened to us, reset when we stop

        async def pubsub_handler(stream) -> None:
            inbound.add(stream)
            try:
                await pubsub.stream_handler(stream)
            finally:
                inbound.discard(stream)
                # Pubsub's reader returns without closing the stream once the service
                # stops; the peer would keep writing into it until yamux's window
                # overflows and the whole connection (inference streams too) is dropped.
                await reset_quietly(stream)

        handlers = {protocol: pubsub_handler for protocol in gossipsub.get_protocols()}
        handlers[KAD_PROTOCOL] = dht.handle_stream
        for protocol, handler in handlers.items():
            self.mesh_host.set_handler(protocol, handler)

        # Pubsub hangs a notifee on the network and never takes it down.
        added_notifees = [n for n in network.notifees if n not in notifees_before]

        peers_send, peers_recv = trio.open_memory_channel[Any](256)
        watcher = _ConnectionWatcher(peers_send)
        try:
            async with (
                background_trio_service(pubsub),
                background_trio_service(gossipsub),
                background_trio_service(dht),
            ):
                self.pubsub, self.dht = pubsub, dht
                network.register_notifee(watcher)
                with trio.fail_after(10):
                    await pubsub.wait_until_ready()
                subscription = await pubsub.subscribe(self.topic)
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._adopt_peers, peers_recv, [*self.mesh_host.connected_peers()])
                    nursery.start_soon(self._receive_loop, subscription)
                    nursery.start_soon(self._purge_loop)
                    if self._local is not None:
                        self._sign_next()  # our record is in the view before anyone asks
                        nursery.start_soon(self._publish_loop)
                        nursery.start_soon(self._dht_put_loop)
                        nursery.start_soon(self._provide_loop)
                    task_status.started(self)
        finally:
            # Unhook what we and Pubsub attached to the network, and answer gossip and DHT
            # streams with a reset from now on. *Replace* the handlers, never remove them:
            # py-libp2p's protocol negotiation looks a handler up again after an await,
            # so removing one while a peer negotiates it raises a KeyError that takes the
            # whole host down.
            for notifee in [watcher, *added_notifees]:
                network.remove_notifee(notifee)
            for protocol in handlers:
                self.mesh_host.set_handler(protocol, reset_quietly)
            # Pubsub leaves its gossip streams open when it stops: reset them, so peers
            # drop us from their mesh now (not when the connection goes) and the readers
            # blocked on them end. Shielded: we are usually here because of a cancel.
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                async with trio.open_nursery() as resets:
                    for stream in [*inbound, *pubsub.peers.values()]:
                        resets.start_soon(reset_quietly, stream)
            self.pubsub = self.dht = None
            self._running = False

    # --- gossip in ---------------------------------------------------------------------

    def _gossip_validator(self, forwarder, msg) -> bool:
        """Pubsub topic validator: a valid record of this model, published by its owner.

        Requiring the pubsub origin (``from``, covered by the pubsub signature) to be the
        record's peer means nobody can replay someone else's old records on gossip.
        """
        try:
            record = verify_record(msg.data, expected_model=self.model_id)
            origin = _peer_str(msg.from_id)
            if origin != record.peer:
                raise RecordError(RecordError.WRONG_PEER, f"record of {record.peer} published by {origin}")
        except RecordError as exc:
            self.stats.invalid_dropped += 1
            log.debug("dropping gossip record from %s: %s", forwarder, exc)
            return False
        except Exception as exc:  # nothing may raise into pubsub
            self.stats.invalid_dropped += 1
            log.debug("dropping gossip record from %s: %s: %s", forwarder, type(exc).__name__, exc)
            return False
        return True

    async def _receive_loop(self, subscription) -> None:
        async for msg in subscription:
            try:
                record = verify_record(msg.data, expected_model=self.model_id)
            except RecordError:
                continue  # counted by the validator; expiry may also have passed in between
            if self._merge(record, msg.data):
                self.stats.gossip_accepted += 1

    def _merge(self, record: NodeRecord, signed: bytes) -> bool:
        """Put a verified record (and ``signed``, its envelope) into the view if it is newer; True if it was."""
        if record.model != self.model_id or record.expires < time.time():
            return False
        if record.peer == self._me and self._local is not None:
            return False  # our own record comes from _sign_next, never from outside
        current = self._view.get(record.peer)
        if current is not None and current.seq >= record.seq:
            return False
        self._view[record.peer] = record
        self._raw[record.peer] = bytes(signed)
        if record.expires < self._purge_at:
            self._purge_wake.set()
        self._remember(record)  # every time: peerstore addresses lapse unless refreshed
        if current is None or content_of(current) != content_of(record):
            self._signal_changed()
        return True

    def _remember(self, record: NodeRecord) -> None:
        try:
            from libp2p.peer.id import ID

            self.mesh_host.remember(ID.from_base58(record.peer), list(record.addrs), ttl=max(120.0, 4 * self.ttl))
        except Exception as exc:
            log.debug("cannot remember addresses of %s: %s", record.peer, exc)

    def _signal_changed(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _purge_loop(self) -> None:
        """Drops each peer's record when it expires. It sleeps until the earliest expiry
        in the view, not on a fixed tick: an idle node then wakes every few seconds
        instead of every second (on a machine shared with other nodes each wake-up can
        land in their compute), and a record goes at its expiry, not up to a tick late.
        :meth:`_merge` cuts the sleep short for a record that expires sooner."""
        while True:
            now = time.time()
            expired = [p for p, r in self._view.items() if r.expires < now and p != self._me]
            for peer in expired:
                del self._view[peer]
                self._raw.pop(peer, None)
                log.debug("record of %s expired", peer)
            if expired:
                self.stats.expired_purged += len(expired)
                self._signal_changed()
            self._purge_at = min((r.expires for p, r in self._view.items() if p != self._me), default=math.inf)
            self._purge_wake = trio.Event()
            # A hair past the expiry: records() already hides a record from its expiry on.
            with trio.move_on_after(max(0.0, self._purge_at - time.time()) + 0.01):
                await self._purge_wake.wait()

    # --- our record out ----------------------------------------------------------------

    def _sign_next(self) -> tuple[NodeRecord, bytes]:
        """Re-sign our record with a higher seq and a fresh expiry; install it in the view."""
        assert self._local is not None
        self._seq = max(self._seq + 1, int(time.time() * 1000))
        record = dataclasses.replace(self._local, seq=self._seq, expires=expires_at(self.ttl))
        envelope = sign_record(record, self.mesh_host.key_pair)
        previous = self._view.get(self._me)
        self._view[self._me] = record
        if previous is None or content_of(previous) != content_of(record):
            self._signal_changed()
        self._latest = (record, envelope)
        self._dht_wake.set()
        if previous is None or previous.span != record.span:
            self._provide_wake.set()
        return record, envelope

    async def _call(self, kind: str, timeout: float, fn, *args):
        """A py-libp2p call that our deadline must not cancel (see host.without_cancel);
        one of each ``kind`` at a time, so that calls stuck past their deadline cannot
        pile up."""
        if kind in self._in_flight:
            raise StillRunning(f"the previous {kind} is still running")
        self._in_flight.add(kind)
        assert self._nursery is not None

        async def tracked(*a):
            try:
                return await fn(*a)
            finally:
                self._in_flight.discard(kind)

        return await without_cancel(self._nursery, timeout, tracked, *args)

    async def _publish_loop(self) -> None:
        first = True
        while True:
            self._publish_wake = trio.Event()  # a wake during the publish below is kept
            try:
                _, envelope = self._latest if first else self._sign_next()
                first = False
                await self._call("publish", PUBLISH_TIMEOUT, self.pubsub.publish, self.topic, envelope)
                self.stats.published += 1
            except StillRunning as exc:
                log.debug("%s", exc)
            except Exception as exc:
                log.warning("publishing our record failed: %s: %s", type(exc).__name__, exc)
            await trio.sleep(MIN_PUBLISH_GAP)
            with trio.move_on_after(max(0.0, self.publish_interval - MIN_PUBLISH_GAP)):
                await self._publish_wake.wait()

    async def _dht_put_loop(self) -> None:
        """Store our record in the DHT when what it serves changes, and every ttl/3.

        Not on every gossip refresh or load change: a put walks the DHT and writes to k
        peers, and the DHT copy is for finding servers, not for live load (gossip
        carries that). A copy put at least every ttl/3 always has two thirds of a TTL
        left, so its load figures are at most that old.
        """
        key = record_key(self.model_id, self._me)
        last_served, last_put = None, -math.inf
        while True:
            await self._dht_wake.wait()
            self._dht_wake = trio.Event()
            record, envelope = self._latest
            if record.state == DRAINING:
                # Leaving: gossip tells the swarm at once, and the DHT copy expires by
                # itself. A put now would open DHT streams to every neighbour at the
                # moment our last sessions are finishing on those same connections.
                continue
            served = dataclasses.replace(content_of(record), cache_tokens_free=0, throughput=0.0)
            now = trio.current_time()
            if served == last_served and now - last_put < self.ttl / 3:
                continue
            try:
                await self._call("put", DHT_PUT_TIMEOUT, self.dht.put_value, key, envelope)
                self.stats.dht_puts += 1
                last_served, last_put = served, now
            except StillRunning as exc:
                log.debug("%s", exc)
            except Exception as exc:
                self.stats.dht_put_failures += 1
                log.warning("storing our record in the DHT failed: %s: %s", type(exc).__name__, exc)

    async def _provide_loop(self) -> None:
        """Announce ourselves as provider of every block we serve, paced and re-seeded.

        Kademlia cannot withdraw a provider record: when our span shrinks, stale entries
        stay out there, and readers filter them through our (signed) record's span.
        """
        bucket = _TokenBucket(PROVIDE_BURST, PROVIDE_RATE)
        provided: dict[int, float] = {}  # block -> trio time of last successful provide
        retry_at: dict[int, float] = {}  # block -> trio time of the next try after a failure
        failures: dict[int, int] = {}
        while True:
            record = self._view.get(self._me) or self._local
            blocks = range(record.start, record.end)
            for gone in [b for b in provided if b not in blocks]:
                provided.pop(gone, None)
                self._stop_reproviding(gone)
            if self._new_dht_peers:  # a new peer may be the one that failed provides needed
                self._new_dht_peers = False
                retry_at.clear()
            now = trio.current_time()
            due = [
                b
                for b in blocks
                if now - provided.get(b, -math.inf) >= self.reprovide_interval and retry_at.get(b, -math.inf) <= now
            ]
            if not due:
                wake_times = [t + self.reprovide_interval for t in provided.values()] + list(retry_at.values())
                wait = min(wake_times, default=now + self.reprovide_interval) - now
                with trio.move_on_after(max(0.1, wait)):
                    await self._provide_wake.wait()
                self._provide_wake = trio.Event()
                continue
            for block in due:
                current = self._view.get(self._me) or self._local
                if not current.serves(block):
                    break  # the span moved while we were pacing
                await bucket.take()
                ok = False
                try:
                    ok = await self._call("provide", PROVIDE_TIMEOUT, self.dht.provide, block_key(self.model_id, block))
                except Exception as exc:  # StillRunning included: retried later, like a failure
                    log.debug("providing block %d failed: %s: %s", block, type(exc).__name__, exc)
                if ok:
                    provided[block] = trio.current_time()
                    retry_at.pop(block, None)
                    failures.pop(block, None)
                    self.stats.provides += 1
                else:  # nobody reachable yet (first node, or still connecting): back off
                    bucket.refund()  # no ADD_PROVIDER reached anyone, so none counts against us
                    failures[block] = failures.get(block, 0) + 1
                    retry_at[block] = trio.current_time() + min(30.0, 2.0 ** failures[block])

    def _stop_reproviding(self, block: int) -> None:
        """Stop the DHT's own 22 h republish of a block we no longer serve."""
        try:
            self.dht.provider_store.providing_keys.discard(block_key_multihash(self.model_id, block))
        except Exception:
            pass

    # --- peers -------------------------------------------------------------------------

    async def _adopt_peers(self, new_peers: trio.MemoryReceiveChannel, already_connected: list) -> None:
        """Put every connected peer into the DHT routing table (and gossip, if it predates us).

        KadDHT only adds a peer when that peer sends *us* a DHT request or shows up in a
        lookup; a peer that only connected would stay unknown, and so would everyone
        behind it. We wait for identify first: it brings the peer's listen addresses
        (which ``add_peer`` needs, and an inbound connection lacks) and its protocols.
        A peer without the DHT protocol (a client-mode or non-DHT peer) is left out:
        ``add_peer`` admits anyone whose protocols are not known yet, and such a peer
        in the table costs every later lookup a failed stream.
        """
        from libp2p.kad_dht.common import PROTOCOL_ID as KAD_PROTOCOL

        limiter = trio.CapacityLimiter(16)
        in_flight: set = set()
        peerstore = self.mesh_host.host.get_peerstore()

        def identified(peer_id) -> list[str]:
            try:
                return [str(p) for p in peerstore.get_protocols(peer_id)]
            except Exception:  # PeerStoreError: not known yet
                return []

        async def adopt(peer_id, predates_pubsub: bool) -> None:
            if peer_id in in_flight:
                return
            in_flight.add(peer_id)
            try:
                async with limiter:
                    with trio.move_on_after(ADOPT_PEER_TIMEOUT):
                        if predates_pubsub:
                            await self.pubsub.ensure_peer_stream(peer_id, timeout=ADOPT_PEER_TIMEOUT)
                        delay = 0.05
                        while not identified(peer_id) or not await self.dht.add_peer(peer_id):
                            if identified(peer_id) and str(KAD_PROTOCOL) not in identified(peer_id):
                                return
                            if peer_id not in self.mesh_host.host.get_network().connections:
                                return
                            await trio.sleep(delay)
                            delay = min(1.0, delay * 2)
                        self._new_dht_peers = True
                        self._provide_wake.set()
            except Exception as exc:
                log.debug("adopting peer %s failed: %s: %s", peer_id, type(exc).__name__, exc)
            finally:
                in_flight.discard(peer_id)

        async with trio.open_nursery() as nursery:
            for peer_id in already_connected:
                nursery.start_soon(adopt, peer_id, True)
            async for peer_id in new_peers:
                nursery.start_soon(adopt, peer_id, False)

    # --- DHT lookups -------------------------------------------------------------------

    async def lookup_block(self, block: int, *, timeout: float = LOOKUP_TIMEOUT) -> list[NodeRecord]:
        """Who serves ``block``? Asks the DHT (providers, then each provider's record).

        The path for a newcomer or gateway in a swarm too large for gossip to have
        shown it everyone. Records found are verified and merged into the view; the
        result is the live records, from the view, of providers whose span covers
        ``block`` (stale provider entries, e.g. of nodes that moved or left, drop out
        here). Empty if the registry is not running or nothing answered in time.
        """
        if self.dht is None:
            return []
        providers: set[str] = set()
        with trio.move_on_after(timeout):
            await self._find_providers(block_key_multihash(self.model_id, block), providers)
        with trio.move_on_after(timeout):
            async with trio.open_nursery() as nursery:
                for peer in providers:
                    nursery.start_soon(self._fetch_record, peer)
        return [r for r in self.records() if r.serves(block) and (r.peer in providers or r.peer == self._me)]

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
                if self._merge(record, swarm.envelopes[record.peer]):
                    merged += 1

        with trio.move_on_after(timeout):
            async with trio.open_nursery() as nursery:
                for peer in peers:
                    if peer != self._me:
                        nursery.start_soon(sync, peer)
        self.stats.synced += merged
        return merged

    async def _find_providers(self, key: bytes, found: set[str]) -> None:
        """Add the provider peer ids for ``key`` to ``found``: local store, then the network.

        ``KadDHT.find_providers`` would stop at the local store whenever it holds
        anything for the key, so we ask the k closest peers ourselves (filling
        ``found`` as answers come, so a timeout keeps what arrived).
        """
        dht = self.dht
        found.update(info.peer_id.to_base58() for info in dht.provider_store.get_providers(key))
        closest = await dht.peer_routing.find_closest_peers_network(key)

        async def ask(peer_id) -> None:
            with trio.move_on_after(10):
                providers, _ = await dht.provider_store._get_providers_from_peer_with_closers(peer_id, key)
                found.update(info.peer_id.to_base58() for info in providers)

        async with trio.open_nursery() as nursery:
            for peer_id in closest:
                if peer_id != self.mesh_host.peer_id:
                    nursery.start_soon(ask, peer_id)

    async def _fetch_record(self, peer: str) -> NodeRecord | None:
        """``peer``'s record from the DHT, verified and merged; None if none is valid."""
        if peer == self._me:
            return self.local
        key = record_key(self.model_id, peer)
        stored = self.dht.value_store.get(key.encode())
        if stored is not None:
            # get_value() would return this local copy unchecked, even if expired.
            try:
                return self._accept_dht_record(stored.value, peer)
            except RecordError:
                self.dht.value_store.remove(key.encode())
        try:
            with trio.move_on_after(LOOKUP_TIMEOUT):
                value = await self.dht.get_value(key)
                if value is not None:
                    return self._accept_dht_record(value, peer)
        except RecordError as exc:
            log.debug("DHT record of %s rejected: %s", peer, exc)
        except Exception as exc:
            log.debug("fetching the DHT record of %s failed: %s: %s", peer, type(exc).__name__, exc)
        return None

    def _accept_dht_record(self, value: bytes, peer: str) -> NodeRecord:
        try:
            record = verify_record(value, expected_peer=peer, expected_model=self.model_id)
        except RecordError:
            self.stats.dht_records_invalid += 1
            raise
        self.stats.dht_records_fetched += 1
        self._merge(record, value)
        return record


def _peer_str(peer_bytes: bytes) -> str:
    from libp2p.peer.id import ID

    return ID(peer_bytes).to_base58()
