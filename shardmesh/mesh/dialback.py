"""Can others dial us? Peers we are connected to try, on request, and say.

A node behind a home NAT can dial out to the whole swarm, and every peer it dialled can
then open streams to it, but nobody else can dial it: its record should say so, so that
peers know which connections only it can make. py-libp2p ships AutoNAT v1, but its
server "dials back" with ``host.connect``, which returns at once when a connection to
the asker exists, and the asker is always connected (it just asked): every node would
look public. So this is our own, as small as it can be (docs/PROTOCOL.md, section 8):

* the asker opens ``/shardmesh/dialback/1.0.0`` to a connected peer and sends its
  listening TCP ports (at most :data:`MAX_PORTS`);
* the peer dials each port at the IP it sees the asker's connection come from, never
  any other IP (so nobody can turn it against a third party), with a fresh identity of
  its own, so that the dial makes a new connection and the Noise handshake proves it
  reached the asker itself; it answers with the ports it reached;
* one request per asker per :data:`REQUEST_INTERVAL`, :data:`MAX_DIALS_AT_ONCE` dial-backs
  at a time on a node, whoever asks.

Frames: ``u16 big-endian length | plain CBOR map`` of at most :data:`MAX_MESSAGE` bytes,
``{"ports": [int, ...]}`` one way and ``{"reached": [int, ...], "ip": text}`` (or
``{"refused": "reason"}``) the other. :func:`verdict` turns several peers' answers into
``public``, ``private`` or ``unknown``; :func:`seen_at` into the addresses we were
reached at (behind a forwarded port, the router's: the one others should dial).
"""

from __future__ import annotations

import ipaddress
import logging
import struct
from typing import Awaitable, Callable, Iterable

import cbor2
import trio

from .cbor_plain import PlainCborError, loads_plain
from .read_exactly import read_exactly
from .record_checks import REACHABILITY
from .host import DIAL_TIMEOUT, MeshHost, close_quietly, remote_ip, reset_quietly, running_host
from .swarm_key import SwarmKey

log = logging.getLogger("shardmesh.mesh.dialback")

PROTOCOL = "/shardmesh/dialback/1.0.0"
PUBLIC, PRIVATE, UNKNOWN = REACHABILITY
MAX_PORTS = 4
MAX_MESSAGE = 256  # bytes of one frame's CBOR: four ports need about 20
REQUEST_INTERVAL = 30.0  # s between two requests of one asker that we serve
MAX_DIALS_AT_ONCE = 2
READ_TIMEOUT = 10.0  # s an asker has to send its request
ANSWER_TIMEOUT = 2 * (DIAL_TIMEOUT + 3) * MAX_PORTS  # s we wait for a peer's answer, its dials included
ASK_PEERS = 3  # peers asked per check
RECHECK = 300.0  # s between checks once the answer is clear
RETRY = 30.0  # s before checking again while it is unknown
NOBODY_YET = 1.0  # s before looking again for a peer to ask
UNNAMED = "?"  # reached, by a peer that did not say at which IP

__all__ = [
    "PROTOCOL", "PRIVATE", "PUBLIC", "REACHABILITY", "UNKNOWN",
    "DialBackServer", "ask", "reached_addresses", "seen_at", "verdict", "watch_reachability",
]


async def _read_message(stream) -> dict:
    try:
        return await _read_frame(stream)
    except EOFError as exc:
        raise ValueError(str(exc)) from None


async def _read_frame(stream) -> dict:
    head = await read_exactly(stream, 2)
    (length,) = struct.unpack(">H", head)
    if length > MAX_MESSAGE:
        raise ValueError(f"a {length}-byte message (at most {MAX_MESSAGE})")
    try:
        message = loads_plain(await read_exactly(stream, length))
    except PlainCborError as exc:
        raise ValueError(f"not plain CBOR ({exc})") from None
    if not isinstance(message, dict):
        raise ValueError("not a map")
    return message


async def _write_message(stream, message: dict) -> None:
    data = cbor2.dumps(message)
    await stream.write(struct.pack(">H", len(data)) + data)


def _ports(message: dict) -> list[int] | None:
    ports = message.get("ports")
    if not isinstance(ports, list) or not 0 < len(ports) <= MAX_PORTS:
        return None
    if not all(isinstance(p, int) and not isinstance(p, bool) and 0 < p < 65536 for p in ports):
        return None
    return list(dict.fromkeys(ports))


async def dial_with_fresh_identity(address: str, swarm_key: SwarmKey | None) -> bool:
    """Does a new connection to ``address`` (ending in ``/p2p/<peer>``) complete its
    handshake, made from a throwaway identity (so no existing connection is reused)?"""
    from libp2p.crypto.ed25519 import create_new_key_pair

    try:
        async with running_host(create_new_key_pair(), [], swarm_key) as probe:
            with trio.move_on_after(DIAL_TIMEOUT + 2):
                await probe.connect(address)
                return True
    except Exception as exc:  # noqa: BLE001 - py-libp2p raises groups and its own errors; all mean "not reached"
        log.debug("dial-back to %s failed: %r", address, exc)
    return False


