"""Records on gossip: the gossipsub topic ``shardmesh/<model>/records/1``.

Every node publishes its own signed record on change and every few seconds; this is
the fast path by which joins, load changes and ``draining`` reach every subscriber in
about a second. What arrives is checked *inside* gossipsub, by our topic validator,
so an invalid record is neither delivered to us nor forwarded to anyone (and the
peer that forwarded it pays for it in its gossipsub score).

Each message is parsed and signature-checked once: the validator verifies it and
leaves the verified record beside the message's id; the receive loop takes it from
there and merges it into the view without verifying again.

py-libp2p needs some help here, each piece commented where it is done: its gossipsub
heartbeat and spam limit are set for a swarm whose nodes all refresh every few
seconds, its stream handlers are wrapped so that a message arriving while it stops
cannot take the host down, and the streams it leaves open when it stops are reset.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import trio

from .host import MeshHost, reset_quietly
from .one_at_a_time import OneAtATime
from .records import NodeRecord, RecordError, verify_record
from .registry_stats import RegistryStats
from .swarm_view import SwarmView

log = logging.getLogger("shardmesh.mesh.gossip")

PUBLISH_TIMEOUT = 5.0  # seconds a publish may take before we stop waiting for it
READY_TIMEOUT = 10.0  # seconds for py-libp2p's pubsub service to come up

# gossipsub: go-libp2p's defaults, except the heartbeat (py default 120 s) and the spam
# limit (py default 10 msg/s per forwarding peer and topic). Every node refreshes every
# few seconds, so a neighbour relays about N/interval messages/s for a swarm of N: the
# default would start dropping records at ~50 nodes. Our topic validator does the real
# checking (signature, owner, expiry) on every message anyway.
GOSSIP_DEGREE, GOSSIP_DEGREE_LOW, GOSSIP_DEGREE_HIGH = 6, 4, 12
GOSSIP_HEARTBEAT = 1
GOSSIP_MAX_MSGS_PER_S = 500.0

# Verified records waiting for the receive loop, by message id. A valid message is
# normally delivered right after validation, but pubsub may still drop it (its
# subscription buffer is full, or it claims to come from us): such entries are never
# taken, and the oldest go once this many are waiting.
VERIFIED_BACKLOG = 1024


def records_topic(model_id: str) -> str:
    """The gossipsub topic carrying the records of ``model_id``."""
    return f"shardmesh/{model_id}/records/1"


def _peer_str(peer_bytes: bytes) -> str:
    from libp2p.peer.id import ID

    return ID(peer_bytes).to_base58()


class Gossip:
    """Gossipsub for one model's records: validates and merges what comes in, publishes ours.

    Run it in a nursery: ``await nursery.start(gossip.run)`` returns once subscribed;
    it keeps merging into ``view`` until cancelled. ``pubsub`` is py-libp2p's Pubsub
    while it runs, None otherwise.
    """

    def __init__(self, mesh_host: MeshHost, model_id: str, view: SwarmView, stats: RegistryStats) -> None:
        self.mesh_host = mesh_host
        self.model_id = model_id
        self.topic = records_topic(model_id)
        self.view = view
        self.stats = stats
        self.pubsub: Any = None  # libp2p Pubsub, set while run() runs
        self._message_id: Any = None  # the pubsub's own message id function
        self._verified: OrderedDict[bytes, tuple[bytes, NodeRecord, str]] = OrderedDict()
        self._calls: OneAtATime | None = None

    async def publish(self, envelope: bytes) -> None:
        """Publish a signed record; raises StillRunning if the last publish has not ended."""
        if self.pubsub is None or self._calls is None:
            raise RuntimeError("gossip is not running")
        await self._calls.call("publish", PUBLISH_TIMEOUT, self.pubsub.publish, self.topic, envelope)

    async def ensure_peer_stream(self, peer_id: Any, timeout: float) -> None:
        """Open our gossip stream to a peer connected before pubsub started.

        Pubsub learns of peers from connection events, so it never talks to a peer
        whose connection predates it unless told to.
        """
        if self.pubsub is not None:
            await self.pubsub.ensure_peer_stream(peer_id, timeout=timeout)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start gossipsub, subscribe, then merge what arrives until cancelled."""
        from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, PROTOCOL_ID_V12, GossipSub
        from libp2p.pubsub.pubsub import Pubsub
        from libp2p.tools.anyio_service import background_trio_service

        network = self.mesh_host.host.get_network()
        notifees_before = list(network.notifees)
        gossipsub = GossipSub(
            protocols=[PROTOCOL_ID_V12, PROTOCOL_ID_V11, PROTOCOL_ID],
            degree=GOSSIP_DEGREE,
            degree_low=GOSSIP_DEGREE_LOW,
            degree_high=GOSSIP_DEGREE_HIGH,
            heartbeat_interval=GOSSIP_HEARTBEAT,
            max_messages_per_topic_per_second=GOSSIP_MAX_MSGS_PER_S,
        )
        pubsub = Pubsub(self.mesh_host.host, gossipsub)
        self._message_id = pubsub.get_message_id
        pubsub.set_topic_validator(self.topic, self._validate, False)
        # Pubsub hangs a notifee on the network and never takes it down.
        added_notifees = [n for n in network.notifees if n not in notifees_before]

        # Pubsub registered raw stream handlers, which outlive the service: a message
        # that reaches one while it stops raises out of it (a task started in a closed
        # nursery) and takes the host down. Re-register them behind MeshHost's guard,
        # which turns any exception into a reset stream.
        inbound: set = set()  # gossip streams peers opened to us, reset when we stop

        async def handler(stream) -> None:
            inbound.add(stream)
            try:
                await pubsub.stream_handler(stream)
            finally:
                inbound.discard(stream)
                # Pubsub's reader returns without closing the stream once the service
                # stops; the peer would keep writing into it until yamux's window
                # overflows and the whole connection (inference streams too) is dropped.
                await reset_quietly(stream)

        protocols = list(gossipsub.get_protocols())
        for protocol in protocols:
            self.mesh_host.set_handler(protocol, handler)
        try:
            async with background_trio_service(pubsub), background_trio_service(gossipsub):
                with trio.fail_after(READY_TIMEOUT):
                    await pubsub.wait_until_ready()
                subscription = await pubsub.subscribe(self.topic)
                async with trio.open_nursery() as nursery:
                    self._calls = OneAtATime(nursery)
                    self.pubsub = pubsub
                    task_status.started()
                    await self._receive_loop(subscription)
        finally:
            # Unhook Pubsub's notifee and answer gossip streams with a reset from now
            # on. *Replace* the handlers, never remove them: py-libp2p's protocol
            # negotiation looks a handler up again after an await, so removing one
            # while a peer negotiates it raises a KeyError that takes the host down.
            for notifee in added_notifees:
                network.remove_notifee(notifee)
            for protocol in protocols:
                self.mesh_host.set_handler(protocol, reset_quietly)
            # Pubsub leaves its gossip streams open when it stops: reset them, so peers
            # drop us from their mesh now (not when the connection goes) and the readers
            # blocked on them end. Shielded: we are usually here because of a cancel.
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                async with trio.open_nursery() as resets:
                    for stream in [*inbound, *pubsub.peers.values()]:
                        resets.start_soon(reset_quietly, stream)
            self.pubsub = self._calls = None
            self._verified.clear()

    # --- in ----------------------------------------------------------------------------

    def _validate(self, forwarder: Any, msg: Any) -> bool:
        """Pubsub topic validator: a valid record of this model, published by its owner.

        Requiring the pubsub origin (``from``, covered by the pubsub signature) to be the
        record's peer means nobody can replay someone else's old records on gossip. A
        record the view has no place for (:mod:`.view_room`; ``forwarder`` is its origin
        there) is refused too, so a flood stops at the first node it reaches.
        Nothing may raise into pubsub: any failure is a dropped message.
        """
        try:
            record = self._check(msg)
            origin = forwarder.to_base58()
            if record.peer != self.view.own and not self.view.admits(record, origin):
                return False  # (our own record, as we publish it, is never in the room)
            self._verified[self._message_id(msg)] = (bytes(msg.data), record, origin)
            while len(self._verified) > VERIFIED_BACKLOG:
                self._verified.popitem(last=False)
        except RecordError as exc:
            self.stats.invalid_dropped += 1
            log.debug("dropping gossip record from %s: %s", forwarder, exc)
            return False
        except Exception as exc:
            self.stats.invalid_dropped += 1
            log.debug("dropping gossip record from %s: %s: %s", forwarder, type(exc).__name__, exc)
            return False
        return True

    def _check(self, msg: Any) -> NodeRecord:
        """The record in ``msg``, verified, or RecordError."""
        record = verify_record(msg.data, expected_model=self.model_id)
        origin = _peer_str(msg.from_id)
        if origin != record.peer:
            raise RecordError(RecordError.WRONG_PEER, f"record of {record.peer} published by {origin}")
        return record

    def _verified_record(self, msg: Any) -> tuple[NodeRecord, str] | None:
        """The record our validator verified for ``msg`` and its origin; verified here
        (origin unknown) if it has none.

        The fallback covers a message pubsub delivers without asking the validator:
        py-libp2p caches validation results by message id for longer than it
        remembers which messages it has seen, so a late duplicate can skip us.
        """
        entry = self._verified.pop(self._message_id(msg), None)
        if entry is not None and entry[0] == msg.data:
            return entry[1], entry[2]
        try:
            return self._check(msg), ""
        except Exception:
            return None  # expiry may have passed since the validator said yes

    async def _receive_loop(self, subscription: Any) -> None:
        async for msg in subscription:
            verified = self._verified_record(msg)
            if verified is not None and self.view.merge(verified[0], msg.data, origin=verified[1]):
                self.stats.gossip_accepted += 1
