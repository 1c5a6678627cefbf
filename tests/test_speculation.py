"""Speculative decoding, in one process: prompt lookup, the stage's draft rows and
rewinds, the last hop's check, and whole generations over local chains of 1 to 3
stages, compared with transformers (greedy) and with speculation off (sampled). And
pipelined prefill: its chunk sizes, and its logits against sequential prefill."""

from __future__ import annotations

import math
import random

import pytest
import torch
import trio

from shardmesh.api.generate import GenerationRequest, Generator, TokenEvent
from shardmesh.api.resumable import MIN_PREFILL_CHUNK, PREFILL_CHUNK, prefill_chunk
from shardmesh.api.speculation import MAX_K, PROBE_EVERY, DraftLength, PromptLookup, PromptLookupSource, SpeculationStats
from shardmesh.backends.batcher import StepBatcher
from shardmesh.backends.draft_model import DraftModel
from shardmesh.backends.local_chain import LocalChains
from shardmesh.backends.sampler_state import SamplerState
from shardmesh.backends.torch.sampling import sample
from shardmesh.backends.torch.stage import TorchStage
from shardmesh.backends.torch.tensors import raw_from_tensor, tensor_from_raw
from shardmesh.backends.weights import resolve_local
from shardmesh.contract import MAX_DRAFT_TOKENS, BadInput, ChainFailed, SampledToken, SamplingParams, StepRequest
from shardmesh.mesh.result_tokens import result_tokens
from shardmesh.mesh.wire import Frame
from shardmesh.tools.tiny_model import cached_tiny_model
from shardmesh.tools.reference import Transformers

LAYERS = 4
GREEDY = SamplingParams(temperature=0.0)
# A prompt that repeats itself, so that prompt lookup has something to propose.
PROMPT = [11, 12, 13, 14, 15, 16, 17, 18] * 4 + [11, 12, 13]


def path_of(arch: str):
    return cached_tiny_model(arch, layers=LAYERS, hidden=64)


# -- prompt lookup and the draft length ------------------------------------------------


def brute_force_lookup(history: list[int], k: int) -> list[int]:
    """The same rule, written the slow and obvious way."""
    for n in (3, 2, 1):
        if len(history) <= n:
            continue
        tail = history[-n:]
        for start in range(len(history) - n - 1, -1, -1):
            if history[start : start + n] == tail:
                return history[start + n : start + n + k]
    return []


def test_prompt_lookup_proposes_what_followed_the_most_recent_repeat() -> None:
    lookup = PromptLookup()
    assert lookup.guess([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], 4) == [7, 8, 1, 2]  # the later "1 2 3" wins
    assert PromptLookup().guess([5, 6, 7, 8], 3) == []  # nothing repeats
    assert PromptLookup().guess([4, 4], 5) == [4]  # as much as there is
    assert PromptLookup().guess([1, 2, 3, 1, 2], 0) == []


def test_prompt_lookup_grows_with_its_history_and_agrees_with_the_slow_rule() -> None:
    rng = random.Random(7)
    for _ in range(20):
        history = [rng.randrange(6) for _ in range(rng.randrange(2, 12))]
        lookup = PromptLookup()
        for _ in range(40):
            k = rng.randrange(0, 6)
            assert lookup.guess(history, k) == brute_force_lookup(history, k), history
            history.extend(rng.randrange(6) for _ in range(rng.randrange(1, 4)))


def test_draft_length_grows_on_success_shrinks_on_failure_and_probes_at_none() -> None:
    length = DraftLength()
    start = length.next()
    length.update(start, start)
    assert length.next() == start + 2
    for _ in range(10):
        length.update(length.next(), length.next())
    assert length.next() == MAX_K <= MAX_DRAFT_TOKENS
    for _ in range(20):
        if k := length.next():
            length.update(k, 0)
    assert length.k == 0
    asked = [length.next() for _ in range(3 * PROBE_EVERY)]
    assert asked.count(1) == 3 and set(asked) == {0, 1}  # a one-token probe every PROBE_EVERY steps
    length.update(1, 1)  # a probe kept: proposals are back
    assert length.next() == 2
    length.update(0, 0)  # nothing proposed: nothing learned
    assert length.next() == 2


