"""Failover mid-generation: a chain that breaks is replaced and the history replayed.

The chains here are real local stages; what is injected is only the failure (a hop
"dies" at a chosen step, raising what a broken remote chain raises). The answer must
be exactly the one an unbroken chain gives, greedy or seeded.
"""

from __future__ import annotations

import time

import pytest
import trio
from transformers import AutoTokenizer

from shardmesh.api.generate import Finished, GenerationRequest, Generator
from shardmesh.contract import ModelUnavailable
from shardmesh.api import resumable
from shardmesh.api.resumable import ResumableChain
from shardmesh.placement.spans import Repair
from shardmesh.backends.local_chain import LocalChains
from shardmesh.backends.batcher import StepBatcher
from shardmesh.contract import SamplingParams
from shardmesh.tools.tiny_model import cached_tiny_model
from shardmesh.backends.torch.stage import TorchStage
from shardmesh.backends.weights import resolve_local
from shardmesh.contract import ChainFailed, NoRoute

LAYERS = 4


@pytest.fixture(scope="module")
def model_path():
    return cached_tiny_model("llama", layers=LAYERS, hidden=64)


class BreakingChains:
    """Local chains whose steps fail on the given step numbers (counted over all
    chains), as a chain whose hop died would; records every chain it hands out."""

    def __init__(self, inner: LocalChains, fail_at: set[int], *, no_route_for: int = 0) -> None:
        self.inner = inner
        self.fail_at = fail_at
        self.no_route_for = no_route_for  # open attempts answered with NoRoute first
        self.steps = 0
        self.opened: list[tuple[str, list[int]]] = []  # (session id, generated so far) per chain
        self.avoided: list[frozenset[str]] = []  # the peers each new chain was told to avoid

    def available(self) -> bool:
        return True

    def chain(self, session_id, sampling, prompt_ids, generated, avoid=frozenset()):
        outer = self
        self.avoided.append(avoid)
        real = self.inner.chain(session_id, sampling, prompt_ids, generated, avoid)

        class Breaking:
            parallel_stages = 1
            prefill_step = None

            async def open(self, max_length):
                if outer.no_route_for > 0:
                    outer.no_route_for -= 1
                    raise NoRoute("nobody serves block 2 right now")
                outer.opened.append((session_id, list(generated)))
                return await real.open(max_length)

            async def step(self, token_ids, position, want_token):
                outer.steps += 1
                if outer.steps in outer.fail_at:
                    raise ChainFailed("peer-b", "peer_lost", "the second hop's stream ended")
                return await real.step(token_ids, position, want_token)

            async def close(self, fed=()):
                await real.close(fed)

        return Breaking()


def generate(model_path, sampling, fail_at=(), no_route_for=0, wait=5.0, n=16, repair=None):
    batchers = [StepBatcher(TorchStage(resolve_local(str(model_path)), a, b)) for a, b in ((0, 2), (2, LAYERS))]
    chains = BreakingChains(LocalChains(batchers), set(fail_at), no_route_for=no_route_for)
    generator = Generator("tiny", AutoTokenizer.from_pretrained(model_path), 2048, chains, frozenset(), route_wait=wait, repair=repair)

    async def main():
        async with trio.open_nursery() as nursery:
            for r in batchers:
                await nursery.start(r.run)
            try:
                events = [e async for e in generator.stream(GenerationRequest([5, 6, 7, 8, 9], n, sampling))]
            except ModelUnavailable as exc:
                events = exc  # raised below, outside the nursery's exception group
            nursery.cancel_scope.cancel()
        return events

    events = trio.run(main)
    if isinstance(events, ModelUnavailable):
        raise events
    assert isinstance(events[-1], Finished)
    assert all(r.stage.sessions == {} for r in batchers), "every chain, broken or not, must be closed"
    return [e.token_id for e in events[:-1]], chains


@pytest.mark.parametrize("sampling", [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=77, top_p=0.9)], ids=["greedy", "seeded"])
def test_broken_chains_are_replaced_and_the_answer_is_unchanged(model_path, sampling):
    clean, _ = generate(model_path, sampling)
    # Step 1 is the prefill (5 prompt tokens); break during decoding, twice, and on the
    # replay's own prefill.
    broken, chains = generate(model_path, sampling, fail_at={4, 9, 10})
    assert broken == clean
    assert len(chains.opened) == 4, chains.opened
    ids = [sid for sid, _ in chains.opened]
    assert len(set(ids)) == 4, "every new chain needs a fresh session id"
    assert [len(g) for _, g in chains.opened] == [0, 3, 7, 7], "each replay carries the tokens generated so far"
    # The peer blamed is avoided by every later chain of the request (issue 18, item 3).
    assert chains.avoided == [frozenset()] + [frozenset({"peer-b"})] * 3


def test_failure_during_the_first_prefill_is_retried(model_path):
    clean, _ = generate(model_path, SamplingParams(temperature=0.0), n=6)
    broken, chains = generate(model_path, SamplingParams(temperature=0.0), fail_at={1}, n=6)
    assert broken == clean and len(chains.opened) == 2


def test_no_route_is_waited_for_then_served(model_path):
    clean, _ = generate(model_path, SamplingParams(temperature=0.0), n=6)
    waited, _ = generate(model_path, SamplingParams(temperature=0.0), no_route_for=3, n=6)
    assert waited == clean


def test_no_route_past_the_deadline_is_model_unavailable(model_path):
    with pytest.raises(ModelUnavailable, match="nobody serves block 2.*gave up after 1 s"):
        generate(model_path, SamplingParams(temperature=0.0), no_route_for=1000, wait=1.0)


GAP = [(2, 4)]


def test_a_repair_under_way_is_waited_for_past_the_route_wait(model_path):
    clean, _ = generate(model_path, SamplingParams(temperature=0.0), n=6)
    moving_in = Repair(gaps=GAP, unfilled=[], served=True)  # a joining node covers the gap
    waited, _ = generate(model_path, SamplingParams(temperature=0.0), no_route_for=5, wait=0.5, n=6, repair=lambda: moving_in)
    assert waited == clean


def test_a_gap_nobody_fills_ends_the_wait_early_and_says_why(model_path, monkeypatch):
    monkeypatch.setattr(resumable, "REPAIR_GRACE", 1.0)
    stuck = Repair(gaps=GAP, unfilled=GAP, served=True)
    began = time.monotonic()
    with pytest.raises(ModelUnavailable, match=r"blocks \[2, 4\) have no server, and no node with room is moving in"):
        generate(model_path, SamplingParams(temperature=0.0), no_route_for=1000, wait=60.0, repair=lambda: stuck)
    assert time.monotonic() - began < 30


def test_failover_counts_its_pauses(model_path):
    async def main():
        batchers = [StepBatcher(TorchStage(resolve_local(str(model_path)), 0, LAYERS))]
        chains = BreakingChains(LocalChains(batchers), {3})
        async with trio.open_nursery() as nursery:
            await nursery.start(batchers[0].run)
            chain = ResumableChain(chains, SamplingParams(temperature=0.0), [5, 6, 7], 32, wait=5.0)
            token = await chain.start()
            for _ in range(4):
                token = await chain.next(token.token_id)
            await chain.close()
            nursery.cancel_scope.cancel()
        return chain

    chain = trio.run(main)
    assert chain.failovers == 1 and chain.paused_seconds > 0
    assert len(chain.generated) == 4
