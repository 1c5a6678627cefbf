"""A TCP forwarder that delays each direction by a fixed one-way time: a WAN link on loopback.

This kernel has no ``netem`` qdisc, so distance is emulated in user space. A
:class:`DelayLine` listens on a port and forwards every connection to one target; each
chunk it reads leaves for the other side ``delay`` seconds after it arrived, in the
order it arrived. Back-pressure is kept: while more than ``max_in_flight`` bytes of a
direction are waiting out their delay, it stops reading that direction, so the sender's
TCP window fills and its writes block, as on a long link with little buffer. A half
close (EOF) travels the same way, after the bytes before it.

A node put behind one (``--listen`` on its own port, ``--announce`` the line's) is
reached only through it, so every connection to it, hop links included, pays the
delay each way (``shardmesh bench --wan``; tests import :class:`DelayLine`).

``python -m shardmesh.tools.delay_line --to HOST:PORT --delay-ms 10 [--port P]`` runs
one until stopped, after printing ``delay line 127.0.0.1:P -> HOST:PORT``.
"""

from __future__ import annotations

import argparse
import math
import sys

import trio

__all__ = ["DelayLine"]

CHUNK = 64 * 1024
MAX_IN_FLIGHT = 4 << 20  # bytes per direction waiting out their delay


class DelayLine:
    def __init__(self, target: tuple[str, int], delay: float, max_in_flight: int = MAX_IN_FLIGHT) -> None:
        self.target = target
        self.delay = delay
        self.max_in_flight = max_in_flight
        self.port = 0
        self.peak_in_flight = 0  # the most bytes one direction ever held (tests read it)
        self.connections = 0  # connections forwarded so far

    async def serve(self, host: str = "127.0.0.1", port: int = 0, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Listen on ``host:port`` (0: a free port, then :attr:`port`) until cancelled."""
        listeners = await trio.open_tcp_listeners(port, host=host)
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._forward, listeners)

    async def _forward(self, client: trio.SocketStream) -> None:
        self.connections += 1
        try:
            server = await trio.open_tcp_stream(*self.target)
        except OSError:
            return  # nobody there: the client sees its connection close
        async with server, trio.open_nursery() as nursery:
            ended = [0]

            async def carry(src: trio.SocketStream, dst: trio.SocketStream) -> None:
                clean = await self._carry(src, dst)
                ended[0] += 1
                if not clean or ended[0] == 2:  # a reset ends both ways; two EOFs end the connection
                    nursery.cancel_scope.cancel()

            nursery.start_soon(carry, client, server)
            nursery.start_soon(carry, server, client)

    async def _carry(self, src: trio.SocketStream, dst: trio.SocketStream) -> bool:
        """One direction: read, hold each chunk ``delay`` seconds, write in order. True
        when it ended with the sender's EOF passed on, False when either side broke."""
        send, receive = trio.open_memory_channel[tuple[float, bytes]](math.inf)
        in_flight = [0]
        room = [trio.Event()]
        clean = [False]

        async def reader() -> None:
            with send:
                while True:
                    while in_flight[0] >= self.max_in_flight:  # back-pressure: stop reading
                        await room[0].wait()
                    try:
                        data = await src.receive_some(CHUNK)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        return
                    in_flight[0] += len(data)
                    self.peak_in_flight = max(self.peak_in_flight, in_flight[0])
                    send.send_nowait((trio.current_time() + self.delay, data))
                    if not data:
                        return

        async def writer() -> None:
            async for due, data in receive:
                await trio.sleep_until(due)
                try:
                    if data:
                        await dst.send_all(data)
                    else:
                        await dst.send_eof()
                        clean[0] = True
                        return
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                in_flight[0] -= len(data)
                if in_flight[0] < self.max_in_flight:
                    room[0].set()
                    room[0] = trio.Event()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)

            async def write_then_stop() -> None:
                await writer()
                nursery.cancel_scope.cancel()  # nothing more can go out: stop reading too

            nursery.start_soon(write_then_stop)
        return clean[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shardmesh.tools.delay_line", description=__doc__.splitlines()[0])
    p.add_argument("--to", required=True, metavar="HOST:PORT", help="where to forward")
    p.add_argument("--delay-ms", type=float, default=10.0, help="one-way delay each direction (default 10)")
    p.add_argument("--port", type=int, default=0, help="port to listen on, on 127.0.0.1 (default: a free one)")
    args = p.parse_args(argv)
    host, _, port = args.to.rpartition(":")
    line = DelayLine((host, int(port)), args.delay_ms / 1000)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            listening = await nursery.start(line.serve, "127.0.0.1", args.port)
            print(f"delay line 127.0.0.1:{listening} -> {args.to} ({args.delay_ms:g} ms each way)", flush=True)

    try:
        trio.run(run)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
