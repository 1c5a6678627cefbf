"""``/v1/completions`` end to end: a real node, the official client, transformers.

Greedy output is compared with single-process transformers ``generate``; every
sampling knob is checked against a local replay of shardmesh's own sampler. The node
and the reference are shared with the other API files (``api_fixtures.py``).
"""

from __future__ import annotations

from typing import Any

import openai
import pytest
from api_helpers import N, PROMPT
from reference import Reference, Transformers

pytest_plugins = ["api_fixtures"]
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("node_output_on_failure")]


def test_completion_greedy_matches_transformers(client: openai.OpenAI, model_id: str, completion_ref: Reference) -> None:
    r = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=N, temperature=0, logprobs=2)
    choice = r.choices[0]
    assert r.object == "text_completion"
    assert r.id.startswith("cmpl-")
    assert choice.text == completion_ref.text
    assert choice.finish_reason == completion_ref.finish_reason
    assert r.usage.prompt_tokens == len(completion_ref.prompt_ids)
    assert r.usage.completion_tokens == len(completion_ref.token_ids)
    lp = choice.logprobs
    assert lp.tokens == completion_ref.tokens
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(completion_ref.token_ids)
    assert all(lp_ <= 0.0 for lp_ in lp.token_logprobs)
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs)
    assert lp.text_offset == sorted(lp.text_offset)


def test_completion_stream_matches_transformers(client: openai.OpenAI, model_id: str, completion_ref: Reference) -> None:
    chunks = list(
        client.completions.create(
            model=model_id, prompt=PROMPT, max_tokens=N, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    with_choices = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in with_choices) == completion_ref.text
    assert with_choices[-1].choices[0].finish_reason == completion_ref.finish_reason
    assert chunks[-1].usage.completion_tokens == len(completion_ref.token_ids)
    assert chunks[-1].usage.prompt_tokens == len(completion_ref.prompt_ids)


def test_completion_token_id_prompt(client: openai.OpenAI, model_id: str, completion_ref: Reference) -> None:
    r = client.completions.create(model=model_id, prompt=completion_ref.prompt_ids, max_tokens=N, temperature=0)
    assert r.choices[0].text == completion_ref.text


def test_completion_seed_reproducible(client: openai.OpenAI, model_id: str) -> None:
    def sample(seed: int) -> str:
        return client.completions.create(model=model_id, prompt=PROMPT, max_tokens=N, temperature=1.0, seed=seed).choices[0].text

    first = sample(7)
    assert sample(7) == first
    assert any(sample(seed) != first for seed in (1, 2, 3, 4))  # see test_api_chat.py


# The first two cases turn every knob at once; on this prompt some knobs in them change
# nothing (the others already decided), so the later cases each change the tokens by
# themselves: a knob lost on the way cannot hide behind another.
SAMPLING_CASES = {
    "greedy-penalties": {"temperature": 0.0, "presence_penalty": 0.5, "frequency_penalty": 1.0, "repetition_penalty": 1.3},
    "seeded-top-k-top-p-penalties": {
        "temperature": 0.8,
        "top_k": 5,
        "top_p": 0.9,
        "seed": 7,
        "presence_penalty": 0.3,
        "frequency_penalty": 0.4,
        "repetition_penalty": 1.1,
    },
    "seeded-temperature-top-p": {"temperature": 0.7, "top_p": 0.8, "seed": 3},
    "greedy-presence": {"temperature": 0.0, "presence_penalty": 0.5},
    "greedy-frequency": {"temperature": 0.0, "frequency_penalty": 1.0},
    "greedy-repetition": {"temperature": 0.0, "repetition_penalty": 1.3},
    "seeded-min-p": {"temperature": 1.5, "min_p": 0.3, "seed": 11},
}


@pytest.mark.parametrize("knobs", SAMPLING_CASES.values(), ids=SAMPLING_CASES.keys())
def test_completion_sampling_knobs_match_local_replay(
    client: openai.OpenAI, model_id: str, reference: Transformers, knobs: dict[str, Any]
) -> None:
    """Every sampling knob goes through HTTP and reaches the sampler unchanged.

    The expected tokens come from transformers' float32 logits and shardmesh's own
    ``sample`` in a local loop; the node (float32 on CPU) computes the same logits
    bit for bit, so any difference is a knob lost or changed on the way.
    """
    from shardmesh.contract import SamplingParams

    prompt_ids = reference.prompt_ids(PROMPT)
    expected = reference.sample(prompt_ids, SamplingParams(**knobs), N)
    extensions = {name: knobs[name] for name in ("top_k", "repetition_penalty", "min_p") if name in knobs}
    standard = {name: value for name, value in knobs.items() if name not in extensions}
    r = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=N, extra_body=extensions, **standard)
    assert r.choices[0].text == reference.tokenizer.decode(expected, skip_special_tokens=True)
    assert r.usage.completion_tokens == len(expected)


def test_completion_logit_bias_matches_local_replay(client: openai.OpenAI, model_id: str, reference: Transformers) -> None:
    """``logit_bias`` reaches the last hop: the greedy answer's first token banned and
    another pushed up give the tokens shardmesh's sampler gives with that bias."""
    from shardmesh.contract import SamplingParams

    prompt_ids = reference.prompt_ids(PROMPT)
    plain = reference.sample(prompt_ids, SamplingParams(temperature=0.0), N)
    bias = tuple(sorted({plain[0]: -100.0, 42: 4.0}.items()))
    expected = reference.sample(prompt_ids, SamplingParams(temperature=0.0, logit_bias=bias), N)
    assert expected != plain
    r = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=N, temperature=0,
                                  logit_bias={str(i): b for i, b in bias})
    assert r.choices[0].text == reference.tokenizer.decode(expected, skip_special_tokens=True)


@pytest.mark.parametrize("body,param", [
    ({"logit_bias": {"999999": 1}}, "logit_bias"),  # not a token of this tokenizer
    ({"logit_bias": {"five": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    ({"min_p": 1.5}, "min_p"),
])
def test_bad_logit_bias_and_min_p_are_400s(client: openai.OpenAI, model_id: str, body: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=model_id, prompt=PROMPT, max_tokens=2, extra_body=body)
    assert caught.value.body["param"] == param, caught.value.body