# -- the stage: draft rows and rewinds ---------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "qwen3_moe", "mixtral"])
def test_draft_rows_are_the_logits_of_one_token_steps_and_a_rewind_forgets(arch: str) -> None:
    stage = TorchStage(resolve_local(str(path_of(arch))), 0, LAYERS, dtype="float32")
    ids = lambda tokens: raw_from_tensor(torch.tensor(tokens))  # noqa: E731
    prompt, proposal = PROMPT[:10], [21, 22, 23, 24]

    # One token per step: the logits after each of the proposal's tokens.
    stage.open("plain", 64)
    stage.step([StepRequest("plain", ids(prompt), 0)])
    plain = [tensor_from_raw(stage.step([StepRequest("plain", ids([t]), len(prompt) + i)])[0]) for i, t in enumerate(proposal)]

    # The same as one step whose last three tokens are drafts: one row per position.
    stage.open("spec", 64)
    stage.step([StepRequest("spec", ids(prompt), 0)])
    [rows] = stage.step([StepRequest("spec", ids(proposal), len(prompt), draft=3)])
    rows = tensor_from_raw(rows)
    assert rows.shape == (4, stage.info.vocab_size)
    torch.testing.assert_close(rows, torch.stack(plain), rtol=1e-4, atol=1e-4)

    # Two drafts rejected: the next step starts after the first accepted one and must
    # see exactly what a session that never saw the rejected ones sees.
    [after_rewind] = stage.step([StepRequest("spec", ids([30]), len(prompt) + 2)])
    assert stage.sessions["spec"].length == len(prompt) + 3
    stage.open("never", 64)
    stage.step([StepRequest("never", ids(prompt + proposal[:2]), 0)])
    [never] = stage.step([StepRequest("never", ids([30]), len(prompt) + 2)])
    torch.testing.assert_close(tensor_from_raw(after_rewind), tensor_from_raw(never), rtol=1e-4, atol=1e-4)


def test_bad_draft_steps_are_refused_and_change_nothing() -> None:
    stage = TorchStage(resolve_local(str(path_of("llama"))), 0, LAYERS, dtype="float32")
    stage.open("s", 64)
    ids = raw_from_tensor(torch.tensor([1, 2, 3]))
    with pytest.raises(BadInput):  # as many drafts as tokens: no token to check them after
        stage.step([StepRequest("s", ids, 0, draft=3)])
    with pytest.raises(BadInput):
        stage.step([StepRequest("s", raw_from_tensor(torch.arange(40)), 0, draft=MAX_DRAFT_TOKENS + 1)])
    with pytest.raises(BadInput):
        stage.step([StepRequest("s", ids, 0, draft=-1)])
    stage.step([StepRequest("s", ids, 0)])
    with pytest.raises(BadInput):  # beyond what the cache holds
        stage.step([StepRequest("s", ids, 4)])
    assert stage.sessions["s"].length == 3


# -- the last hop's check ------------------------------------------------------------------


def test_greedy_check_keeps_the_longest_matching_run_and_adds_its_own() -> None:
    logits = torch.full((4, 10), -5.0)
    for row, best in enumerate([3, 4, 9, 6]):
        logits[row, best] = 5.0
    state = SamplerState(GREEDY, [1, 2])
    drawn = state.run(raw_from_tensor(logits), [3, 4, 5])
    assert [t.token_id for t in drawn] == [3, 4, 9]  # 5 rejected: 9 is the target's own token
    assert state.generated == [3, 4, 9]
    state = SamplerState(GREEDY, [1, 2])
    assert [t.token_id for t in state.run(raw_from_tensor(logits), [3, 4, 9])] == [3, 4, 9, 6]  # all kept, one more


def test_sampled_check_draws_what_plain_sampling_draws_and_keeps_the_distribution() -> None:
    """For 3,000 seeds, one draft checked against a small vocabulary: the first token
    drawn is, seed for seed, the token sampling without speculation draws; over the
    seeds its frequencies fit the target's probabilities (chi-square, 7 degrees of
    freedom, p > 0.001), and the draft is kept as often as the target would draw it."""
    torch.manual_seed(0)
    logits = torch.randn(2, 8) * 1.5
    probs = torch.softmax(logits[0], dim=-1)
    draft = int(torch.argmax(probs))  # a draft model's greedy guess
    counts = [0] * 8
    kept = 0
    seeds = 3000
    for seed in range(seeds):
        params = SamplingParams(temperature=1.0, seed=seed)
        first = SamplerState(params, [0]).run(raw_from_tensor(logits), [draft])[0].token_id
        assert first == sample(logits[0], params, [0], []).token_id
        counts[first] += 1
        kept += first == draft
    chi2 = sum((c - seeds * float(p)) ** 2 / (seeds * float(p)) for c, p in zip(counts, probs))
    assert chi2 < 24.32, (chi2, counts, probs)  # the 0.999 quantile of chi-square with 7 degrees
    p_draft = float(probs[draft])
    assert abs(kept / seeds - p_draft) < 4 * math.sqrt(p_draft * (1 - p_draft) / seeds)


