"""The generation loop over a real local chain, and the streaming text helpers."""

from __future__ import annotations

import pytest
import torch
import trio
from transformers import AutoModelForCausalLM, AutoTokenizer

from shardmesh.api.generate import Finished, GenerationRequest, Generator, PromptTooLong, TokenEvent
from shardmesh.contract import ModelUnavailable
from shardmesh.api.text import IncrementalDetokenizer, StopMatcher
from shardmesh.backends.local_chain import LocalChains
from shardmesh.backends.batcher import StepBatcher
from shardmesh.contract import SamplingParams
from shardmesh.tools.tiny_model import cached_tiny_model
from shardmesh.backends.torch.stage import TorchStage
from shardmesh.backends.weights import resolve_local

LAYERS = 4
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def model_path():
    return cached_tiny_model("qwen3", layers=LAYERS, hidden=64)


@pytest.fixture(scope="module")
def reference(model_path):
    return AutoModelForCausalLM.from_pretrained(model_path).eval()


def make_generator(path, cuts=(0, 2, LAYERS), eos=frozenset(), **stage_kw) -> tuple[Generator, list[StepBatcher]]:
    batchers = [StepBatcher(TorchStage(resolve_local(str(path)), a, b, **stage_kw)) for a, b in zip(cuts, cuts[1:])]
    tokenizer = AutoTokenizer.from_pretrained(path)
    return Generator("tiny", tokenizer, 2048, LocalChains(batchers), eos), batchers


async def collect(generator: Generator, req: GenerationRequest) -> tuple[list[TokenEvent], Finished]:
    events = [e async for e in generator.stream(req)]
    assert isinstance(events[-1], Finished)
    return events[:-1], events[-1]


def run_with(batchers, fn):
    async def main():
        async with trio.open_nursery() as nursery:
            for r in batchers:
                await nursery.start(r.run)
            result = await fn()
            nursery.cancel_scope.cancel()
        return result

    return trio.run(main)


def greedy_reference(reference, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = reference.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


def test_long_prompt_is_chunked_and_matches_generate(model_path, reference):
    prompt = torch.randint(3, 700, (1100,), generator=torch.Generator().manual_seed(1)).tolist()  # 3 chunks
    generator, batchers = make_generator(model_path)
    events, done = run_with(batchers, lambda: collect(generator, GenerationRequest(prompt, 12, GREEDY)))
    assert [e.token_id for e in events] == greedy_reference(reference, prompt, 12)
    assert (done.reason, done.prompt_tokens, done.completion_tokens) == ("length", 1100, 12)
    assert batchers[0].stage.sessions == {}, "the session must be closed when the stream ends"


def test_concurrent_sessions_each_get_their_own_output(model_path, reference):
    prompts = [[5, 6, 7], [100, 200, 300, 400, 500], [42] * 9, [9, 8, 7, 6, 5, 4, 3]]
    generator, batchers = make_generator(model_path)

    async def all_at_once():
        results: dict[int, list[int]] = {}

        async def one(i: int) -> None:
            events, _ = await collect(generator, GenerationRequest(prompts[i], 10, GREEDY))
            results[i] = [e.token_id for e in events]

        async with trio.open_nursery() as nursery:
            for i in range(len(prompts)):
                nursery.start_soon(one, i)
        return results

    results = run_with(batchers, all_at_once)
    for i, prompt in enumerate(prompts):
        assert results[i] == greedy_reference(reference, prompt, 10)
    assert batchers[0].batched_requests > batchers[0].batches, "concurrent decode steps should have been batched"


def test_seeded_sampling_is_reproducible(model_path):
    generator, batchers = make_generator(model_path)
    params = SamplingParams(temperature=1.0, seed=1234, top_p=0.95)
    req = GenerationRequest([5, 6, 7, 8], 16, params)

    async def twice():
        a, _ = await collect(generator, req)
        b, _ = await collect(generator, req)
        return [e.token_id for e in a], [e.token_id for e in b]

    a, b = run_with(batchers, twice)
    assert a == b


def test_eos_stops_and_text_is_whole(model_path, reference):
    prompt = [5, 6, 7, 8]
    expected = greedy_reference(reference, prompt, 12)
    eos = expected[5]
    generator, batchers = make_generator(model_path, eos=frozenset({eos}))
    events, done = run_with(batchers, lambda: collect(generator, GenerationRequest(prompt, 12, GREEDY)))
    stop_at = expected.index(eos)
    assert [e.token_id for e in events] == expected[:stop_at]
    assert done.reason == "stop" and done.completion_tokens == stop_at
    tokenizer = generator.tokenizer
    assert "".join(e.text for e in events) + done.text == tokenizer.decode(expected[:stop_at], skip_special_tokens=True)


def test_stop_sequence_cuts_text(model_path, reference):
    prompt = [5, 6, 7, 8]
    generator, batchers = make_generator(model_path)
    full = generator.tokenizer.decode(greedy_reference(reference, prompt, 16), skip_special_tokens=True)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    events, done = run_with(batchers, lambda: collect(generator, GenerationRequest(prompt, 16, GREEDY, stop=(stop,))))
    text = "".join(e.text for e in events) + done.text
    assert done.reason == "stop"
    assert text == full[: full.index(stop)]


def test_prompt_too_long_and_busy(model_path):
    generator, batchers = make_generator(model_path, cache_budget_bytes=0)

    async def attempts():
        with pytest.raises(PromptTooLong):
            await collect(generator, GenerationRequest([5] * 2048, 4, GREEDY))
        with pytest.raises(ModelUnavailable):  # no KV cache budget at all: busy, not a crash
            await collect(generator, GenerationRequest([5, 6], 4, GREEDY))

    run_with(batchers, attempts)


def test_stop_matcher_holds_back_possible_starts():
    m = StopMatcher(["END", "xyz"])
    assert m.feed("hello E") == ("hello ", False)
    assert m.feed("N") == ("", False)
    assert m.feed("D tail") == ("", True)
    m = StopMatcher(["END"])
    assert m.feed("abcE") == ("abc", False)
    assert m.feed("x") == ("Ex", False)
    assert m.flush() == ""
    m = StopMatcher([])
    assert m.feed("anything") == ("anything", False)


def test_incremental_detokenizer_equals_decode(model_path):
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    text = "héllo wörld — naïve café ✓ 你好"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add(i) for i in ids]
    assert "".join(pieces) + detok.flush() == tokenizer.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


