"""Client mistakes on a real node: each gets its status code and OpenAI's error body.

Raw ``httpx`` sends what the official client would refuse to send. Every test ends by
checking that the node still answers a good request.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from api_helpers import MESSAGES, assert_error, assert_still_serving, post
from node_process import Node

pytest_plugins = ["api_fixtures"]
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("node_output_on_failure")]


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"", b"[1, 2]", b'"a string"', b"\xff\xfe\xfa", b'{"temperature": NaN}', b"[" * 100_000],
    ids=["malformed", "empty", "array", "string", "not-utf8", "nan", "deeply-nested"],
)
def test_bad_json_is_400(node: Node, client: openai.OpenAI, model_id: str, content: bytes) -> None:
    for path in ("/v1/chat/completions", "/v1/completions"):
        assert_error(post(node, path, content), 400)
    assert_still_serving(client, model_id)


@pytest.mark.parametrize(
    "change",
    [
        {"messages": "hello"},
        {"messages": [{"role": "user"}], "max_tokens": "many"},
        {"messages": [{"role": "wizard", "content": "hi"}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        {"messages": [{"role": "user", "content": 42}]},
        {"temperature": "hot"},
        {"temperature": True},
        {"max_tokens": 0},
        {"max_tokens": -5},
        {"max_tokens": 3.5},
        {"stream": "yes"},
        {"stop": ["a", "b", "c", "d", "e"]},
        {"stop": 7},
        {"seed": 2**80},
        {"top_p": 0},
        {"top_logprobs": 3},
        {"logprobs": True, "top_logprobs": 50},
        {"messages": []},
        {"model": None},
        {"messages": [{"role": "user", "content": "\ud800"}]},
        {"response_format": {"type": "xml"}},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
    ],
    ids=lambda c: json.dumps(c)[:40],
)
def test_invalid_chat_request_is_400(node: Node, client: openai.OpenAI, model_id: str, change: dict[str, Any]) -> None:
    body = {"model": model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **change}
    assert_error(post(node, "/v1/chat/completions", body), 400)
    assert_still_serving(client, model_id)


@pytest.mark.parametrize(
    "change",
    [
        {"prompt": 5},
        {"prompt": ["one", "two"]},
        {"prompt": [[1, 2], [3]]},
        {"prompt": [10**9]},
        {"prompt": ""},
        {"logprobs": 6},
        {"logprobs": True},
        {"echo": True},
        {"n": 9},
        {"n": 0},
    ],
    ids=lambda c: json.dumps(c)[:40],
)
def test_invalid_completion_request_is_400(node: Node, client: openai.OpenAI, model_id: str, change: dict[str, Any]) -> None:
    body = {"model": model_id, "prompt": "hi", "max_tokens": 2, **change}
    assert_error(post(node, "/v1/completions", body), 400)
    assert_still_serving(client, model_id)


def test_unknown_model_is_404(client: openai.OpenAI, model_id: str) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=2)
    assert info.value.code == "model_not_found"
    assert model_id in info.value.message  # names the models that exist
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4o", prompt="hi", max_tokens=2)
    assert_still_serving(client, model_id)


def test_unknown_route_is_404(node: Node, client: openai.OpenAI, model_id: str) -> None:
    assert_error(httpx.get(f"{node.url}/v1/nothing-here", timeout=10), 404)
    assert_error(httpx.get(f"{node.url}/v1/chat/completions", timeout=10), 405)
    assert_still_serving(client, model_id)


def test_n_above_eight_is_400(client: openai.OpenAI, model_id: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=2, n=9)
    assert info.value.param == "n" and "1 to 8" in info.value.message
    assert_still_serving(client, model_id)


def test_unknown_parameters_are_named_in_a_400_and_harmless_ones_pass(client: openai.OpenAI, model_id: str) -> None:
    """A knob the gateway does not implement is refused, never silently dropped; the
    fields that cannot change an answer (``user``, ``metadata``, ...) are accepted."""
    for extra, param in (({"reasoning_effort": "low", "verbosity": "low"}, "reasoning_effort"),):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=2, extra_body=extra)
        assert info.value.param == param and param in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model_id, prompt="hi", max_tokens=2, extra_body={"typical_p": 0.5})
    assert info.value.param == "typical_p"
    r = client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=2, user="u1", metadata={"a": "b"},
                                       store=False, extra_body={"parallel_tool_calls": False, "service_tier": "auto"})
    assert r.usage.completion_tokens >= 1
    assert_still_serving(client, model_id)


def test_temperature_out_of_range_is_400(client: openai.OpenAI, model_id: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=2, temperature=5)
    assert info.value.param == "temperature"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model_id, prompt="hi", max_tokens=2, temperature=-1)
    assert_still_serving(client, model_id)


def test_too_long_prompt_is_400(client: openai.OpenAI, model_id: str) -> None:
    context = client.models.retrieve(model_id).model_extra["max_model_len"]
    long_text = "hello there " * context  # well over `context` tokens, well under 1 MiB
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": long_text}], max_tokens=2)
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model_id, prompt=long_text, max_tokens=2, stream=True)
    assert info.value.code == "context_length_exceeded"
    # The prompt fits but prompt + max_tokens does not: OpenAI says 400, so do we.
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=context)
    assert info.value.code == "context_length_exceeded"
    assert_still_serving(client, model_id)


def test_body_over_1mib_is_413(node: Node, client: openai.OpenAI, model_id: str) -> None:
    big = {"model": model_id, "messages": [{"role": "user", "content": "x" * (1 << 20)}], "max_tokens": 2}
    assert_error(post(node, "/v1/chat/completions", big), 413)

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit must hold while reading
        for _ in range(24):
            yield b" " * 65536

    r = httpx.post(f"{node.url}/v1/completions", content=chunked(), timeout=60)
    assert_error(r, 413)
    assert_still_serving(client, model_id)
