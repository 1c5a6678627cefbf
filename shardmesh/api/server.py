"""Serving an ASGI app over HTTP: hypercorn's trio worker on a socket we bind ourselves."""

from __future__ import annotations

import logging
import socket
from functools import partial

import hypercorn.config
import hypercorn.trio
import trio
from starlette.types import ASGIApp

#: How long an idle keep-alive connection stays open before the server closes it.
#: Hypercorn's own default, written down so it is a decision: long enough for a client
#: to send its next request on the same connection, short enough that abandoned
#: connections do not pile up. (A client that sends ``Connection: close`` has its
#: connection closed as soon as the response is sent.)
KEEP_ALIVE_SECONDS = 5.0

#: How long a client may leave a response's bytes unread (its receive window closed)
#: or unacknowledged before its connection is dropped. hypercorn has no write timeout,
#: and its socket writes are shielded from cancellation, so a streaming client that
#: stops reading would hold its connection, and its generation, for as long as it
#: stays connected. The kernel enforces this one (``TCP_USER_TIMEOUT``, Linux; since
#: 5.11 it counts a closed window too): the stalled write fails, hypercorn closes the
#: connection, and the generation is cancelled as when a client hangs up. A client
#: that is reading, however slowly, is never dropped.
WRITE_TIMEOUT_SECONDS = 30.0


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` and listening; port 0 picks a free port.

    Binding here, rather than letting hypercorn do it, means a busy port fails with a
    plain ``OSError`` from :func:`serve` (not one buried in nested exception groups),
    and the bound port is known before the server starts.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host.strip("[]"), port), family=family)
    if hasattr(socket, "TCP_USER_TIMEOUT"):  # accepted connections inherit it
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(WRITE_TIMEOUT_SECONDS * 1000))
    return sock


async def serve(app: ASGIApp, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``app`` over HTTP with hypercorn's trio worker until cancelled.

    Use it from the node's nursery: ``port = await nursery.start(serve, app, host, 0)``
    returns once requests are being accepted, with the port actually bound (so port 0
    works and the caller can print the URL).
    """
    sock = listening_socket(host, port)
    bound_port = sock.getsockname()[1]
    config = hypercorn.config.Config()
    # hypercorn adopts an open socket through an "fd://" bind. detach() hands the file
    # descriptor over, so exactly one socket object owns (and finally closes) it.
    config.bind = [f"fd://{sock.detach()}"]
    config.keep_alive_timeout = KEEP_ALIVE_SECONDS
    config.accesslog = None  # requests are counted in /metrics; no per-request log lines
    config.errorlog = logging.getLogger("hypercorn.error")  # the node's logging setup decides
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(hypercorn.trio.serve, app, config))
        task_status.started(bound_port)
