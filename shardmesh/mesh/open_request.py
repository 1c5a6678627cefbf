"""Whether a hop accepts an ``open``: every check it makes before it allocates anything.

An ``open`` (docs/PROTOCOL.md, 6.2) arrives from a peer we have no reason to trust,
so every field is checked here and the first violation is refused with the code
docs/PROTOCOL.md 6.3 gives it: the session id, the model, the route's shape and the
blocks it asks of this node, ``max_length``, the gateway, the upstream peer's session
count and, on the last hop, the token history and the sampling parameters.

Nothing here ``repr``s a field whole: a bad value is named by
:func:`~shardmesh.mesh.cbor_plain.quote`. And a hop passes on only what it knows: the
``open`` it sends the next hop (:func:`next_open`) carries the fields of
docs/PROTOCOL.md 6.2 and the route's hops as ``{peer, start, end}``: a field the
protocol does not name stays here, so nothing a stranger adds travels (or is
re-encoded) further.

This module is pure: plain data in (the header, the payload, the limits, what this
node serves right now), an :class:`OpenRequest` or a :class:`~shardmesh.mesh.wire.WireError`
out. No streams, no clock, no trio, so each refusal can be tested on its own. The hop
server (:mod:`shardmesh.mesh.hop_server`) calls it and owns everything stateful:
reserving the session, opening the next hop, running the steps.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Any, Container, Mapping

from ..contract import SamplingParams, StageInfo
from .cbor_plain import clip, quote
from .gateway_ticket import TicketError, check_ticket
from .wire import OPEN, WireError

MAX_ROUTE_HOPS = 64
MAX_SESSION_ID = 64
MAX_PEER_ID = 128  # a base58 peer id is about 52 characters
# What a hop forwards of the open it received (docs/PROTOCOL.md 6.2), besides the route
# (shortened by one hop), nbytes (recomputed) and link (its own wish, not the sender's).
#: The key, in a record's ``limits``, of the prefill step size the node computes best:
#: measured (backends/torch/throughput.py), a hint gateways cut prefills by, not enforced.
PREFILL_STEP = "prefill_step"
FORWARDED_FIELDS = ("t", "session", "model", "gateway", "ticket", "max_length", "sampling", "n_prompt", "cache")

__all__ = [
    "FORWARDED_FIELDS",
    "MAX_PEER_ID",
    "PREFILL_STEP",
    "MAX_ROUTE_HOPS",
    "MAX_SESSION_ID",
    "Limits",
    "OpenRequest",
    "ThisNode",
    "check_gateway",
    "next_open",
    "refuse_oversized_open",
    "session_key",
    "validate_open",
]


@dataclass(frozen=True)
class Limits:
    """What one peer may ask of this node. Published in the record, enforced by the hop server."""

    max_sessions_per_peer: int = 64
    max_sessions_per_gateway: int = 16  # one identity's share, whichever hops its sessions come through
    max_tokens_per_gateway: int = 65536  # the max_length of one identity's sessions here, summed: its KV cache share
    max_tokens_per_step: int = 2048
    idle_timeout: float = 300.0  # seconds a session may wait between steps

    def max_payload(self, hidden_size: int, context_length: int) -> int:
        """The largest frame payload this node reads: a full step of float32 hidden
        states, or a whole history of int64 ids, whichever is larger (plus slack)."""
        per_step = self.max_tokens_per_step * hidden_size * 4
        return max(per_step, context_length * 8) + 4096

    def as_record(self) -> dict[str, int]:
        return {
            "max_sessions_per_peer": self.max_sessions_per_peer,
            "max_sessions_per_gateway": self.max_sessions_per_gateway,
            "max_tokens_per_gateway": self.max_tokens_per_gateway,
            "max_tokens_per_step": self.max_tokens_per_step,
        }


@dataclass(frozen=True)
class ThisNode:
    """What the node that received the ``open`` is, at the moment it arrived.

    ``served`` is the span it serves now (None: no blocks, e.g. a gateway-only node);
    ``accepting`` is False once the node is leaving.
    """

    me: str
    model_id: str
    total_blocks: int
    context_length: int
    served: StageInfo | None
    accepting: bool = True


@dataclass(frozen=True)
class OpenRequest:
    """An accepted ``open``: the session this hop runs, and what it forwards.

    ``route`` is the remaining route as it arrived (this hop first), each hop reduced
    to its ``peer``, ``start`` and ``end``, so the next hop gets exactly the hops it was
    sent and nothing else. ``sampling`` is filled on the last hop only: nobody else
    samples. ``cache``: the gateway lets this hop start the session with a cached
    prefix of the history (docs/PROTOCOL.md 6.8).
    """

    session: str
    gateway: str
    route: list[dict[str, Any]]
    start: int
    end: int
    max_length: int
    prompt_ids: list[int]
    generated_ids: list[int]
    sampling: dict[str, Any]
    cache: bool = False

    @property
    def history(self) -> list[int]:
        return self.prompt_ids + self.generated_ids

    @property
    def is_last(self) -> bool:
        return len(self.route) == 1

    @property
    def key(self) -> str:
        return session_key(self.session, self.start)


def session_key(session: str, start: int) -> str:
    """The local key of a session hop. A route may pass through one peer twice (not
    back to back), so the session id alone does not name the hop: its start does too."""
    return f"{session}@{start}"


def refuse_oversized_open(header: Mapping[str, Any], context_length: int) -> None:
    """Checked from a first frame's header, before its payload is read: an ``open``'s
    history can never exceed the context, so a larger payload is refused unread."""
    if header["t"] == OPEN and header.get("nbytes", 0) > context_length * 8:
        raise WireError("too_large", f"the history exceeds the model's context of {context_length} tokens")


def check_gateway(header: Mapping[str, Any], now: float) -> str:
    """The gateway an ``open`` may be charged to: the one whose ticket it carries
    (:mod:`.gateway_ticket`). Checked before the gateway's sessions are counted or any of
    them reclaimed, so nobody can spend another gateway's share (``forbidden``)."""
    gateway, route = header.get("gateway"), header.get("route")
    if not isinstance(gateway, str) or not 0 < len(gateway) <= MAX_PEER_ID:
        raise WireError("bad_input", "open needs the gateway's peer id")
    if not isinstance(route, list) or not 0 < len(route) <= MAX_ROUTE_HOPS or not all(isinstance(h, dict) for h in route):
        raise WireError("bad_route", f"route must be a list of 1 to {MAX_ROUTE_HOPS} hops")
    try:
        check_ticket(header.get("ticket"), session=header.get("session"), model=header.get("model"), gateway=gateway, route=route, now=now)
    except TicketError as exc:
        raise WireError("forbidden", str(exc)) from None
    return gateway


