"""Records in the Kademlia DHT (py-libp2p ``KadDHT``, standard ``/ipfs/kad/1.0.0``).

Every node stores its signed record under :func:`~.record_keys.record_key` and announces
itself as a provider of :func:`~.record_keys.block_key` for each block it serves. A
newcomer in a swarm too large for gossip to have shown it everyone asks "who serves
block i?" with :meth:`SwarmDht.lookup_block`: the providers, then each provider's
record, verified and merged into the view.

py-libp2p 0.8.1 needs some help here; each work-around is commented where it is made:

* ``KadDHT`` does not put connected peers into its routing table: we do it for every
  connection (and those made before we started) once identify has shown that the
  peer speaks the DHT protocol, or peers could not be found through each other;
* its ``select`` sees ``[existing, new]`` on one path and ``[new, existing]`` on the
  other, and refuses an identical re-put: :class:`RecordValidator` ranks by content,
  and every put carries a fresh, higher ``seq``;
* ``find_providers`` answers from the local store alone once that holds anything for
  a key (and caches remote answers there for 48 h), so a repeat lookup would never see
  servers that joined later: we always ask the network;
* ``get_value`` returns a local copy without validating it, even a stale one: we
  verify it and drop it if it has expired;
* stored values live 24 h whatever they hold, and ``GET_VALUE`` serves them unchecked:
  :class:`ExpiringValues` removes each at its record's expiry;
* a node accepts at most 10 ``ADD_PROVIDER`` messages per 10 s from one peer:
  provides are paced by a :class:`TokenBucket` that stays under that;
* the DHT's stream handler logs a WARNING for every stream a peer closes cleanly:
  filtered.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Awaitable, Callable

import trio

from ..placement.spans import DRAINING
from .dht_peers import ConnectionWatcher, adopt_peers
from .host import MeshHost, reset_quietly
from .without_cancel import StillRunning
from .dht_values import ExpiringValues, RecordValidator
from .one_at_a_time import OneAtATime
from .record_keys import RECORD_NAMESPACE, block_key, block_key_multihash, record_key
from .records import NodeRecord, RecordError, content_of, verify_record

__all__ = ["ExpiringValues", "RecordValidator", "SwarmDht", "TokenBucket"]
from .registry_stats import RegistryStats
from .swarm_view import SwarmView

log = logging.getLogger("shardmesh.mesh.dht")

# Deadlines (seconds): a DHT walk on a slow swarm can take a while, but nothing may hang.
DHT_PUT_TIMEOUT = 30.0
PROVIDE_TIMEOUT = 30.0
LOOKUP_TIMEOUT = 20.0

# ADD_PROVIDER pacing: py-libp2p accepts at most 10 ADD_PROVIDER per 10 s from one
# peer. Each provide sends one to each of the k closest peers, so a bucket of 5 that
# refills at 0.5/s keeps any receiver at <= 5 + 0.5 * 10 = 10 per 10 s.
PROVIDE_BURST = 5
PROVIDE_RATE = 0.5  # tokens per second
REPROVIDE_INTERVAL = 300.0  # provider records live 48 h in py-libp2p; this re-seeds new/restarted peers

Signed = Callable[[], tuple[NodeRecord, bytes]]  # our last signed record and its envelope


class TokenBucket:
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


class _DropCleanCloseWarnings(logging.Filter):
    """The DHT handler logs a WARNING each time a peer closes a stream between requests
    (``StreamEOF``), which is how most DHT requests end: dozens a second in a busy
    swarm. Drop exactly those; real read errors still get through."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            isinstance(record.msg, str)
            and record.msg.startswith("Failed to read DHT message from stream")
            and record.args
            and type(record.args[0]).__name__ == "StreamEOF"
        )


_CLEAN_CLOSE_FILTER = _DropCleanCloseWarnings()


