"""The checks a hop makes on an ``open`` (shardmesh/mesh/open_request.py), without streams.

Every hostile field is refused with the code docs/PROTOCOL.md 6.3 gives it, and a
well-formed request comes back as plain data. tests/test_hop_server.py sends the same
kinds of ``open`` over real libp2p streams and checks the node keeps serving.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest

from shardmesh.contract import StageInfo
from shardmesh.mesh.open_request import (
    MAX_ROUTE_HOPS,
    MAX_SESSION_ID,
    Limits,
    OpenRequest,
    ThisNode,
    refuse_oversized_open,
    session_key,
    validate_open,
)
from shardmesh.mesh.wire import WireError

ME = "12D3KooWthisnode"
NEXT = "12D3KooWnexthop"
GATEWAY = "12D3KooWgateway"
MODEL = "tiny@0123456789ab"
TOTAL = 4
CONTEXT = 2048
LIMITS = Limits(max_sessions_per_peer=4)


def info(start: int = 0, end: int = TOTAL, total: int = TOTAL) -> StageInfo:
    return StageInfo(MODEL, start, end, total, hidden_size=64, vocab_size=512, dtype="float32", device="cpu", backend="torch")


def node(served: StageInfo | None = None, accepting: bool = True, total: int = TOTAL) -> ThisNode:
    return ThisNode(ME, MODEL, total, CONTEXT, served if served is not None else info(total=total), accepting)


def header(**overrides: Any) -> dict[str, Any]:
    """A last-hop ``open`` this node accepts; ``overrides`` make it hostile."""
    h: dict[str, Any] = {
        "t": "open",
        "session": "s1",
        "model": MODEL,
        "gateway": GATEWAY,
        "route": [{"peer": ME, "start": 0, "end": TOTAL}],
        "max_length": 64,
        "sampling": {"temperature": 0.0},
        "n_prompt": 2,
    }
    h.update(overrides)
    return h


def ids(*values: int) -> bytes:
    return struct.pack(f"<{len(values)}q", *values)


HISTORY = ids(1, 17, 42)  # prompt [1, 17], one generated token 42


def accept(h: dict[str, Any], payload: bytes = HISTORY, *, this: ThisNode | None = None,
           peer_sessions: int = 0, open_keys: frozenset[str] = frozenset(), gateway_sessions: int = 0) -> OpenRequest:
    return validate_open(h, payload, this or node(), LIMITS, peer_sessions, open_keys, gateway_sessions)


def refused(h: dict[str, Any], payload: bytes = HISTORY, **kwargs: Any) -> WireError:
    with pytest.raises(WireError) as caught:
        accept(h, payload, **kwargs)
    assert caught.value.message, "a refusal says why"
    assert caught.value.peer is None, "this node refuses in its own name"
    return caught.value


# ---- accepted ------------------------------------------------------------------------


def test_a_last_hop_open_comes_back_as_plain_data() -> None:
    req = accept(header())
    assert req == OpenRequest(
        session="s1", gateway=GATEWAY, route=[{"peer": ME, "start": 0, "end": TOTAL}], start=0, end=TOTAL,
        max_length=64, prompt_ids=[1, 17], generated_ids=[42], sampling={"temperature": 0.0},
    )
    assert req.is_last and req.key == session_key("s1", 0) == "s1@0"


def test_a_middle_hop_keeps_the_route_to_forward_and_does_not_read_history_or_sampling() -> None:
    """Only the last hop samples: a middle hop forwards history and sampling unread, so
    their faults are the last hop's to report (the gateway blames that peer)."""
    route = [{"peer": ME, "start": 1, "end": 3}, {"peer": NEXT, "start": 3, "end": TOTAL}]
    h = header(route=route, sampling={"temperature": "hot"}, n_prompt=99)
    req = accept(h, b"\1\2\3", this=node(info(1, 3)))
    assert not req.is_last and req.route == route and (req.start, req.end) == (1, 3)
    assert req.prompt_ids == req.generated_ids == [] and req.sampling == {}
    assert req.key == "s1@1"