# -- what the gateway believes of a last hop's result ---------------------------------


def result(**fields) -> Frame:
    return Frame({"t": "result", "session": "s", "position": 9, "token": 5, "logprob": None, "top": [], **fields})


def test_a_result_may_only_accept_what_was_drafted() -> None:
    got = result_tokens(result(more=[[6, None, []], [8, -0.5, [[8, -0.5]]]]), "last", 9, [5, 6, 7])
    assert [(t.token_id, t.logprob) for t in got] == [(5, None), (6, None), (8, -0.5)]
    assert [t.token_id for t in result_tokens(result(), "last", 9, [4, 6])] == [5]  # the first draft rejected
    for bad in (
        result(more=[[6, None, []], [7, None, []], [1, None, []], [2, None, []]]),  # more than drafted + 1
        result(more=[[9, None, []], [1, None, []]]),  # accepted 9 where 6 was drafted
        result(more=[[6, None]]),  # malformed
        result(more=[["6", None, []]]),
        result(more="6"),
    ):
        with pytest.raises(ChainFailed) as caught:
            result_tokens(bad, "last", 9, [5, 6, 7])
        assert caught.value.peer == "last" and caught.value.code == "bad_frame"


# -- whole generations over local chains -----------------------------------------------


def run_generations(path, cuts, requests: list[GenerationRequest], drafts=True) -> tuple[list[list[int]], SpeculationStats]:
    batchers = [StepBatcher(TorchStage(resolve_local(str(path)), a, b, dtype="float32")) for a, b in zip(cuts, cuts[1:])]
    reference = Transformers(path)
    generator = Generator("tiny", reference.tokenizer, 2048, LocalChains(batchers), frozenset(reference.eos),
                          drafts=PromptLookupSource() if drafts else None)

    async def main() -> list[list[int]]:
        async with trio.open_nursery() as nursery:
            for b in batchers:
                await nursery.start(b.run)
            out = []
            for req in requests:
                out.append([e.token_id async for e in generator.stream(req) if isinstance(e, TokenEvent)])
            nursery.cancel_scope.cancel()
        for b in batchers:
            assert b.stage.sessions == {}, "every session closed"
        return out

    return trio.run(main), generator.speculation


@pytest.mark.parametrize("arch,cuts", [("llama", (0, 4)), ("llama", (0, 2, 4)), ("qwen3_moe", (0, 1, 3, 4)), ("mixtral", (0, 2, 4))])
def test_greedy_with_prompt_lookup_equals_transformers(arch: str, cuts: tuple[int, ...]) -> None:
    path = path_of(arch)
    reference = Transformers(path)
    prompts = [PROMPT, [40, 41, 42, 43] * 6, reference.prompt_ids("one two three one two three one two")]
    [got, stats] = run_generations(path, cuts, [GenerationRequest(p, 40, GREEDY) for p in prompts])
    for prompt, tokens in zip(prompts, got):
        assert tokens == reference.greedy(prompt, 40).token_ids
    assert stats.accepted > 0 and stats.tokens_per_trip > 1, stats  # speculation did happen


def test_a_seed_gives_the_same_tokens_with_speculation_on_or_off() -> None:
    path = path_of("qwen3")
    requests = [GenerationRequest(PROMPT, 30, SamplingParams(temperature=0.7, top_k=20, seed=s, repetition_penalty=1.1)) for s in range(4)]
    on, stats = run_generations(path, (0, 2, 4), requests)
    again, _ = run_generations(path, (0, 2, 4), requests)
    off, _ = run_generations(path, (0, 2, 4), requests, drafts=False)
    assert on == again == off
    assert stats.proposed > 0


def test_speculative_false_proposes_nothing() -> None:
    _, stats = run_generations(path_of("llama"), (0, 4), [GenerationRequest(PROMPT, 20, GREEDY, speculative=False)])
    assert stats.proposed == 0 and stats.tokens == stats.trips


