"""The swarm view: the table of verified NodeRecords one node holds, and its expiry.

Records reach the view from gossip, the DHT and other nodes' swarm maps; whoever hands
one in has verified it already (signature from the peer id itself, model, expiry). The
view only decides what to keep:

* per peer the highest ``seq`` wins (a restarted node signs with a higher one);
* our own record is set by the registry that signs it (:meth:`SwarmView.set_own`),
  never taken from outside, even with a higher ``seq``;
* a record leaves the view at its ``expires``: :meth:`SwarmView.records` hides it from
  then on and :meth:`SwarmView.purge_loop` drops it, so a node that stops refreshing
  is gone within a TTL;
* :meth:`SwarmView.wait_changed` wakes on a real change (a peer appearing or leaving,
  a record that says something new), not on a plain refresh;
* the view has a fixed number of places, shared out by origin and host
  (:mod:`.view_room`), so that records from free identities cannot grow it without
  bound nor push out the records of peers that came by other ways.

Beside each record the view keeps its signed envelope exactly as received, so the
whole view can be handed on (``/shardmesh/swarm/1.0.0``) and checked by anyone.

No host, no network: the view is plain data plus trio events, testable on its own.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable, Iterable

import trio

from ..placement.spans import ServerView
from .records import NodeRecord, content_of, server_view
from .registry_stats import RegistryStats
from .liveness import Liveness
from .view_room import ViewRoom, host_of

log = logging.getLogger("shardmesh.mesh.swarm_view")

PURGE_GRACE = 0.01  # s past the earliest expiry the purge loop wakes (records() hides it already)


def server_views(records: Iterable[NodeRecord]) -> list[ServerView]:
    """What placement and routing see of ``records``: the ones serving blocks, as ServerViews.

    The one conversion from records to servers, used by the registry's view and by
    anything holding records of its own (``shardmesh status``'s fetched map).
    """
    return [server_view(r) for r in records if r.serves_blocks]


class SwarmView:
    """Live, verified, expiring records of one model's swarm, one per peer.

    ``own`` is the peer id whose record only :meth:`set_own` may install (this node's,
    or None for a pure observer that publishes nothing). ``clock`` gives unix seconds
    (records carry absolute expiry times); tests pass one that follows trio's clock.
    ``room`` shares out the places (:class:`~.view_room.ViewRoom`; its defaults when not
    given). ``liveness`` holds the peers this node found unreachable: :meth:`servers`
    leaves them out until they are back. ``allowed``, when given, refuses the records of every peer it says no to
    (a private swarm, :mod:`.allow_list`). ``total_blocks``, when given,
    is the model's block count as this node knows it: the model id names the config but
    a verifier cannot recompute the count from it, so a record that disagrees is refused
    here (it could only be a lie or a bug, and its span would mislead placement).
    """

    def __init__(
        self,
        model_id: str,
        own: str | None,
        *,
        stats: RegistryStats | None = None,
        clock: Callable[[], float] = time.time,
        total_blocks: int | None = None,
        room: ViewRoom | None = None,
        allowed: Callable[[str], bool] | None = None,
        liveness: Liveness | None = None,
    ) -> None:
        self.model_id = model_id
        self.total_blocks = total_blocks
        self.own = own
        self.stats = stats if stats is not None else RegistryStats()
        self.room = room if room is not None else ViewRoom()
        self.allowed = allowed  # a private swarm's list (allow_list.py); None: anyone
        self.liveness = liveness if liveness is not None else Liveness()
        self._clock = clock
        self._records: dict[str, NodeRecord] = {}
        self._signed: dict[str, bytes] = {}  # peer -> envelope of its record above, as received
        self._changed = trio.Event()
        self._purge_wake = trio.Event()
        self._purge_at = math.inf  # when purge_loop wakes next (the earliest expiry it saw)

    # --- reading ---------------------------------------------------------------------

    def records(self) -> list[NodeRecord]:
        """Live records, ours included, sorted by peer id."""
        now = self._clock()
        return sorted((r for r in self._records.values() if r.expires >= now), key=lambda r: r.peer)

    def get(self, peer: str) -> NodeRecord | None:
        """``peer``'s live record, or None."""
        record = self._records.get(peer)
        return record if record is not None and record.expires >= self._clock() else None

    def own_record(self) -> NodeRecord | None:
        """Our record as last set by :meth:`set_own`, even past its expiry; None before."""
        return self._records.get(self.own) if self.own is not None else None

    def addresses(self, peer: str) -> list[str]:
        """Where ``peer`` listens, as its live record says (multiaddrs with /p2p/); [] if unknown."""
        record = self.get(peer)
        return list(record.addrs) if record is not None else []

    def servers(self) -> list[ServerView]:
        """What placement and routing see of the live records that serve blocks, less
        the peers this node found unreachable (liveness.py)."""
        unreachable = self.liveness.unreachable()
        return server_views(r for r in self.records() if r.peer not in unreachable)

    def peers_serving(self, block: int) -> list[NodeRecord]:
        """Live records whose span covers ``block`` (any state; routing decides)."""
        return [r for r in self.records() if r.serves(block)]

    def signed_records(self) -> list[bytes]:
        """The signed envelopes of :meth:`records`, in the same order.

        Records are self-certifying, so whoever receives these can verify each one
        without trusting us; a record whose envelope we do not hold is left out.
        """
        return [self._signed[r.peer] for r in self.records() if r.peer in self._signed]

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

    # --- changing --------------------------------------------------------------------

    def admits(self, record: NodeRecord, origin: str = "") -> bool:
        """Is ``record``, brought by ``origin``, one this view may hold: this swarm's,
        and with a place for it? Changes nothing, and says nothing of ``seq``: a record
        we already hold at this ``seq`` is no fault of whoever relays it again.

        Gossip asks this before it lets a record through, so that a record we have no
        place for is not forwarded to anyone either.
        """
        return self._admission(record, origin, check_seq=False) is not None

    def merge(self, record: NodeRecord, signed: bytes, origin: str = "") -> bool:
        """Keep a verified ``record`` (and ``signed``, its envelope) if it is newer and
        finds a place; True if it was kept. ``origin`` is the peer that brought it
        (see :mod:`.view_room`): "" for a source that has no peer (tests, the DHT)."""
        admission = self._admission(record, origin)
        if admission is None:
            return False
        evict = admission[0]
        if evict is not None:
            self._drop(evict)
            self.stats.evicted += 1
            self._signal_changed()
        self.room.take(record.peer, origin, host_of(record.addrs))
        self._install(self._records.get(record.peer), record, signed)
        self.liveness.record_signed(record.peer, record.seq)
        return True

    def _admission(self, record: NodeRecord, origin: str, check_seq: bool = True) -> tuple[str | None] | None:
        """None if ``record`` is not to be kept, else ``(peer to evict first or None,)``."""
        if record.model != self.model_id or record.expires < self._clock():
            return None
        if self.allowed is not None and not self.allowed(record.peer):
            return None
        if self.total_blocks is not None and record.total_blocks != self.total_blocks:
            log.debug("record of %s says %d blocks, we know %d", record.peer, record.total_blocks, self.total_blocks)
            return None
        if record.peer == self.own:
            return None  # our own record comes from set_own, never from outside
        current = self._records.get(record.peer)
        if check_seq and current is not None and current.seq >= record.seq:
            return None
        admitted, evict = self.room.admit(record.peer, origin, host_of(record.addrs))
        if not admitted:
            self.stats.refused_no_room += 1
            return None
        return (evict,)

    def set_own(self, record: NodeRecord, signed: bytes) -> None:
        """Install our freshly signed record (``own`` must be set)."""
        if self.own is None or record.peer != self.own:
            raise ValueError(f"this view holds no own record for {record.peer}")
        self._install(self._records.get(self.own), record, signed)

    def _install(self, current: NodeRecord | None, record: NodeRecord, signed: bytes) -> None:
        self._records[record.peer] = record
        self._signed[record.peer] = bytes(signed)
        if record.peer != self.own and record.expires < self._purge_at:
            self._purge_wake.set()
        if current is None or content_of(current) != content_of(record):
            self._signal_changed()

    def purge_expired(self) -> list[str]:
        """Drop every record (ours excepted) whose expiry has passed; the peers dropped."""
        now = self._clock()
        expired = [p for p, r in self._records.items() if r.expires < now and p != self.own]
        for peer in expired:
            self._drop(peer)
            log.debug("record of %s expired", peer)
        if expired:
            self.stats.expired_purged += len(expired)
            self._signal_changed()
        return expired

    def _drop(self, peer: str) -> None:
        del self._records[peer]
        self._signed.pop(peer, None)
        self.room.leave(peer)
        self.liveness.clear(peer)

    async def purge_loop(self) -> None:
        """Drops each peer's record when it expires, until cancelled.

        It sleeps until the earliest expiry in the view, not on a fixed tick: an idle
        node then wakes only when something can expire (on a machine shared with other
        nodes each wake-up can land in their compute), and a record goes at its expiry,
        not up to a tick late. :meth:`merge` cuts the sleep short for a record that
        expires sooner.
        """
        while True:
            self.purge_expired()
            others = (r.expires for p, r in self._records.items() if p != self.own)
            self._purge_at = min(others, default=math.inf)
            self._purge_wake = trio.Event()
            with trio.move_on_after(max(0.0, self._purge_at - self._clock()) + PURGE_GRACE):
                await self._purge_wake.wait()

    def _signal_changed(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
