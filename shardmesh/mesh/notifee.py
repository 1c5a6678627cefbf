"""A py-libp2p network notifee that ignores every event: subclass it and override the
ones you watch.

py-libp2p calls a notifee's six methods from inside its connection and stream paths,
so each must return quickly and never raise; each no-op here still yields to trio once,
as py-libp2p expects of an ``async`` method.
"""

from __future__ import annotations

import trio
from libp2p.abc import INotifee

__all__ = ["QuietNotifee"]


class QuietNotifee(INotifee):
    async def connected(self, network, conn) -> None:
        await trio.lowlevel.checkpoint()

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