def generate_with_draft_model(cuts: tuple[int, ...], tokens: int, **drafter_stage) -> tuple[list[int], list[int], Generator]:
    """A greedy answer over local stages split at ``cuts``, drafted by the same model
    in a stage of its own (``drafter_stage``: its keyword arguments); the answer, the
    transformers reference and the generator (its counters)."""
    path = path_of("llama")
    reference = Transformers(path)
    target = [StepBatcher(TorchStage(resolve_local(str(path)), a, b, dtype="float32")) for a, b in zip(cuts, cuts[1:])]
    drafter = StepBatcher(TorchStage(resolve_local(str(path)), 0, LAYERS, dtype="float32", **drafter_stage))
    generator = Generator("tiny", reference.tokenizer, 2048, LocalChains(target), frozenset(), drafts=DraftModel(drafter, 2048))
    prompt = reference.prompt_ids("Tell me a long story about foxes.")

    async def main() -> list[int]:
        async with trio.open_nursery() as nursery:
            for b in (*target, drafter):
                await nursery.start(b.run)
            got = [e.token_id async for e in generator.stream(GenerationRequest(prompt, tokens, GREEDY)) if isinstance(e, TokenEvent)]
            nursery.cancel_scope.cancel()
        assert drafter.stage.sessions == {}, "the draft session is closed with the answer"
        return got

    return trio.run(main), reference.greedy_forwards(prompt, tokens), generator


def test_a_draft_model_that_is_the_target_is_always_right() -> None:
    """``--draft-model`` set to the target itself: the upper bound, every draft kept,
    and the answer still exactly transformers' greedy one."""
    got, expected, generator = generate_with_draft_model((0, 2, 4), 60)
    assert got == expected
    stats = generator.speculation
    assert stats.acceptance == 1.0 and stats.tokens_per_trip > 4, stats


# -- pipelined prefill -------------------------------------------------------------------


def test_prefill_chunks_fill_the_pipe_within_bounds() -> None:
    assert prefill_chunk(2048, 1) == PREFILL_CHUNK  # one process: nothing to overlap
    assert prefill_chunk(2048, 3) == 384  # 6 chunks through 3 hops
    assert prefill_chunk(100, 3) == MIN_PREFILL_CHUNK
    assert prefill_chunk(100_000, 3) == PREFILL_CHUNK
    assert prefill_chunk(2048, 8) == 128
    # What the chain's parts measured caps the step, and one process takes all of it.
    assert prefill_chunk(2048, 1, 2048) == 2048
    assert prefill_chunk(2048, 3, 256) == 256
    assert prefill_chunk(100_000, 3, 1024) == 1024
    assert prefill_chunk(2048, 8, 2048) == 128


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "qwen3_moe", "mixtral"])
def test_pipelined_prefill_gives_exactly_the_logits_of_sequential_prefill(arch: str) -> None:
    """Three stages, a prompt in four chunks: computed as a pipeline (stage 1 on chunk
    n + 1 while stage 2 is on chunk n, a wavefront) or chunk after chunk, the logits
    are the same to the bit."""
    files = resolve_local(str(path_of(arch)))
    prompt = torch.randint(3, 200, (320,), generator=torch.Generator().manual_seed(3)).tolist()
    chunks = [prompt[i : i + 80] for i in range(0, len(prompt), 80)]

    def prefill(pipelined: bool) -> torch.Tensor:
        stages = [TorchStage(files, a, b, dtype="float32") for a, b in ((0, 1), (1, 3), (3, 4))]
        for stage in stages:
            stage.open("s", 512)
        outputs: dict[tuple[int, int], object] = {}

        def run(stage: int, chunk: int) -> None:
            x = raw_from_tensor(torch.tensor(chunks[chunk])) if stage == 0 else outputs[stage - 1, chunk]
            [outputs[stage, chunk]] = stages[stage].step([StepRequest("s", x, 80 * chunk)])

        if pipelined:
            for wave in range(len(chunks) + len(stages) - 1):
                for stage in reversed(range(len(stages))):  # later stages first, as the hops of a pipe would
                    if 0 <= wave - stage < len(chunks):
                        run(stage, wave - stage)
        else:
            for chunk in range(len(chunks)):
                for stage in range(len(stages)):
                    run(stage, chunk)
        return tensor_from_raw(outputs[len(stages) - 1, len(chunks) - 1])

    assert torch.equal(prefill(True), prefill(False))


# -- audits see every token of a speculative step ----------------------------------------


