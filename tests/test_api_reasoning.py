"""Reasoning (api/reasoning.py): ``chat_template_kwargs`` reach the template, and the
thinking goes to ``reasoning_content``, streamed and whole, through the gateway node
with the official ``openai`` client; the splitter on text cut anywhere."""

from __future__ import annotations

import openai
import pytest
from api_helpers import MESSAGES, N

from reference import Transformers
from shardmesh.api.reasoning import ReasoningSplitter, starts_thinking

pytest_plugins = ["api_fixtures"]
pytestmark = [pytest.mark.usefixtures("node_output_on_failure")]


@pytest.mark.parametrize("answer, thinking, want", [
    ("<think>\nhmm, rye?\n</think>\n\nYes, we do.", False, ("\nhmm, rye?\n", "Yes, we do.")),
    ("  <think>a</think>b", False, ("a", "b")),
    ("hmm</think>\n\nYes", True, ("hmm", "Yes")),
    ("Just an answer <think>", False, ("", "Just an answer <think>")),
    ("never closed", True, ("never closed", "")),
    ("<thin", False, ("", "<thin")),
])  # fmt: skip
@pytest.mark.parametrize("piece", [1, 2, 5, 100])
def test_the_splitter_gives_the_same_parts_however_the_text_is_cut(answer: str, thinking: bool, want, piece: int) -> None:
    splitter = ReasoningSplitter(thinking)
    thought, text = "", ""
    for i in range(0, len(answer), piece):
        t, a = splitter.feed(answer[i : i + piece])
        thought, text = thought + t, text + a
    t, a = splitter.finish()
    assert (thought + t, text + a) == want


def test_the_prompt_end_tells_whether_thinking_started() -> None:
    assert starts_thinking("<|im_start|>assistant\n<think>\n")
    assert not starts_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not starts_thinking("<|im_start|>assistant\n")


@pytest.mark.slow
def test_enable_thinking_false_reaches_the_template(client: openai.OpenAI, model_id: str, reference: Transformers) -> None:
    kw = dict(model=model_id, messages=MESSAGES, max_tokens=N, temperature=0)
    r = client.chat.completions.create(**kw, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    ids = list(reference.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=False, enable_thinking=False))
    assert r.usage.prompt_tokens == len(ids) > client.chat.completions.create(**kw).usage.prompt_tokens
    assert r.choices[0].message.content == reference.greedy(ids, N).text
    assert getattr(r.choices[0].message, "reasoning_content", None) is None


@pytest.mark.slow
def test_an_answer_that_starts_thinking_is_reasoning_content(client: openai.OpenAI, model_id: str, reference: Transformers) -> None:
    """The template opens the thinking block (``enable_thinking: true`` on the tiny
    template): what the random model writes, which never closes it, is all thinking."""
    kw = dict(model=model_id, messages=MESSAGES, max_tokens=N, temperature=0, extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    ids = list(reference.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=False, enable_thinking=True))
    expected = reference.greedy(ids, N).text
    assert "</think>" not in expected
    message = client.chat.completions.create(**kw).choices[0].message
    assert message.reasoning_content == expected and message.content is None
    chunks = [c for c in client.chat.completions.create(**kw, stream=True) if c.choices]
    assert "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks) == expected
    assert not "".join(c.choices[0].delta.content or "" for c in chunks)


@pytest.mark.slow
@pytest.mark.parametrize("kwargs", [{"messages": []}, {"tokenize": False}, {"bad name": 1}, ["enable_thinking"]])
def test_template_variables_that_are_not_the_clients_are_a_400(client: openai.OpenAI, model_id: str, kwargs) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=2, extra_body={"chat_template_kwargs": kwargs})
    assert info.value.body["param"] == "chat_template_kwargs"