class SwarmDht:
    """The DHT side of one model's registry: our record and provider entries out,
    lookups in. ``kad`` is py-libp2p's KadDHT while :meth:`run` runs, None otherwise."""

    def __init__(
        self,
        mesh_host: MeshHost,
        model_id: str,
        view: SwarmView,
        stats: RegistryStats,
        *,
        ttl: float,
        reprovide_interval: float = REPROVIDE_INTERVAL,
    ) -> None:
        self.mesh_host = mesh_host
        self.model_id = model_id
        self.view = view
        self.stats = stats
        self.ttl = ttl
        self.reprovide_interval = reprovide_interval
        self.kad: Any = None  # libp2p KadDHT, set while run() runs
        self._me = mesh_host.peer_id_str
        self._put_wake = trio.Event()
        self._provide_wake = trio.Event()
        self._new_peers = False  # a peer joined the routing table since the provide loop looked
        self._calls: OneAtATime | None = None

    def record_signed(self, span_changed: bool) -> None:
        """Our record was re-signed: store it again if needed, and provide a new span."""
        self._put_wake.set()
        if span_changed:
            self._provide_wake.set()

    def _peer_adopted(self) -> None:
        self._new_peers = True  # it may be the peer that failed provides needed
        self._provide_wake.set()

    async def run(
        self,
        ensure_gossip_stream: Callable[[Any, float], Awaitable[None]],
        signed: Signed | None = None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Start the DHT and adopt connected peers until cancelled; with ``signed`` (our
        record, for a node that publishes one), also keep it stored and provided."""
        from libp2p.kad_dht.common import PROTOCOL_ID as KAD_PROTOCOL
        from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
        from libp2p.tools.anyio_service import background_trio_service

        logging.getLogger("libp2p.kad_dht.kad_dht").addFilter(_CLEAN_CLOSE_FILTER)  # idempotent
        network = self.mesh_host.host.get_network()
        kad = KadDHT(self.mesh_host.host, DHTMode.SERVER, strict_validation=True)
        expiring = ExpiringValues()
        kad.register_validator(RECORD_NAMESPACE, RecordValidator(self.model_id, expiring.track, self.view.allowed))
        # KadDHT registered a raw stream handler, which outlives the service: re-register
        # it behind MeshHost's guard, which turns any exception into a reset stream.
        self.mesh_host.set_handler(KAD_PROTOCOL, kad.handle_stream)
        peers_send, peers_recv = trio.open_memory_channel[Any](256)
        watcher = ConnectionWatcher(peers_send)
        try:
            async with background_trio_service(kad):
                self.kad = kad
                network.register_notifee(watcher)
                async with trio.open_nursery() as nursery:
                    self._calls = OneAtATime(nursery)
                    nursery.start_soon(expiring.run, kad.value_store)
                    connected = [*self.mesh_host.connected_peers()]
                    nursery.start_soon(
                        adopt_peers, self.mesh_host, kad, peers_recv, connected, ensure_gossip_stream, self._peer_adopted
                    )
                    if signed is not None:
                        nursery.start_soon(self._put_loop, signed)
                        nursery.start_soon(self._provide_loop, signed)
                    task_status.started()
        finally:
            # Replace the handler rather than remove it (a peer may be negotiating it).
            network.remove_notifee(watcher)
            self.mesh_host.set_handler(KAD_PROTOCOL, reset_quietly)
            self.kad = self._calls = None

    # --- our record out ----------------------------------------------------------------

    async def _put_loop(self, signed: Signed) -> None:
        """Store our record in the DHT when what it serves changes, and every ttl/3.

        Not on every gossip refresh or load change: a put walks the DHT and writes to k
        peers, and the DHT copy is for finding servers, not for live load (gossip
        carries that). A copy put at least every ttl/3 always has two thirds of a TTL
        left, so its load figures are at most that old.
        """
        assert self._calls is not None
        key = record_key(self.model_id, self._me)
        last_served, last_put = None, -math.inf
        while True:
            await self._put_wake.wait()
            self._put_wake = trio.Event()
            record, envelope = signed()
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
                await self._calls.call("put", DHT_PUT_TIMEOUT, self.kad.put_value, key, envelope)
                self.stats.dht_puts += 1
                last_served, last_put = served, now
            except StillRunning as exc:
                log.debug("%s", exc)
            except Exception as exc:
                self.stats.dht_put_failures += 1
                log.warning("storing our record in the DHT failed: %s: %s", type(exc).__name__, exc)

    async def _provide_loop(self, signed: Signed) -> None:
        """Announce ourselves as provider of every block we serve, paced and re-seeded.

        Kademlia cannot withdraw a provider record: when our span shrinks, stale entries
        stay out there, and readers filter them through our (signed) record's span.
        """
        assert self._calls is not None
        bucket = TokenBucket(PROVIDE_BURST, PROVIDE_RATE)
        provided: dict[int, float] = {}  # block -> trio time of last successful provide
        retry_at: dict[int, float] = {}  # block -> trio time of the next try after a failure
        failures: dict[int, int] = {}
        while True:
            record = signed()[0]
            blocks = range(record.start, record.end)
            for gone in [b for b in provided if b not in blocks]:
                provided.pop(gone, None)
                self._stop_reproviding(gone)
            if self._new_peers:
                self._new_peers = False
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
                if not signed()[0].serves(block):
                    break  # the span moved while we were pacing
                await bucket.take()
                ok = False
                try:
                    ok = await self._calls.call("provide", PROVIDE_TIMEOUT, self.kad.provide, block_key(self.model_id, block))
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
            self.kad.provider_store.providing_keys.discard(block_key_multihash(self.model_id, block))
        except Exception:
            pass

    # --- lookups -----------------------------------------------------------------------

    async def lookup_block(self, block: int, timeout: float = LOOKUP_TIMEOUT) -> list[NodeRecord]:
        """Who serves ``block``? Asks the DHT (providers, then each provider's record).

        Records found are verified and merged into the view; the result is the live
        records, from the view, of providers whose span covers ``block`` (stale provider
        entries, e.g. of nodes that moved or left, drop out here), ours included if we
        serve it. Empty if the DHT is not running or nothing answered in time.
        """
        if self.kad is None:
            return []
        providers: set[str] = set()
        with trio.move_on_after(timeout):
            await self._find_providers(block_key_multihash(self.model_id, block), providers)
        with trio.move_on_after(timeout):
            async with trio.open_nursery() as nursery:
                for peer in providers:
                    nursery.start_soon(self._fetch_record, peer)
        return [r for r in self.view.peers_serving(block) if r.peer in providers or r.peer == self._me]

    async def _find_providers(self, key: bytes, found: set[str]) -> None:
        """Add the provider peer ids for ``key`` to ``found``: local store, then the network.

        ``KadDHT.find_providers`` would stop at the local store whenever it holds
        anything for the key, so we ask the k closest peers ourselves (filling
        ``found`` as answers come, so a timeout keeps what arrived).
        """
        kad = self.kad
        found.update(info.peer_id.to_base58() for info in kad.provider_store.get_providers(key))
        closest = await kad.peer_routing.find_closest_peers_network(key)

        async def ask(peer_id) -> None:
            with trio.move_on_after(10):
                providers, _ = await kad.provider_store._get_providers_from_peer_with_closers(peer_id, key)
                found.update(info.peer_id.to_base58() for info in providers)

        async with trio.open_nursery() as nursery:
            for peer_id in closest:
                if peer_id != self.mesh_host.peer_id:
                    nursery.start_soon(ask, peer_id)

    async def _fetch_record(self, peer: str) -> NodeRecord | None:
        """``peer``'s record from the DHT, verified and merged; None if none is valid."""
        if peer == self._me:
            return self.view.own_record()
        key = record_key(self.model_id, peer)
        stored = self.kad.value_store.get(key.encode())
        if stored is not None:
            # get_value() would return this local copy unchecked, even if expired.
            try:
                return self._accept(stored.value, peer)
            except RecordError:
                self.kad.value_store.remove(key.encode())
        try:
            with trio.move_on_after(LOOKUP_TIMEOUT):
                value = await self.kad.get_value(key)
                if value is not None:
                    return self._accept(value, peer)
        except RecordError as exc:
            log.debug("DHT record of %s rejected: %s", peer, exc)
        except Exception as exc:
            log.debug("fetching the DHT record of %s failed: %s: %s", peer, type(exc).__name__, exc)
        return None

    def _accept(self, value: bytes, peer: str) -> NodeRecord:
        try:
            record = verify_record(value, expected_peer=peer, expected_model=self.model_id)
        except RecordError:
            self.stats.dht_records_invalid += 1
            raise
        self.stats.dht_records_fetched += 1
        self.view.merge(record, value, origin="dht")
        return record
