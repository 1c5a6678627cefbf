"""The audit's pure parts: when two answers agree, who is to blame, when to audit, and
what a claimed throughput counts for; then a seeded simulation of a lying peer in a
swarm, run on that very logic (docs/SECURITY.md, "Auditing").

Run with ``-s`` to see the simulation's figures.
"""

from __future__ import annotations

import math
import random

import pytest

from shardmesh.contract import SampledToken
from shardmesh.mesh.answer_check import AUDIT_TOP, TOLERANCE, Answer, agree, suspects
from shardmesh.mesh.audit_policy import MAX_PEERS, AuditPolicy
from shardmesh.placement.claims import SLACK, MeasuredSpeeds, capped_claims
from shardmesh.placement.routing import Hop, find_route
from shardmesh.placement.spans import ServerView

VOCAB = 200


def _logprobs(logits: list[float]) -> list[float]:
    top = max(logits)
    norm = top + math.log(sum(math.exp(x - top) for x in logits))
    return [x - norm for x in logits]


def answer_of(logits: list[float], top: int = AUDIT_TOP, pick: int | None = None) -> SampledToken:
    """What an honest last hop reports for ``logits``: argmax (or ``pick``) and the top list."""
    lp = _logprobs(logits)
    order = sorted(range(len(lp)), key=lambda i: (-lp[i], i))
    token = order[0] if pick is None else pick
    return SampledToken(token, lp[token], tuple((i, lp[i]) for i in order[:top]))


def model_logits(rng: random.Random, scale: float = 2.0) -> list[float]:
    return [rng.gauss(0, scale) for _ in range(VOCAB)]


def jitter(logits: list[float], rng: random.Random, size: float) -> list[float]:
    return [x + rng.uniform(-size, size) for x in logits]


# --------------------------------------------------------------------------- agree


def test_honest_arithmetic_agrees_and_other_weights_do_not() -> None:
    rng = random.Random(1)
    for _ in range(200):
        logits = model_logits(rng)
        a = answer_of(logits)
        assert agree(a, answer_of(jitter(logits, rng, 0.1)), top=AUDIT_TOP, greedy=False)
        assert not agree(a, answer_of(model_logits(rng)), top=AUDIT_TOP, greedy=False)


def test_a_greedy_token_must_be_near_the_others_best() -> None:
    logits = [0.0] * VOCAB
    logits[5], logits[9] = 8.0, 3.0
    honest = answer_of(logits)
    wrong_pick = answer_of(logits, pick=9)  # same distribution, a token far from the best
    assert agree(honest, wrong_pick, top=AUDIT_TOP, greedy=False)
    assert not agree(honest, wrong_pick, top=AUDIT_TOP, greedy=True)
    near = list(logits)
    near[9] = 8.0 - TOLERANCE / 2  # a near-tie: either argmax is honest arithmetic
    assert agree(answer_of(near), answer_of(near, pick=9), top=AUDIT_TOP, greedy=True)


def test_a_token_just_below_the_other_list_is_allowed() -> None:
    logits = [float(-i) * 0.01 for i in range(VOCAB)]  # flat: the cut between 8th and 9th is close
    a = answer_of(logits)
    swapped = list(logits)
    swapped[7], swapped[8] = swapped[8], swapped[7]
    assert agree(a, answer_of(swapped), top=AUDIT_TOP, greedy=True)


@pytest.mark.parametrize("broken", [
    lambda t: SampledToken(t.token_id, t.logprob, t.top_logprobs[:-1]),  # short list
    lambda t: SampledToken(t.token_id, None, t.top_logprobs),  # no logprob
    lambda t: SampledToken(t.token_id, t.logprob, ((0, math.nan),) + t.top_logprobs[1:]),
    lambda t: SampledToken(t.token_id, t.logprob, (t.top_logprobs[0],) * AUDIT_TOP),  # duplicates
    lambda t: SampledToken(t.token_id, t.logprob + 0.5, t.top_logprobs),  # pick listed twice, two values
    lambda t: SampledToken(t.token_id, 3.0, ((t.token_id, 3.0),) + t.top_logprobs[1:]),  # positive
])
def test_a_malformed_answer_agrees_with_nothing(broken) -> None:
    good = answer_of(model_logits(random.Random(3)))
    assert agree(good, good, top=AUDIT_TOP, greedy=True)
    assert not agree(good, broken(good), top=AUDIT_TOP, greedy=False)
    assert not agree(broken(good), good, top=AUDIT_TOP, greedy=False)