def validate_open(
    header: Mapping[str, Any],
    payload: bytes,
    node: ThisNode,
    limits: Limits,
    peer_sessions: int,
    open_keys: Container[str],
    gateway_sessions: int = 0,
    gateway_tokens: int = 0,
) -> OpenRequest:
    """The accepted request, or a ``WireError`` naming the first field at fault.

    ``peer_sessions`` is how many sessions the sending peer already has open here,
    ``gateway_sessions`` how many the request's gateway has (through any upstream) and
    ``gateway_tokens`` the sum of their ``max_length``;
    ``open_keys`` holds the :func:`session_key` of every session hop open here. The
    checks run in a fixed order (serving at all, then the header's fields, then this
    peer's share), so a request with several faults always gets the same answer.
    """
    if node.served is None:
        raise WireError("not_serving", "this node serves no blocks")
    if not node.accepting:
        raise WireError("draining", "this node is leaving and accepts no new sessions")
    sid, route, max_length = header.get("session"), header.get("route"), header.get("max_length")
    if not isinstance(sid, str) or not 0 < len(sid) <= MAX_SESSION_ID:
        raise WireError("bad_input", f"session must be a string of 1 to {MAX_SESSION_ID} characters")
    if header.get("model") != node.model_id:
        raise WireError("wrong_model", f"this node serves {node.model_id}, not {quote(header.get('model'))}")
    route = _checked_route(route, node)
    here = route[0]
    if not isinstance(max_length, int) or not 0 < max_length <= node.context_length:
        raise WireError("bad_input", f"max_length must be in [1, {node.context_length}]")
    gateway = header.get("gateway")
    if not isinstance(gateway, str) or not 0 < len(gateway) <= MAX_PEER_ID:
        raise WireError("bad_input", "open needs the gateway's peer id")
    if peer_sessions >= limits.max_sessions_per_peer:
        raise WireError(
            "too_many_sessions", f"peer has {peer_sessions} sessions open here (limit {limits.max_sessions_per_peer})"
        )
    if gateway_sessions >= limits.max_sessions_per_gateway:
        raise WireError(
            "too_many_sessions",
            f"gateway {quote(gateway)} has {gateway_sessions} sessions open here (limit {limits.max_sessions_per_gateway})",
        )
    if gateway_tokens + max_length > limits.max_tokens_per_gateway:
        raise WireError(
            "too_many_sessions",
            f"gateway {quote(gateway)} holds sessions of {gateway_tokens} tokens here; {max_length} more would pass "
            f"its limit of {limits.max_tokens_per_gateway}",
        )
    if session_key(sid, here["start"]) in open_keys:
        raise WireError("bad_input", f"session {sid!r} is already open here")
    cache = header.get("cache", False)
    if not isinstance(cache, bool):
        raise WireError("bad_input", "cache must be true or false")
    prompt: list[int] = []
    generated: list[int] = []
    sampling: dict[str, Any] = {}
    if len(route) == 1:
        prompt, generated = _history(header, payload)
        sampling = _sampling(header)
    elif cache:
        # A middle hop reads the history only to name prefixes. One it cannot read is
        # the last hop's to refuse (the gateway blames that peer); here it means no cache.
        try:
            prompt, generated = _history(header, payload)
        except WireError:
            cache = False
    return OpenRequest(sid, gateway, route, here["start"], here["end"], max_length, prompt, generated, sampling, cache)