class DialBackServer:
    """Answers dial-back requests: ``mesh.set_handler(PROTOCOL, server.handle)``."""

    def __init__(self, dial: Callable[[str], Awaitable[bool]], clock: Callable[[], float] = trio.current_time) -> None:
        self.dial = dial
        self.clock = clock
        self.last_served: dict[str, float] = {}  # asker -> when we last took its request
        self.limit = trio.CapacityLimiter(MAX_DIALS_AT_ONCE)

    async def handle(self, stream) -> None:
        asker = stream.muxed_conn.peer_id.to_base58()
        ip = remote_ip(stream)
        try:
            with trio.fail_after(READ_TIMEOUT):
                message = await _read_message(stream)
        except (ValueError, trio.TooSlowError) as exc:
            log.debug("dial-back request from %s refused: %s", asker, exc)
            await reset_quietly(stream)
            return
        ports = _ports(message)
        now = self.clock()
        refusal = None
        if ports is None:
            refusal = f"ports must be a list of 1 to {MAX_PORTS} TCP ports"
        elif ip is None:
            refusal = "no IP to dial back"
        elif now - self.last_served.get(asker, -REQUEST_INTERVAL) < REQUEST_INTERVAL:
            refusal = f"one request per {REQUEST_INTERVAL:g} s"
        if refusal is not None:
            await _write_message(stream, {"refused": refusal})
            await close_quietly(stream)
            return
        self.last_served[asker] = now
        if len(self.last_served) > 4096:  # forget the oldest: the map stays bounded
            for old in sorted(self.last_served, key=self.last_served.__getitem__)[:1024]:
                del self.last_served[old]
        kind = "ip6" if ":" in ip else "ip4"
        reached = []
        async with self.limit:
            for port in ports:
                if await self.dial(f"/{kind}/{ip}/tcp/{port}/p2p/{asker}"):
                    reached.append(port)
        await _write_message(stream, {"reached": reached, "ip": ip})
        await close_quietly(stream)


async def ask(mesh: MeshHost, peer: str, ports: list[int]) -> list[str] | None:
    """Ask connected ``peer`` to dial us back on ``ports``: the addresses it reached us
    at (``/ip4/IP/tcp/PORT``; empty if none), or None if it refused or did not answer."""
    from libp2p.peer.id import ID

    stream = None
    try:
        with trio.fail_after(ANSWER_TIMEOUT):
            stream = await mesh.host.new_stream(ID.from_base58(peer), [PROTOCOL])
            await _write_message(stream, {"ports": ports[:MAX_PORTS]})
            answer = await _read_message(stream)
    except Exception as exc:  # noqa: BLE001 - any failure is "no answer"
        log.debug("dial-back request to %s: %r", peer, exc)
        if stream is not None:
            await reset_quietly(stream)
        return None
    await close_quietly(stream)
    return reached_addresses(answer, ports)


def reached_addresses(answer: dict, ports: list[int]) -> list[str] | None:
    """The addresses an answer says we were reached at: its ``reached`` ports (only
    those we asked about) at its ``ip`` (the one it saw us at). An answer without a
    valid ``ip`` (an older node) still counts as reached, at no address we can name."""
    reached = answer.get("reached")
    if not isinstance(reached, list):
        return None
    ports_reached = [p for p in reached if isinstance(p, int) and not isinstance(p, bool) and p in ports]
    if not ports_reached:
        return []
    try:
        ip = ipaddress.ip_address(answer.get("ip"))  # type: ignore[arg-type]
    except ValueError:
        return [UNNAMED]
    kind = "ip4" if ip.version == 4 else "ip6"
    return [f"/{kind}/{ip}/tcp/{port}" for port in ports_reached]


def verdict(answers: Iterable[list[str] | None], asked: int) -> str:
    """``public`` if any peer reached us; ``private`` if none did and two tried (or, of
    ``asked`` peers fewer than two, all did: a small swarm has no second opinion); else
    ``unknown`` (one failure among several may be that peer's own firewall)."""
    answered = [a for a in answers if a is not None]
    if any(answered):
        return PUBLIC
    return PRIVATE if answered and len(answered) >= min(2, asked) else UNKNOWN


def seen_at(answers: Iterable[list[str] | None]) -> list[str]:
    """The addresses peers reached us at, the one most peers agree on first."""
    counts: dict[str, int] = {}
    for answer in answers:
        for addr in dict.fromkeys(answer or ()):
            if addr != UNNAMED:
                counts[addr] = counts.get(addr, 0) + 1
    return sorted(counts, key=lambda a: -counts[a])


async def watch_reachability(
    mesh: MeshHost,
    candidates: Callable[[], list[str]],
    ports: list[int],
    publish: Callable[[str, list[str]], None],
) -> None:
    """Forever: ask up to :data:`ASK_PEERS` of the connected ``candidates()`` to dial us
    back, and ``publish(verdict, addresses reached)`` after the first round of
    answers and whenever either changes."""
    current: tuple[str, list[str]] = (UNKNOWN, [])
    asked_before = False
    while True:
        connected = {p.to_base58() for p in mesh.connected_peers()}
        peers = [p for p in candidates() if p in connected][:ASK_PEERS]
        answers: list[list[str] | None] = []
        if peers and ports:
            async with trio.open_nursery() as nursery:
                async def one(peer: str) -> None:
                    answers.append(await ask(mesh, peer, ports))
                for peer in peers:
                    nursery.start_soon(one, peer)
        found = (verdict(answers, len(peers)), seen_at(answers))
        first_answer = asked_before is False and peers
        asked_before = asked_before or bool(peers)
        # The first round is published even when it settled nothing (peers that do not
        # speak this protocol): the node then stops holding its addresses back.
        if first_answer or (found != current and (found[0] != UNKNOWN or current[0] == UNKNOWN)):
            log.info("reachability: %s (%d of %d peers asked reached us%s)", found[0], sum(bool(a) for a in answers),
                     len(peers), f" at {', '.join(found[1])}" if found[1] else "")
            current = found
            publish(*found)
        if not peers:
            await trio.sleep(NOBODY_YET)
        else:
            await trio.sleep(RETRY if found[0] == UNKNOWN else RECHECK)