def test_the_edges_of_every_range_are_accepted() -> None:
    assert accept(header(session="x" * MAX_SESSION_ID)).session == "x" * MAX_SESSION_ID
    assert accept(header(max_length=CONTEXT)).max_length == CONTEXT
    assert accept(header(), peer_sessions=LIMITS.max_sessions_per_peer - 1).session == "s1"
    assert accept(header(n_prompt=3)).generated_ids == []
    assert accept(header(n_prompt=0), b"").prompt_ids == []
    assert accept(header(sampling={})).sampling == {}
    # The longest route: MAX_ROUTE_HOPS one-block hops, alternating between two peers.
    route = [{"peer": (ME, NEXT)[i % 2], "start": i, "end": i + 1} for i in range(MAX_ROUTE_HOPS)]
    req = accept(header(route=route), this=node(info(0, 1, MAX_ROUTE_HOPS), total=MAX_ROUTE_HOPS))
    assert len(req.route) == MAX_ROUTE_HOPS and (req.start, req.end) == (0, 1)


def test_another_sessions_key_or_another_start_is_no_duplicate() -> None:
    assert accept(header(), open_keys=frozenset({"s2@0", "s1@2"})).key == "s1@0"


# ---- refused: the node ---------------------------------------------------------------


def test_a_node_that_serves_nothing_refuses_every_open() -> None:
    gateway_only = ThisNode(ME, MODEL, TOTAL, CONTEXT, None)
    assert refused(header(), this=gateway_only).code == "not_serving"


def test_a_leaving_node_refuses_new_sessions() -> None:
    assert refused(header(), this=node(accepting=False)).code == "draining"


def test_too_many_sessions_from_one_peer() -> None:
    err = refused(header(), peer_sessions=LIMITS.max_sessions_per_peer)
    assert err.code == "too_many_sessions" and str(LIMITS.max_sessions_per_peer) in err.message


def test_too_many_sessions_from_one_gateway_whatever_the_upstream() -> None:
    assert accept(header(), gateway_sessions=LIMITS.max_sessions_per_gateway - 1).session == "s1"
    err = refused(header(), gateway_sessions=LIMITS.max_sessions_per_gateway)
    assert err.code == "too_many_sessions" and "gateway" in err.message


def test_the_gateway_must_look_like_a_peer_id() -> None:
    for gateway in ("", "x" * 129, 7, None):
        assert refused(header(gateway=gateway)).code == "bad_input"


def test_a_session_already_open_here() -> None:
    err = refused(header(), open_keys=frozenset({"s1@0"}))
    assert err.code == "bad_input" and "already open" in err.message


# ---- refused: the header's fields ----------------------------------------------------


@pytest.mark.parametrize("session", [None, 7, "", "x" * (MAX_SESSION_ID + 1), ["s1"]])
def test_bad_session_ids(session: Any) -> None:
    h = header(session=session) if session is not None else {k: v for k, v in header().items() if k != "session"}
    assert refused(h).code == "bad_input"


@pytest.mark.parametrize("model", ["other@123", None, 5])
def test_another_model(model: Any) -> None:
    err = refused(header(model=model))
    assert err.code == "wrong_model" and MODEL in err.message


def hop(peer: str = ME, start: Any = 0, end: Any = TOTAL) -> dict[str, Any]:
    return {"peer": peer, "start": start, "end": end}


@pytest.mark.parametrize(
    "route, why",
    [
        (None, "missing"),
        ({"peer": ME, "start": 0, "end": TOTAL}, "a map, not a list"),
        ([], "empty"),
        ([hop(), "12D3KooWnexthop"], "a hop that is not a map"),
        ([{"start": 0, "end": TOTAL}], "a hop without a peer"),
        ([hop(peer=7)], "a peer that is not text"),
        ([hop(start="0")], "a start that is not an integer"),
        ([{"peer": ME, "start": 0}], "a hop without an end"),
        ([hop(end=2), hop(NEXT, 3, TOTAL)], "a gap between hops"),
        ([hop(end=2), hop(ME, 2, TOTAL)], "two hops in a row on one peer"),
        ([hop(NEXT)], "a first hop that is another peer"),
        ([hop(start=2, end=2)], "an empty span"),
        ([hop(start=3, end=2), hop(NEXT, 2, TOTAL)], "a span that runs backwards"),
        ([hop(start=-1)], "blocks before the node's span"),
        ([hop(end=2)], "not ending at the model's last block"),
    ],
)
def test_bad_routes(route: Any, why: str) -> None:
    h = header(route=route) if route is not None else {k: v for k, v in header().items() if k != "route"}
    assert refused(h).code == "bad_route", why


