"""Tickets: a gateway's signature on each chain it opens, so a session is charged to the
gateway that really asked for it.

A hop counts sessions against the gateway an ``open`` names as well as against the peer
that sent it (``max_sessions_per_gateway``), and reclaims that gateway's idle sessions
when the count is full. Were the name taken on trust, any peer could open sessions in
an honest gateway's name and use up its share everywhere, or get its idle sessions
reclaimed. So the gateway signs, for each chain it opens, a small ticket::

    ticket = CBOR {"body": <body bytes>, "sig": Ed25519(TICKET_PREFIX || body bytes)}
    body   = CBOR {"session": text, "model": text, "gateway": <its peer id>,
                   "route": [{"peer", "start", "end"}, ...],   the whole route, first hop first
                   "iat": uint}                                unix seconds when it was signed

and every hop checks, before it counts or reclaims anything, that the ticket is signed
by the key inside the ``gateway`` peer id, names this session and model, that the route
it received is the end of the signed route, and that it is fresh. A hop forwards the
ticket unchanged. What a peer that saw a ticket can still do with it: open the same
session, on the same hops with the same blocks, while the ticket is fresh and no session
of that id is open there; one session per ticket per hop, charged to itself as upstream too.

Pure: bytes and numbers in, a ticket or :class:`TicketError` out; the clock is a
parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import cbor2

from .cbor_plain import PlainCborError, loads_plain, quote

__all__ = ["MAX_TICKET_BYTES", "TICKET_LIFETIME", "TicketError", "TicketIssuer", "check_ticket"]

TICKET_PREFIX = b"shardmesh-ticket/1\0"
TICKET_LIFETIME = 120.0  # seconds a ticket opens sessions after it was signed
CLOCK_SKEW = 30.0  # seconds a ticket may seem to come from the future (clocks are NTP-close, as for records)
MAX_TICKET_BYTES = 8192  # a 64-hop route of 52-character peer ids is about 4.5 KB


class TicketError(ValueError):
    """A missing, malformed, stale or forged ticket; the message says which."""


def _route_tuples(route: Sequence[Mapping[str, Any]]) -> list[tuple[Any, Any, Any]]:
    return [(hop.get("peer"), hop.get("start"), hop.get("end")) for hop in route]


@dataclass(frozen=True)
class TicketIssuer:
    """A gateway's signer: its peer id and its libp2p key pair."""

    peer: str
    key_pair: Any

    def sign_open(self, header: Mapping[str, Any], now: float) -> dict[str, Any]:
        """``header`` (an ``open`` naming this gateway) with the ticket for its session,
        model and route; the fields are signed as they are (a test may sign nonsense)."""
        body = cbor2.dumps({
            "session": header.get("session"),
            "model": header.get("model"),
            "gateway": self.peer,
            "route": header.get("route"),
            "iat": int(now),
        })  # fmt: skip
        ticket = cbor2.dumps({"body": body, "sig": self.key_pair.private_key.sign(TICKET_PREFIX + body)})
        return {**header, "ticket": ticket}


def check_ticket(ticket: Any, *, session: str, model: str, gateway: str, route: Sequence[Mapping[str, Any]], now: float) -> None:
    """Raise :class:`TicketError` unless ``ticket`` lets ``gateway`` open ``session`` of
    ``model`` over ``route`` (the hops from this one on) at time ``now``.

    Cheapest checks first; the signature last, so junk costs little."""
    if not isinstance(ticket, bytes):
        raise TicketError("open needs a ticket signed by its gateway")
    if len(ticket) > MAX_TICKET_BYTES:
        raise TicketError(f"ticket of {len(ticket)} bytes > {MAX_TICKET_BYTES}")
    try:
        envelope = loads_plain(ticket)
        body = envelope.get("body") if isinstance(envelope, dict) else None
        fields = loads_plain(body) if isinstance(body, bytes) else None
    except PlainCborError as exc:
        raise TicketError(f"ticket is not plain CBOR ({exc})") from None
    if not isinstance(fields, dict) or not isinstance(envelope.get("sig"), bytes):
        raise TicketError("ticket needs body and sig")
    for name, want in (("session", session), ("model", model), ("gateway", gateway)):
        if fields.get(name) != want:
            raise TicketError(f"ticket is for {name} {quote(fields.get(name))}, not this open's")
    signed = fields.get("route")
    if not isinstance(signed, list) or not all(isinstance(hop, dict) for hop in signed) or len(route) > len(signed):
        raise TicketError("ticket's route is malformed or shorter than the open's")
    if _route_tuples(signed[len(signed) - len(route) :]) != _route_tuples(route):
        raise TicketError("the ticket was signed for another route")
    iat = fields.get("iat")
    if not isinstance(iat, int) or isinstance(iat, bool):
        raise TicketError("ticket needs iat, the unix time it was signed")
    if iat < now - TICKET_LIFETIME:
        raise TicketError(f"ticket expired {now - TICKET_LIFETIME - iat:.0f} s ago")
    if iat > now + CLOCK_SKEW:
        raise TicketError(f"ticket signed {iat - now:.0f} s in the future (is a clock wrong?)")
    try:
        from libp2p.peer.id import ID

        public_key = ID.from_base58(gateway).extract_public_key()
        ok = public_key is not None and public_key.verify(TICKET_PREFIX + body, envelope["sig"])
    except Exception:
        ok = False
    if not ok:
        raise TicketError(f"ticket is not signed by gateway {quote(gateway)}")