def test_kv_budget_running_out_mid_answer_ends_it_cleanly(model_path, reference):
    """Admitted with room for 256 tokens only: the answer stops at the budget with
    finish_reason "length", its tokens are still the right ones, and nothing leaks."""
    stage_probe = TorchStage(resolve_local(str(model_path)), 0, 2)
    budget = 260 * stage_probe.bytes_per_token
    generator, batchers = make_generator(model_path, cache_budget_bytes=budget)
    prompt = [5, 6, 7, 8]
    events, done = run_with(batchers, lambda: collect(generator, GenerationRequest(prompt, 400, GREEDY)))
    assert done.reason == "length"
    assert done.completion_tokens == len(events) == 256 - len(prompt) + 1
    assert [e.token_id for e in events[:20]] == greedy_reference(reference, prompt, 20)
    assert all(r.stage.sessions == {} for r in batchers)


def test_cancelled_request_frees_its_session(model_path):
    """A client that goes away mid-answer must not leave its KV cache behind."""
    generator, batchers = make_generator(model_path)

    async def abandon():
        with trio.move_on_after(0.5):
            async for _ in generator.stream(GenerationRequest([5, 6, 7], 1000, GREEDY)):
                pass

    run_with(batchers, abandon)
    assert all(r.stage.sessions == {} for r in batchers)


def test_closing_the_stream_early_closes_the_chain_at_once(model_path):
    """The HTTP layer stops reading at Finished (or when a client leaves) and closes the
    stream: the chain must be closed then, not when the garbage collector gets to it."""
    generator, batchers = make_generator(model_path)

    async def stop_early():
        for stop_after in (1, 4):
            stream = generator.stream(GenerationRequest([5, 6, 7], 3, GREEDY))
            events = [await anext(stream) for _ in range(stop_after)]
            assert batchers[0].stage.sessions, "the chain is open while the answer runs"
            await stream.aclose()
            assert all(r.stage.sessions == {} for r in batchers), f"after {events[-1]}"
            assert generator.active == 0

    run_with(batchers, stop_early)