def test_blocks_this_node_does_not_serve() -> None:
    err = refused(header(), this=node(info(0, 2)))  # the route asks for [0, 4)
    assert err.code == "bad_route" and "[0, 2)" in err.message


def test_a_route_one_hop_too_long() -> None:
    total = MAX_ROUTE_HOPS + 1
    route = [{"peer": (ME, NEXT)[i % 2], "start": i, "end": i + 1} for i in range(total)]
    err = refused(header(route=route), this=node(info(0, 1, total), total=total))
    assert err.code == "bad_route" and str(MAX_ROUTE_HOPS) in err.message


@pytest.mark.parametrize("max_length", [None, 0, -1, CONTEXT + 1, "64", 64.0])
def test_bad_max_length(max_length: Any) -> None:
    h = header(max_length=max_length) if max_length is not None else {k: v for k, v in header().items() if k != "max_length"}
    err = refused(h)
    assert err.code == "bad_input" and "max_length" in err.message


@pytest.mark.parametrize("gateway", [None, 42, b"12D3KooWgateway"])
def test_bad_gateway(gateway: Any) -> None:
    h = header(gateway=gateway) if gateway is not None else {k: v for k, v in header().items() if k != "gateway"}
    err = refused(h)
    assert err.code == "bad_input" and "gateway" in err.message


@pytest.mark.parametrize(
    "n_prompt, payload, why",
    [
        (2, HISTORY[:-1], "a payload that is not whole int64 ids"),
        (4, HISTORY, "a prompt longer than the history"),
        (-1, HISTORY, "a negative prompt length"),
        ("2", HISTORY, "a prompt length that is not an integer"),
        (None, HISTORY + b"\0", "a payload that is not whole int64 ids, without n_prompt"),
    ],
)
def test_bad_history_on_the_last_hop(n_prompt: Any, payload: bytes, why: str) -> None:
    h = header(n_prompt=n_prompt) if n_prompt is not None else {k: v for k, v in header().items() if k != "n_prompt"}
    err = refused(h, payload)
    assert err.code == "bad_input" and "history" in err.message, why


@pytest.mark.parametrize(
    "sampling",
    [
        {"temperature": "hot"},
        {"temperature": 7.0},
        {"top_k": 1.5},
        {"logprobs": 1},
        {"bogus": 1},
        ["temperature", 0.0],
        "greedy",
    ],
)
def test_bad_sampling_on_the_last_hop(sampling: Any) -> None:
    err = refused(header(sampling=sampling))
    assert err.code == "bad_input" and err.message.startswith("bad sampling parameters: ")


def test_the_first_fault_in_a_fixed_order_is_the_one_reported() -> None:
    """Serving before fields, fields before this peer's share, history last."""
    everything_wrong = header(session="", model="other@1", route=[], max_length=0, gateway=None, sampling={"bogus": 1})
    assert refused(everything_wrong, this=node(accepting=False)).code == "draining"
    assert refused(everything_wrong).code == "bad_input"  # the session id comes first
    assert refused(header(model="other@1", route=[])).code == "wrong_model"
    assert refused(header(route=[], max_length=0)).code == "bad_route"
    full_and_bad = header(sampling={"bogus": 1})
    assert refused(full_and_bad, peer_sessions=LIMITS.max_sessions_per_peer).code == "too_many_sessions"


# ---- the payload limit, checked from the header alone ---------------------------------


def test_an_open_payload_over_the_context_is_refused_unread() -> None:
    refuse_oversized_open({"t": "open", "nbytes": CONTEXT * 8}, CONTEXT)  # a full context fits
    refuse_oversized_open({"t": "open"}, CONTEXT)  # no payload at all
    with pytest.raises(WireError) as caught:
        refuse_oversized_open({"t": "open", "nbytes": CONTEXT * 8 + 1}, CONTEXT)
    assert caught.value.code == "too_large" and str(CONTEXT) in caught.value.message
    # Only an open carries a history: other first frames are left to their own limits.
    refuse_oversized_open({"t": "attach", "nbytes": CONTEXT * 8 + 1}, CONTEXT)


def test_the_largest_payload_a_node_reads() -> None:
    """A whole step of float32 hidden states, or a whole history, whichever is larger."""
    limits = Limits(max_tokens_per_step=64)
    assert limits.max_payload(hidden_size=64, context_length=2048) == 2048 * 8 + 4096
    assert limits.max_payload(hidden_size=1024, context_length=2048) == 64 * 1024 * 4 + 4096


