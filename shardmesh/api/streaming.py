"""Sending one generation to its client: a whole JSON body or server-sent events.

:class:`GenerationResponse` is an ASGI response (Starlette awaits any
``response(scope, receive, send)``), written against raw ``send`` because a stream's
status line must wait for the generation's first event, and because the generation
must stop the moment its client hangs up.

Once a stream has started the status code cannot change, so a failure mid-stream is
sent as a last event ``data: {"error": {...}}`` followed by ``data: [DONE]``. A stream
that waits (for a chain while the swarm repairs itself) sends an SSE comment,
``: waiting for the swarm``, every few seconds.

Every response ends through :func:`finish`, shielded from the disconnect watcher: see
there for why an unshielded last message leaves the client's connection open forever.
"""

from __future__ import annotations

import json
import logging
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable

import trio
from starlette.types import Receive, Scope, Send

from .errors import ApiError, internal_error
from .choices import Choices
from .generate import Finished, TokenEvent

log = logging.getLogger(__name__)

#: Time given to a generation to clean up (close its chain) after its client left.
CLOSE_GRACE_SECONDS = 5.0

#: A stream with no event for this long gets an SSE comment (clients ignore comments;
#: proxies see traffic and keep the connection): while the swarm repairs a gap, say.
HEARTBEAT_SECONDS = 5.0
WAITING_COMMENT = b": waiting for the swarm\n\n"


@asynccontextmanager
async def closing(events: Any) -> AsyncIterator[Any]:
    """Like ``contextlib.aclosing``, but the close survives cancellation.

    When a client disconnects we cancel the request; the generation still needs a
    moment to close its chain of nodes, so its ``aclose()`` runs shielded, for at
    most ``CLOSE_GRACE_SECONDS``.
    """
    try:
        yield events
    finally:
        with trio.move_on_after(CLOSE_GRACE_SECONDS, shield=True):
            await events.aclose()


async def cancel_on_disconnect(receive: Receive, cancel_scope: trio.CancelScope) -> None:
    """Wait for the client to hang up, then cancel ``cancel_scope``.

    Called once the request body has been read, so the next ASGI message can only be
    ``http.disconnect``: the client gone, or (hypercorn sends it then too) the response
    sent in full, which is why the last message goes through :func:`finish`.
    """
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            cancel_scope.cancel()
            return


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event: ``data: <json>`` and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


async def finish(send: Send, body: bytes = b"") -> None:
    """Send a response's last body message (``more_body: False``), shielded from cancellation.

    That message is where hypercorn ends the exchange, inside this very ``send`` call:
    it writes the end of the body, tells the app ``http.disconnect`` (the ASGI way of
    saying "response sent"), and then either closes the socket (the client asked for
    ``Connection: close``, or the connection cannot be reused) or arms its keep-alive
    timer. :func:`cancel_on_disconnect` wakes on that very ``http.disconnect`` and
    cancels the request's scope, so without the shield the cancellation lands in
    hypercorn's bookkeeping at its next checkpoint (the ``send_eof`` before the close,
    the start of the timer) and the socket is then neither closed nor timed out: it
    stays open until the client hangs up. The shield covers only that bookkeeping:
    hypercorn already shields its own socket writes.
    """
    with trio.CancelScope(shield=True):
        await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    """A whole JSON response through raw ASGI ``send``."""
    data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
        }
    )
    await finish(send, data)


