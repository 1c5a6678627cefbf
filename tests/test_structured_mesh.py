"""Structured output through real node processes and the official ``openai`` client:
``response_format`` json_schema and json_object through a 3-hop chain, and across a
failover, where the new chain's last hop rebuilds the grammar from the tokens so far.

The swarm: M (blocks [0, 2) and the API), two servers of [2, 3), Y ([3, 4)), so every
answer crosses three hops and Y samples under the grammar.
"""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import openai
import pytest
from node_process import Node, start_doubled_swarm, stop_showing_failures
from structured_schema import SCHEMA

from shardmesh.tools.tiny_model import cached_tiny_model

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Describe one node of the swarm as JSON."}]
FORMAT = {"type": "json_schema", "json_schema": {"name": "node", "schema": SCHEMA, "strict": True}}
ROUTE = re.compile(r"session [0-9a-f]{32}(?:-\d+)? via (.+)")
MAX_TOKENS = 200


@pytest.fixture(scope="module")
def swarm(request, tmp_path_factory) -> Iterator[list[Node]]:
    model: Path = cached_tiny_model("llama", layers=4, hidden=64)
    nodes = start_doubled_swarm(model, tmp_path_factory.mktemp("structured-keys"))
    try:
        yield nodes
    finally:
        stop_showing_failures(nodes, bool(request.session.testsfailed))


@pytest.fixture(scope="module")
def client(swarm: list[Node]) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{swarm[0].url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
        yield client


def answer(client: openai.OpenAI, seed: int, **kw) -> openai.types.chat.ChatCompletion:
    model = client.models.list().data[0].id
    return client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=1.0, seed=seed,
                                          response_format=FORMAT, **kw)  # fmt: skip


def test_twenty_seeded_answers_through_three_hops_validate(client: openai.OpenAI) -> None:
    texts = []
    for seed in range(20):
        reply = answer(client, seed)
        assert reply.choices[0].finish_reason == "stop"
        texts.append(reply.choices[0].message.content)
        jsonschema.validate(json.loads(texts[-1]), SCHEMA)
    assert len(set(texts)) > 10


def test_streamed_json_objects_parse(client: openai.OpenAI) -> None:
    """An object's keys are free strings, which random weights rarely close within the
    tokens allowed: such an answer ends with ``length``, as any answer cut short does,
    and is still the start of an object. Every answer that ended by itself parses."""
    model = client.models.list().data[0].id
    stream = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=40, temperature=1.0, seed=11, n=8,
                                            response_format={"type": "json_object"}, stream=True)  # fmt: skip
    texts, reasons = [""] * 8, [""] * 8
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            reasons[choice.index] = choice.finish_reason or reasons[choice.index]
    assert "stop" in reasons and set(reasons) <= {"stop", "length"}
    for text, reason in zip(texts, reasons):
        assert isinstance(json.loads(text), dict) if reason == "stop" else text.startswith('{"')


def test_a_schema_the_engine_refuses_is_a_400_naming_response_format(client: openai.OpenAI) -> None:
    model = client.models.list().data[0].id
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": 5}}}}}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, response_format=bad)
    assert info.value.body["param"] == "response_format" and "Invalid schema" in info.value.body["message"]


def test_an_answer_continues_its_grammar_across_a_failover(swarm: list[Node], client: openai.OpenAI) -> None:
    """The middle hop of the route dies mid-answer: the answer goes on on a new chain
    whose last hop rebuilds the grammar from the tokens so far, and is exactly what
    the same seed gives without the failover."""
    m, doubled = swarm[0], swarm[1:3]
    expected = answer(client, seed=7).choices[0].message.content
    since = len(m.lines)
    pieces: list[str] = []
    killed = None
    for chunk in answer(client, seed=7, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if len(pieces) == 5 and killed is None:
            route = ROUTE.findall(m.output(since))[-1]
            killed = next(n for n in doubled if f"{n.peer_id[-6:]}[" in route)
            os.kill(killed.proc.pid, signal.SIGKILL)
    assert killed is not None, "the answer ended before the kill"
    assert "".join(pieces) == expected
    jsonschema.validate(json.loads(expected), SCHEMA)
    assert len(ROUTE.findall(m.output(since))) >= 2 and "resumed on a new chain" in m.output(since)


def test_a_grammar_of_the_largest_size_crosses_three_hops(client: openai.OpenAI) -> None:
    """The grammar travels in every hop's ``open`` header, beside the route and the
    ticket: at its largest it still fits the header's 64 KiB."""
    from shardmesh.api.structured_output import json_grammar
    from shardmesh.contract.sampling import MAX_GRAMMAR_BYTES

    names = [f"peer-{i:05d}-" + "x" * 40 for i in range(1000)]
    while len(json_grammar({"enum": names}).encode()) > MAX_GRAMMAR_BYTES:
        names.pop()
    assert len(json_grammar({"enum": names}).encode()) > MAX_GRAMMAR_BYTES - 100
    big = {"type": "json_schema", "json_schema": {"name": "big", "schema": {"enum": names}}}
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=60, temperature=1.0, seed=1,
                                           response_format=big)  # fmt: skip
    assert json.loads(reply.choices[0].message.content) in names
