"""Which session a hop gives up when a newcomer finds no room.

A hop admits a bounded number of sessions per upstream peer and per gateway, and its
KV cache is bounded. Identities are free, so anyone can open sessions up to those
bounds and leave them idle, and every honest chain through the same hops is then
refused until the idle timeout (minutes). So a hop that is out of room for a new
session takes it from the session that has been idle longest, if that one has been
idle for at least :data:`RECLAIM_IDLE` seconds: a session in use is never taken.

The session reclaimed ends with the error code ``reclaimed`` (docs/PROTOCOL.md 6.3),
which the gateway believes only if it has itself sent nothing on that chain for
:data:`RECLAIM_IDLE` seconds (:func:`believable`): a hop cannot end busy sessions
under that name to fail requests without being blamed.

Pure: sessions and times in, a session (or None) out.
"""

from __future__ import annotations

from typing import Iterable

from .hop_session import HopSession

RECLAIM_IDLE = 10.0  # s a session must have been idle before its room may be taken
RECLAIMED = "reclaimed"  # the error code a reclaimed session ends with

__all__ = ["RECLAIMED", "RECLAIM_IDLE", "believable", "longest_idle"]


def longest_idle(sessions: Iterable[HopSession], now: float) -> HopSession | None:
    """The session idle longest among ``sessions``, if idle for :data:`RECLAIM_IDLE`; else
    None. A session whose step is being computed is not idle."""
    victim = min((s for s in sessions if not s.busy), key=lambda s: s.last_active, default=None)
    if victim is None or now - victim.last_active < RECLAIM_IDLE:
        return None
    return victim


def believable(idle_for: float) -> bool:
    """Can a hop have reclaimed a session whose gateway sent nothing for ``idle_for`` s?

    A hop measures idleness from when a step reached it, which is after the gateway
    sent it, so an honest hop's claim always finds the gateway idle at least as long.
    """
    return idle_for >= RECLAIM_IDLE
