"""``n`` choices in one request (api/choices.py): each is what its seed gives alone,
streamed or whole, on both endpoints, and they share the prompt's prefill."""

from __future__ import annotations

import re

import httpx
import openai
import pytest
from api_helpers import MESSAGES, N
from node_process import Node

pytest_plugins = ["api_fixtures"]
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("node_output_on_failure")]

SEED = 5


def alone(client: openai.OpenAI, model_id: str, seed: int, **kw) -> str:
    r = client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=N, temperature=1.0, seed=seed, **kw)
    assert len(r.choices) == 1
    return r.choices[0].message.content


def test_three_choices_are_each_what_their_seed_gives_alone(client: openai.OpenAI, model_id: str) -> None:
    r = client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=N, temperature=1.0, seed=SEED, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.message.content for c in r.choices]
    assert texts == [alone(client, model_id, SEED + i) for i in range(3)]
    assert len(set(texts)) > 1  # three seeds, not one answer thrice
    singles = [client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=N, temperature=1.0, seed=SEED + i)
               for i in range(3)]  # fmt: skip
    assert r.usage.prompt_tokens == singles[0].usage.prompt_tokens
    assert r.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streamed_choices_carry_their_index_and_one_usage(client: openai.OpenAI, model_id: str) -> None:
    chunks = list(client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=N, temperature=1.0, seed=SEED,
                                                 n=3, stream=True, stream_options={"include_usage": True}))  # fmt: skip
    texts, finished = ["", "", ""], set()
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason is not None:
                finished.add(choice.index)
    assert finished == {0, 1, 2}
    assert len({c.id for c in chunks}) == 1
    assert texts == [alone(client, model_id, SEED + i) for i in range(3)]
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(usage) == 1 and not chunks[-1].choices and usage[0].completion_tokens >= 3


def test_completions_take_n_too(client: openai.OpenAI, model_id: str) -> None:
    r = client.completions.create(model=model_id, prompt="Once upon a time", max_tokens=N, temperature=1.0, seed=SEED, n=2)
    assert [c.index for c in r.choices] == [0, 1]
    for i, choice in enumerate(r.choices):
        single = client.completions.create(model=model_id, prompt="Once upon a time", max_tokens=N, temperature=1.0, seed=SEED + i)
        assert choice.text == single.choices[0].text


def test_choices_share_the_prompts_prefill(node: Node, client: openai.OpenAI, model_id: str) -> None:
    def cached() -> float:
        found = re.search(r"^shardmesh_prompt_tokens_cached_total (\S+)$", httpx.get(f"{node.url}/metrics", timeout=10).text, re.M)
        assert found is not None
        return float(found.group(1))

    long = [{"role": "user", "content": " ".join(["Tell me about the old desktop that computes every token."] * 20)}]
    before = cached()
    r = client.chat.completions.create(model=model_id, messages=long, max_tokens=4, temperature=1.0, seed=SEED, n=4)
    assert len(r.choices) == 4
    assert r.usage.prompt_tokens >= 128
    # Each choice started after the prompt's whole blocks, which one prefill computed.
    assert cached() - before >= 4 * ((r.usage.prompt_tokens - 1) // 64 * 64)
    assert [c.message.content for c in r.choices] == [
        client.chat.completions.create(model=model_id, messages=long, max_tokens=4, temperature=1.0, seed=SEED + i).choices[0].message.content
        for i in range(4)
    ]