# --- tickets: whose share an open is charged to (mesh/gateway_ticket.py) --------------------


def test_a_ticket_binds_the_gateway_session_model_and_route_and_expires() -> None:
    from libp2p.crypto.ed25519 import create_new_key_pair

    from shardmesh.mesh.gateway_ticket import CLOCK_SKEW, MAX_TICKET_BYTES, TICKET_LIFETIME, TicketIssuer
    from shardmesh.mesh.host import peer_id_of
    from shardmesh.mesh.open_request import check_gateway

    key = create_new_key_pair()
    gateway = peer_id_of(key).to_base58()
    issuer = TicketIssuer(gateway, key)
    now = 1_800_000_000.0
    whole = [{"peer": "12D3KooWfirst", "start": 0, "end": 1}, {"peer": ME, "start": 1, "end": 3}, {"peer": NEXT, "start": 3, "end": 4}]
    signed = issuer.sign_open(header(gateway=gateway, route=whole), now)
    # A middle hop receives the route from itself on, with the ticket for the whole route.
    assert check_gateway({**signed, "route": whole[1:]}, now + 5) == gateway
    assert check_gateway({**signed, "route": whole[2:]}, now + TICKET_LIFETIME) == gateway

    def refused(h: dict[str, Any], at: float = now) -> str:
        with pytest.raises(WireError) as caught:
            check_gateway(h, at)
        return f"{caught.value.code}: {caught.value.message}"

    assert refused({**signed, "route": [whole[0], {"peer": ME, "start": 1, "end": 4}]}) == "forbidden: the ticket was signed for another route"
    assert refused({**signed, "route": [{"peer": ME, "start": 1, "end": 4}]}).endswith("another route")
    assert refused({**signed, "session": "s2"}).startswith("forbidden: ticket is for session")
    assert refused({**signed, "model": "other@0123456789ab"}).startswith("forbidden: ticket is for model")
    assert refused(signed, now + TICKET_LIFETIME + 2).startswith("forbidden: ticket expired")
    assert refused(signed, now - CLOCK_SKEW - 2).endswith("in the future (is a clock wrong?)")
    assert refused({**signed, "ticket": signed["ticket"] + b"\0"}).startswith("forbidden: ticket is not plain CBOR")
    assert refused({**signed, "ticket": b"\0" * (MAX_TICKET_BYTES + 1)}).startswith("forbidden: ticket of")
    assert refused({k: v for k, v in signed.items() if k != "ticket"}) == "forbidden: open needs a ticket signed by its gateway"
    other = create_new_key_pair()
    impostor = TicketIssuer(gateway, other).sign_open(header(gateway=gateway, route=whole), now)
    assert refused({**impostor, "route": whole[1:]}).startswith("forbidden: ticket is not signed by gateway")
    # The gateway field and the route are checked before the ticket.
    assert refused({**signed, "gateway": 7}) == "bad_input: open needs the gateway's peer id"
    assert refused({**signed, "route": "everywhere"}).startswith("bad_route: ")


def test_a_gateway_s_sessions_share_a_bounded_number_of_tokens_here() -> None:
    limits = Limits(max_tokens_per_gateway=1000)
    accepted = validate_open(header(max_length=400), ids(1, 2), node(), limits, 0, (), gateway_sessions=1, gateway_tokens=600)
    assert accepted.max_length == 400
    with pytest.raises(WireError) as caught:
        validate_open(header(max_length=401), ids(1, 2), node(), limits, 0, (), gateway_sessions=1, gateway_tokens=600)
    assert caught.value.code == "too_many_sessions" and "600 tokens" in caught.value.message
    assert limits.as_record()["max_tokens_per_gateway"] == 1000


def test_one_gateway_opens_at_a_bounded_rate_and_others_are_not_slowed() -> None:
    from shardmesh.mesh.open_rate import OpenRate

    rate = OpenRate(rate=2.0, burst=3, max_identities=2)
    assert [rate.allow("g", 0.0) for _ in range(4)] == [True, True, True, False]
    assert rate.allow("h", 0.0)  # another identity has its own bucket
    assert not rate.allow("g", 0.4) and rate.allow("g", 0.6)  # refills at 2 per second
    assert rate.allow("i", 1.0) and rate.allow("j", 1.0)  # past 2 identities the least recent goes...
    assert [rate.allow("g", 1.0) for _ in range(3)] == [True, True, True]  # ...and comes back with a full bucket
