"""Structured output (backends/grammar.py, api/structured_output.py): a grammar masks
the sampler, so every answer is JSON its schema accepts, even from random weights; the
matcher is rebuilt from the tokens so far on a replay; bad schemas and grammars are
refused with the reason, and a hostile grammar costs a bounded amount."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
import trio
from transformers import AutoTokenizer

from shardmesh.api.errors import ApiError
from shardmesh.api.generate import Finished, GenerationRequest, Generator
from shardmesh.api.structured_output import json_grammar, response_format_grammar
from shardmesh.backends.batcher import StepBatcher
from shardmesh.backends.grammar import GrammarRefused, GrammarState, Vocabulary, bitmask_to_bools
from shardmesh.backends.local_chain import LocalChains
from shardmesh.backends.sampler_state import SamplerState
from shardmesh.backends.torch.stage import TorchStage
from shardmesh.backends.weights import resolve_local
from shardmesh.contract import BadRequest, SamplingParams
from shardmesh.contract.sampling import MAX_GRAMMAR_BYTES
from shardmesh.node.blocks import grammar_vocabulary
from shardmesh.node.config import NodeConfig
from shardmesh.node.model import load_model_meta
from shardmesh.tools.tiny_model import cached_tiny_model
from structured_schema import SCHEMA

MAX_TOKENS = 200


@pytest.fixture(scope="module")
def model_path():
    return cached_tiny_model("llama", layers=2, hidden=64)


@pytest.fixture(scope="module")
def vocabulary(model_path) -> Vocabulary:
    model = load_model_meta(NodeConfig(model=str(model_path)))
    vocabulary = grammar_vocabulary(model)
    assert vocabulary is not None and vocabulary.eos_ids
    return vocabulary


@pytest.fixture(scope="module")
def tokenizer(model_path):
    return AutoTokenizer.from_pretrained(model_path)


# --------------------------------------------------------------------------- the matcher


def test_the_mask_allows_exactly_what_continues_the_grammar(vocabulary: Vocabulary, tokenizer) -> None:
    state = GrammarState(vocabulary, json_grammar({"enum": ["yes", "no"]}))
    allowed = state.allowed(vocabulary.size + 7)  # wider logits than the tokenizer: padded ids never allowed
    assert allowed.shape == (vocabulary.size + 7,) and not allowed[vocabulary.size :].any()
    texts = {tokenizer.decode([i]) for i in torch.nonzero(allowed).reshape(-1).tolist()}
    assert texts and all('"yes"'.startswith(t) or '"no"'.startswith(t) for t in texts)
    for token in tokenizer.encode('"no"', add_special_tokens=False):
        assert state.allowed(vocabulary.size)[token]
        state.advance(token)
    done = torch.nonzero(state.allowed(vocabulary.size)).reshape(-1).tolist()
    assert set(done) <= set(vocabulary.eos_ids) and done  # complete: only the end of the answer


def test_a_replay_rebuilds_the_state_from_the_tokens_so_far(vocabulary: Vocabulary, tokenizer) -> None:
    grammar = json_grammar(SCHEMA)
    prefix = tokenizer.encode('{"name": "ab', add_special_tokens=False)
    walked = GrammarState(vocabulary, grammar)
    for token in prefix:
        walked.advance(token)
    rebuilt = GrammarState(vocabulary, grammar, prefix)
    assert torch.equal(walked.allowed(vocabulary.size), rebuilt.allowed(vocabulary.size))
    with pytest.raises(GrammarRefused, match="do not fit"):
        GrammarState(vocabulary, grammar, tokenizer.encode("[1, 2]", add_special_tokens=False))


def test_bitmask_bits_map_to_token_ids() -> None:
    bits = torch.tensor([0b101, -(2**31)], dtype=torch.int32)  # ids 0, 2 and 63
    assert torch.nonzero(bitmask_to_bools(bits, 70)).reshape(-1).tolist() == [0, 2, 63]
    assert bitmask_to_bools(bits, 2).tolist() == [True, False]


def test_a_grammar_that_does_not_compile_is_the_requests_fault(vocabulary: Vocabulary) -> None:
    params = SamplingParams(temperature=0.0, grammar="start: %json {bad")
    sampler = SamplerState(params, [5, 6], [], vocabulary)
    with pytest.raises(BadRequest, match="grammar"):
        sampler.token(_raw(torch.zeros(vocabulary.size)))


def test_a_node_without_a_vocabulary_fails_as_itself_not_as_the_request() -> None:
    sampler = SamplerState(SamplingParams(grammar=json_grammar({})), [5], [], None)
    with pytest.raises(RuntimeError, match="cannot apply grammars"):
        sampler.token(_raw(torch.zeros(64)))


def test_grammars_are_bounded_on_the_wire() -> None:
    with pytest.raises(ValueError, match="grammar"):
        SamplingParams.from_dict({"grammar": "x" * (MAX_GRAMMAR_BYTES + 1)})
    with pytest.raises(ValueError, match="bytes"):
        SamplingParams.from_dict({"grammar": "é" * (MAX_GRAMMAR_BYTES // 2 + 1)})  # counted in UTF-8, not characters
    with pytest.raises(ValueError, match="grammar must be a string"):
        SamplingParams.from_dict({"grammar": ["start: x"]})
    params = SamplingParams(grammar=json_grammar(SCHEMA))
    assert SamplingParams.from_dict(params.to_dict()) == params
    assert "grammar" not in SamplingParams().to_dict()  # hops from before grammars still take plain requests


@pytest.mark.parametrize("hostile", [
    "start: /((a|b){1000}){1000}/", "start: /(a|b|c|d|e|f)*a(a|b|c|d|e|f){400}/", "start: /[a-z]{100000}/",
    'start: x{5000}\nx: "a" | "b"',
])
def test_grammars_built_to_explode_a_regex_engine_compile_and_mask(vocabulary: Vocabulary, hostile: str) -> None:
    """Counted repetitions that a DFA built up front would multiply out: the engine
    builds its lexer lazily, under fuel limits, so each mask is one small step."""
    state = GrammarState(vocabulary, hostile)
    for _ in range(20):
        allowed = state.allowed(vocabulary.size)
        state.advance(int(torch.nonzero(allowed)[0]))


# --------------------------------------------------------------------------- the gateway's checks


@pytest.mark.parametrize("response_format, message", [
    ({"type": "xml"}, "type must be"),
    ({"type": "json_schema"}, "needs a 'json_schema'"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": []}}, "must be a JSON schema object"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}, "Invalid schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": ["a" * MAX_GRAMMAR_BYTES]}}}, "too large"),
])  # fmt: skip
def test_bad_response_formats_are_a_400_that_says_why(response_format, message) -> None:
    with pytest.raises(ApiError, match=message) as info:
        response_format_grammar(response_format)
    assert info.value.status == 400 and info.value.param == "response_format"


def test_text_is_no_grammar() -> None:
    assert response_format_grammar(None) is None and response_format_grammar({"type": "text"}) is None


# --------------------------------------------------------------------------- generation


def _raw(logits: torch.Tensor):
    from shardmesh.backends.torch.tensors import raw_from_tensor

    return raw_from_tensor(logits)


def _generate(model_path, vocabulary, tokenizer, requests: list[GenerationRequest], cuts=(0, 1, 2)) -> list[tuple[list[int], str]]:
    """Each request's tokens and finish reason, through a 2-stage local chain."""
    batchers = [StepBatcher(TorchStage(resolve_local(str(model_path)), a, b)) for a, b in zip(cuts, cuts[1:])]
    generator = Generator("tiny", tokenizer, 2048, LocalChains(batchers, vocabulary=vocabulary), frozenset(vocabulary.eos_ids))

    async def main() -> list[tuple[list[int], str]]:
        out = []
        async with trio.open_nursery() as nursery:
            for batcher in batchers:
                await nursery.start(batcher.run)
            for req in requests:
                events = [e async for e in generator.stream(req)]
                assert isinstance(events[-1], Finished)
                out.append(([e.token_id for e in events[:-1]], events[-1].reason))
            nursery.cancel_scope.cancel()
        return out

    return trio.run(main)


def test_twenty_sampled_answers_all_validate(model_path, vocabulary, tokenizer) -> None:
    prompt = tokenizer.encode("Describe this node as JSON.")
    grammar = json_grammar(SCHEMA)
    requests = [GenerationRequest(prompt, MAX_TOKENS, SamplingParams(temperature=1.0, seed=seed, grammar=grammar))
                for seed in range(20)]  # fmt: skip
    results = _generate(model_path, vocabulary, tokenizer, requests)
    assert {reason for _, reason in results} == {"stop"}  # every answer completed its JSON, then ended
    answers = [json.loads(tokenizer.decode(ids)) for ids, _ in results]
    for answer in answers:
        jsonschema.validate(answer, SCHEMA)
    assert len({json.dumps(a) for a in answers}) > 10  # sampled, not one answer twenty times
    # The same seed without the grammar is not JSON at all: the grammar did the work.
    free = _generate(model_path, vocabulary, tokenizer, [GenerationRequest(prompt, 40, SamplingParams(temperature=1.0, seed=0))])
    with pytest.raises(ValueError):
        json.loads(tokenizer.decode(free[0][0]))