# --------------------------------------------------------------------------- suspects


def _answers(*chains: tuple[str, ...]) -> list[Answer]:
    dummy = SampledToken(0)
    return [Answer(frozenset(c), dummy) for c in chains]


def test_three_servers_of_one_range_name_the_liar() -> None:
    answers = _answers(("L",), ("A",), ("B",))
    assert suspects(answers[:2], []) == {"L", "A"}  # two chains: either could lie
    assert suspects(answers, [(1, 2)]) == {"L"}  # A and B agree, L does not


def test_two_servers_per_range_cannot_tell_which_one_lies() -> None:
    # m1 lies; (a1, m2) agrees with (a1, a2); (m1, a2) gives m1's garbage, as (m1, m2) does.
    answers = _answers(("m1", "m2"), ("a1", "a2"), ("a1", "m2"), ("m1", "a2"))
    assert suspects(answers, [(1, 2), (0, 3)]) == {"m1", "a1"}
    # A third server for the first range settles it.
    answers += _answers(("x1", "a2"))
    assert suspects(answers, [(1, 2), (0, 3), (1, 4), (2, 4)]) == {"m1"}


def test_agreeing_chains_have_no_suspect() -> None:
    assert suspects(_answers(("A",), ("B",)), [(0, 1)]) == set()


# --------------------------------------------------------------------------- policy


def test_new_peers_are_shadowed_then_audited_at_the_rate() -> None:
    policy = AuditPolicy(rate=0.0001, shadow=2, rng=random.Random(0))
    assert policy.shadowed({"A"}, 0)  # new: its first token is checked
    assert not policy.shadowed({"A"}, 1)  # later tokens only by spot checks
    policy.passed({"A"})
    assert policy.shadowed({"A"}, 0)
    policy.passed({"A"})
    assert not policy.shadowed({"A"}, 0)  # trusted now
    assert policy.shadowed({"A", "B"}, 0)  # a chain with a new peer
    policy.disputed({"A"})
    assert policy.shadowed({"A"}, 0)
    off = AuditPolicy(rate=0)
    assert not off.shadowed({"A"}, 0) and not off.spot_check()  # --audit-rate 0: off


def test_rate_is_the_share_of_steps_audited() -> None:
    policy = AuditPolicy(rate=0.05, shadow=0, rng=random.Random(4))
    share = sum(policy.spot_check() for _ in range(20_000)) / 20_000
    assert 0.04 < share < 0.06


def test_bans_expire_and_tables_stay_bounded() -> None:
    policy = AuditPolicy(ban_s=100)
    policy.passed({"L"})
    policy.ban("L", now=0)
    assert policy.banned(50) == {"L"} and policy.banned(101) == set()
    assert not policy.trusted("L") and "L" not in policy.passes
    policy.passed(f"p{i}" for i in range(MAX_PEERS + 100))
    assert len(policy.passes) == MAX_PEERS
    for i in range(MAX_PEERS + 100):
        policy.ban(f"b{i}", now=float(i))
    assert len(policy.banned_until) <= MAX_PEERS


# --------------------------------------------------------------------------- claims


def _server(peer: str, throughput: float) -> ServerView:
    return ServerView(peer, 0, 4, throughput, cache_tokens_free=10_000)


def test_a_huge_claim_counts_as_typical_until_measured() -> None:
    servers = [_server("A", 100), _server("B", 120), _server("L", 1e9)]
    capped = {s.peer: s.throughput for s in capped_claims(servers, {})}
    assert capped == {"A": 100, "B": 120, "L": 120}
    route = find_route(capped_claims(servers, {}), 4, origin="G")
    assert route is not None and route[0].peer in ("B", "L")  # L no longer beats everyone alone
    assert find_route(servers, 4, origin="G")[0].peer == "L"  # uncapped, it would