class _TruthChains:
    """A stand-in swarm for the auditor: one-hop routes to ``peers`` in order, whose
    last hop answers ``truth(history)`` with sure logprobs; the peer ``liar`` accepts
    every draft and makes up the token after them, and answers plain steps honestly."""

    VOCAB = 50

    def __init__(self, nursery, peers: list[str], liar: str, banned) -> None:
        self.nursery, self.peers, self.liar, self.banned = nursery, peers, liar, banned

    @classmethod
    def truth(cls, history: list[int]) -> int:
        return (sum(history) * 7 + len(history)) % cls.VOCAB

    @classmethod
    def answer(cls, token: int) -> SampledToken:
        others = [t for t in range(cls.VOCAB) if t != token][:19]
        return SampledToken(token, 0.0, ((token, 0.0), *((t, -20.0) for t in others)))

    def available(self) -> bool:
        return True

    def find_route(self, tokens: int, avoid: frozenset[str] = frozenset()):
        from shardmesh.placement.routing import Hop

        return next(([Hop(p, 0, 1)] for p in self.peers if p not in avoid | self.banned()), None)

    def chain(self, session_id, sampling, prompt_ids, generated, avoid=frozenset(), *, route=None):
        outer = self

        class Chain:
            parallel_stages = 1
            prefill_step = None

            def __init__(self) -> None:
                self.session_id, self.route = session_id, route or outer.find_route(0, avoid)
                self.history: list[int] = []

            async def open(self, max_length: int) -> int:
                return 0

            async def step(self, token_ids, position, want_token):
                self.history[position:] = token_ids
                return outer.answer(outer.truth(self.history)) if want_token else None

            async def verify(self, token_ids, position, draft):
                await trio.sleep(0)  # a real chain waits for its answer: spot checks run meanwhile
                self.history[position:] = token_ids[: len(token_ids) - draft]
                drafts, drawn = token_ids[len(token_ids) - draft :], []
                for d in drafts:
                    drawn.append(outer.truth(self.history))
                    if self.route[0].peer == outer.liar:
                        drawn[-1] = d  # accepted, right or not
                    if drawn[-1] != d:
                        return [outer.answer(t) for t in drawn]
                    self.history.append(d)
                lie = (outer.truth(self.history) + 1) % outer.VOCAB if self.route[0].peer == outer.liar else None
                drawn.append(outer.truth(self.history) if lie is None else lie)
                return [outer.answer(t) for t in drawn]

            async def close(self, fed=()) -> None:
                return None

        return Chain()


def test_a_last_hop_that_lies_only_after_accepted_drafts_is_caught_by_spot_checks() -> None:
    """The liar answers every plain step honestly and, in speculative steps, accepts
    wrong drafts and makes up the token after them. Spot checks look at every token
    of a speculative step, so it is caught and banned within a few answers (had they
    looked only at each step's first token, never)."""
    from shardmesh.mesh.audit_policy import AuditPolicy
    from shardmesh.mesh.audited_chains import AuditedChains
    from shardmesh.placement.claims import MeasuredSpeeds

    policy = AuditPolicy(rate=0.2, rng=random.Random(5))

    async def main() -> int:
        async with trio.open_nursery() as nursery:
            swarm = _TruthChains(nursery, ["liar", "h1", "h2"], "liar", lambda: policy.banned(0.0))
            auditor = AuditedChains(swarm, policy, MeasuredSpeeds(), "me", lambda: 0.0)
            for answers in range(1, 50):
                chain = auditor.chain(f"s{answers}", GREEDY, [1, 2, 3], [])
                await chain.open(64)
                history = [1, 2, 3]
                try:
                    history.append((await chain.step(history, 0, True)).token_id)
                    for _ in range(20):
                        # Drafts: the truth, then a wrong one (which the liar accepts).
                        good = _TruthChains.truth(history)
                        run = await chain.verify([history[-1], good, (good + 3) % 50], len(history) - 1, 2)
                        history.extend(t.token_id for t in run)
                except ChainFailed as exc:  # caught mid-answer: the request would replay without it
                    assert exc.peer == "liar"
                finally:
                    await chain.close()
                await trio.sleep(0.01)  # let a spot check still running finish
                if "liar" in policy.banned(0.0):
                    nursery.cancel_scope.cancel()
                    return answers
            raise AssertionError("the liar was never caught")

    assert trio.run(main) <= 5


def test_a_draft_model_that_runs_out_of_cache_only_stops_drafting() -> None:
    """The draft model's KV cache too small for a session: no drafts, the same answer."""
    got, expected, generator = generate_with_draft_model((0, 4), 20, cache_budget_bytes=1024)
    assert got == expected
    assert generator.speculation.proposed == 0