class GenerationResponse:
    """An ASGI response that runs a request's generations (one per choice, ``n``) and
    sends them, whole or streamed.

    ``events`` holds, per choice, what starts its generation: it returns the async
    iterator of its events, ending with :class:`~shardmesh.api.generate.Finished`, and
    raising ApiError for what the client should hear about. Each iterator is created,
    consumed and closed in one task of its own (:meth:`_produce`), inside a nursery that
    also watches for the client disconnecting; their events meet in one channel, tagged
    with their choice. The first event is awaited *before* the status line goes out, so
    errors the generator raises up front (model unavailable, prompt too long) still get
    their own status code when streaming. A failure of any choice ends the response.
    """

    def __init__(self, events: list[Callable[[], AsyncIterator[TokenEvent | Finished]]], fmt: Choices, *, stream: bool,
                 before: Callable[[], Awaitable[None]] | None = None) -> None:  # fmt: skip
        self.events = events
        self.fmt = fmt
        self.stream = stream
        self.before = before  # awaited before the choices start (their shared prefill)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancel_on_disconnect, receive, nursery.cancel_scope)
            async with trio.open_nursery() as producers:
                outbox, inbox = trio.open_memory_channel[Any](0)
                producers.start_soon(self._produce_all, outbox)
                if self.stream:
                    await self.send_stream(send, inbox)
                else:
                    await self.send_whole(send, inbox)
                producers.cancel_scope.cancel()
            nursery.cancel_scope.cancel()

    async def send_whole(self, send: Send, inbox: trio.MemoryReceiveChannel[Any]) -> None:
        done: dict[int, Finished] = {}
        while len(done) < len(self.events):
            index, event = await inbox.receive()
            if isinstance(event, ApiError):
                await send_json(send, event.status, event.body())
                return
            if isinstance(event, BaseException):
                log.error("generation failed", exc_info=event)
                await send_json(send, 500, internal_error().body())
                return
            if isinstance(event, Finished):
                self.fmt.on_finish(index, event)
                done[index] = event
            else:
                self.fmt.on_token(index, event)
        await send_json(send, 200, self.fmt.whole([done[i] for i in range(len(done))]))

    async def send_stream(self, send: Send, inbox: trio.MemoryReceiveChannel[Any]) -> None:
        """Stream the events; while none comes for :data:`HEARTBEAT_SECONDS`, send an SSE
        comment so that the client and any proxy keep the connection open. An error that
        comes before the first event gets its own status code; later, the stream has begun.
        """
        first = await _next(inbox)
        if first is not None and isinstance(first[1], ApiError):
            await send_json(send, first[1].status, first[1].body())
            return
        if first is not None and isinstance(first[1], BaseException):
            log.error("generation failed before its first event", exc_info=first[1])
            await send_json(send, 500, internal_error().body())
            return

        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                    (b"x-accel-buffering", b"no"),  # tell nginx-like proxies not to buffer
                ],
            }
        )

        async def emit(chunk: dict[str, Any] | str) -> None:
            await send({"type": "http.response.body", "body": sse(chunk), "more_body": True})

        item: Any = first
        done: dict[int, Finished] = {}
        for chunk in self.fmt.prelude():
            await emit(chunk)
        while True:
            index, event = item if item is not None else (None, None)
            if item is None:
                await send({"type": "http.response.body", "body": WAITING_COMMENT, "more_body": True})
            elif isinstance(event, ApiError):
                log.warning("generation failed mid-stream: %s", event.message)
                await emit(event.body())
                break
            elif isinstance(event, BaseException):
                log.error("generation failed mid-stream", exc_info=event)
                await emit(internal_error().body())
                break
            elif isinstance(event, Finished):
                for chunk in self.fmt.on_finish(index, event):
                    await emit(chunk)
                done[index] = event
                if len(done) == len(self.events):
                    if self.fmt.include_usage:
                        await emit(self.fmt.usage_chunk([done[i] for i in range(len(done))]))
                    break
            else:
                for chunk in self.fmt.on_token(index, event):
                    await emit(chunk)
            item = await _next(inbox)
        # The terminator and the end of the body in one message: the chunked body's
        # last chunk goes out with it, and hypercorn then closes or parks the socket.
        await finish(send, sse("[DONE]"))

    async def _produce_all(self, outbox: trio.MemorySendChannel[Any]) -> None:
        """Every choice's events into ``outbox`` as ``(index, event)``, after ``before``."""
        async with outbox:
            if self.before is not None:
                await self.before()
            async with trio.open_nursery() as nursery:
                for index in range(len(self.events)):
                    nursery.start_soon(self._produce, index, outbox.clone())

    async def _produce(self, index: int, outbox: trio.MemorySendChannel[Any]) -> None:
        """One choice's events into ``outbox``; a failure goes there as its exception."""
        async with outbox:
            try:
                async with closing(self.events[index]()) as events:
                    async for event in events:
                        await outbox.send((index, event))
                        if isinstance(event, Finished):
                            return
                raise RuntimeError("the generator ended without a Finished event")
            except Exception as exc:
                await outbox.send((index, exc))


async def _next(inbox: trio.MemoryReceiveChannel[Any]) -> Any:
    """The next ``(index, event or exception)`` from :meth:`GenerationResponse._produce`;
    None when :data:`HEARTBEAT_SECONDS` passed without one."""
    with trio.move_on_after(HEARTBEAT_SECONDS):
        return await inbox.receive()
    return None