def test_measured_speed_lifts_the_cap() -> None:
    speeds = MeasuredSpeeds()
    speeds.record([Hop("A", 0, 2), Hop("F", 2, 4)], seconds=0.01)  # 2 blocks x 2 hops / 10 ms
    assert speeds.figures() == {"A": 400.0, "F": 400.0}
    speeds.record([Hop("A", 0, 4)], seconds=0.1)  # a slower step does not lower the best
    assert speeds.figures()["A"] == 400.0
    servers = [_server("A", 300), _server("F", 5000), _server("N", 1e9)]
    capped = {s.peer: s.throughput for s in capped_claims(servers, speeds.figures())}
    assert capped == {"A": 300, "F": SLACK * 400, "N": SLACK * 400}


# --------------------------------------------------------------------------- simulation


def _simulate(seed: int, *, lengths: tuple[int, int], sleeper: bool, honest: int = 3, budget: int = 20) -> int | None:
    """Requests through a lying server until an audit bans it (None: not within ``budget``).

    One range, ``honest`` honest servers and one liar, each request routed to a random
    server. Answers are synthetic logits (honest ones jittered as dtype arithmetic is),
    checked with the real :func:`agree`; blame by the real :func:`suspects` and policy,
    with the dispute loop of the gateway: more chains, each avoiding the suspects.
    """
    rng = random.Random(seed)
    policy = AuditPolicy(rng=random.Random(seed + 1))
    servers = [f"h{i}" for i in range(honest)] + ["L"]
    through_liar = 0
    while through_liar < budget:
        main = rng.choice(servers)
        steps = rng.randint(*lengths)
        if main == "L":
            through_liar += 1
        spot_checked = False
        for i in range(steps):
            if not policy.shadowed({main}, i):
                if spot_checked or not policy.spot_check():
                    continue
                spot_checked = True
            logits = model_logits(rng)
            lies = not sleeper or policy.trusted("L")

            def answer(peer: str) -> Answer:
                out = model_logits(rng) if peer == "L" and lies else jitter(logits, rng, 0.05)
                return Answer(frozenset({peer}), answer_of(out))

            answers = [answer(main)]
            for peer in [p for p in servers if p != main][:3]:  # route avoiding the suspects
                answers.append(answer(peer))
                pairs = [(a, b) for a in range(len(answers)) for b in range(a)
                         if agree(answers[a].token, answers[b].token, top=AUDIT_TOP, greedy=True)]
                found = suspects(answers, pairs)
                if len(found) <= 1:
                    break
            if len(answers) == 2 and pairs:
                policy.passed(answers[0].peers ^ answers[1].peers)
            elif len(found) == 1:
                if found == {"L"}:
                    return through_liar
                policy.ban(found.pop(), 0.0)  # an honest peer banned: counted by the test
                return -1
    return None


def test_a_peer_lying_on_every_step_is_caught_at_once() -> None:
    caught = [_simulate(seed, lengths=(1, 64), sleeper=False) for seed in range(100)]
    assert -1 not in caught, "an honest peer was banned"
    within = sum(c is not None and c <= 20 for c in caught)
    print(f"\nliar from the start: caught within 20 of its requests in {within}/100 trials; "
          f"worst {max(c for c in caught if c)} request(s)")
    assert within >= 99


@pytest.mark.parametrize("lengths", [(16, 256), (1, 64), (1, 8)])
def test_a_peer_that_lies_once_trusted(lengths: tuple[int, int]) -> None:
    caught = [_simulate(seed, lengths=lengths, sleeper=True) for seed in range(100)]
    assert -1 not in caught, "an honest peer was banned"
    within = sum(c is not None and c <= 20 for c in caught)
    print(f"\nliar once trusted, answers of {lengths[0]}-{lengths[1]} tokens: caught within 20 "
          f"of its requests in {within}/100 trials")
    if lengths[0] >= 16:
        assert within >= 99