def next_open(header: Mapping[str, Any], route: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``open`` this hop sends to the next one, for an ``open`` it accepted.

    ``route`` is the accepted :attr:`OpenRequest.route` (this hop first, each hop only
    its ``peer``, ``start``, ``end``). Only :data:`FORWARDED_FIELDS` are copied:
    whatever else the sender put in the header stays here, unencoded.
    """
    forwarded = {k: header[k] for k in FORWARDED_FIELDS if k in header}
    forwarded["route"] = route[1:]
    return forwarded


def _checked_route(route: Any, node: ThisNode) -> list[dict[str, Any]]:
    """A well-formed route whose first hop this node can serve (``bad_route`` otherwise),
    each hop reduced to the fields the protocol gives it."""
    if not isinstance(route, list) or not 0 < len(route) <= MAX_ROUTE_HOPS:
        raise WireError("bad_route", f"route must be a list of 1 to {MAX_ROUTE_HOPS} hops")
    for hop in route:
        if not (isinstance(hop, dict) and isinstance(hop.get("peer"), str) and isinstance(hop.get("start"), int) and isinstance(hop.get("end"), int)):
            raise WireError("bad_route", "each hop needs peer, start and end")
    route = [{"peer": hop["peer"], "start": hop["start"], "end": hop["end"]} for hop in route]
    for a, b in zip(route, route[1:]):
        if a["end"] != b["start"]:
            raise WireError("bad_route", "the route's hops must be contiguous")
        if a["peer"] == b["peer"]:
            raise WireError("bad_route", "two hops in a row on one peer (they would be one hop)")
    here = route[0]
    info = node.served
    assert info is not None  # validate_open refused a node that serves nothing
    if here["peer"] != node.me:
        raise WireError("bad_route", f"the route's next hop is {quote(here['peer'])}, not this node")
    if not info.start <= here["start"] < here["end"] <= info.end:
        raise WireError("bad_route", f"blocks [{here['start']}, {here['end']}) are not inside this node's [{info.start}, {info.end})")
    if route[-1]["end"] != node.total_blocks:
        raise WireError("bad_route", "the route must end at the model's last block")
    return route


def _history(header: Mapping[str, Any], payload: bytes) -> tuple[list[int], list[int]]:
    """Prompt and generated ids (payload: int64 ids): the last hop's sampler needs them,
    and every hop names cached prefixes by them."""
    n_prompt = header.get("n_prompt", 0)
    if len(payload) % 8 or not isinstance(n_prompt, int) or not 0 <= n_prompt <= len(payload) // 8:
        raise WireError("bad_input", "history payload must be int64 ids with n_prompt <= their count")
    ids = array("q")
    ids.frombytes(payload)
    return list(ids[:n_prompt]), list(ids[n_prompt:])


def _sampling(header: Mapping[str, Any]) -> dict[str, Any]:
    """The sampling parameters as sent, once they are known to be valid. The hop's
    compute checks them again when it builds its sampler (it is reached by other
    callers too); checking here refuses them with the other fields of the open."""
    sampling = header.get("sampling", {})
    try:
        SamplingParams.from_dict(sampling)
    except (TypeError, ValueError) as exc:
        raise WireError("bad_input", f"bad sampling parameters: {clip(str(exc))}") from exc
    return dict(sampling)
