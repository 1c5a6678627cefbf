"""One gateway, several models (api/app.py): each request goes to the model it names,
``/v1/models`` lists them all, and every answer is what transformers gives on that
model's own weights. The gateway runs in this process over real HTTP (hypercorn), each
model on local blocks of its own, and is driven by the official ``openai`` client.

This is the API's half of serving several models; a node that finds the swarm's models
and opens a gateway for each is not built yet (issue 21, item 5).
"""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
import trio

from reference import Transformers
from shardmesh.api.app import create_app, serve
from shardmesh.api.generate import Generator, eos_token_ids
from shardmesh.backends.batcher import StepBatcher
from shardmesh.backends.local_chain import LocalChains
from shardmesh.backends.torch.stage import TorchStage
from shardmesh.backends.weights import resolve_local
from shardmesh.node.model import read_generation_defaults, read_tokenizer
from shardmesh.tools.tiny_model import cached_tiny_model

MESSAGES = [{"role": "user", "content": "Which of you am I talking to?"}]
N = 8


def ask(port: int, paths: dict[str, Path]) -> None:
    """Client side, in a worker thread: every check against the running gateway."""
    with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60) as client:
        assert [m.id for m in client.models.list().data] == list(paths)
        answers = {}
        for name, path in paths.items():
            ref = Transformers(path)
            reply = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=N, temperature=0)
            assert reply.model == name
            assert reply.choices[0].message.content == ref.greedy(ref.chat_ids(MESSAGES), N).text, name
            answers[name] = reply.choices[0].message.content
            completion = client.completions.create(model=name, prompt="Once upon a time", max_tokens=N, temperature=0)
            assert completion.choices[0].text == ref.greedy(ref.prompt_ids("Once upon a time"), N).text, name
            assert client.models.retrieve(name).id == name
        assert len(set(answers.values())) == len(paths)  # different weights, different answers
        with pytest.raises(openai.NotFoundError) as info:
            client.chat.completions.create(model="nope", messages=MESSAGES, max_tokens=2)
        assert all(name in info.value.message for name in paths)


def test_one_gateway_answers_each_model_as_its_own_weights_do() -> None:
    paths = {"tiny-llama": cached_tiny_model("llama", layers=2, hidden=64),
             "tiny-qwen3": cached_tiny_model("qwen3", layers=2, hidden=64)}  # fmt: skip

    async def main() -> None:
        batchers, generators = [], []
        for name, path in paths.items():
            batchers.append(StepBatcher(TorchStage(resolve_local(str(path)), 0, dtype="float32", model_name=name)))
            tokenizer = read_tokenizer(path)
            eos = eos_token_ids(tokenizer, read_generation_defaults(path))
            generators.append(Generator(name, tokenizer, 2048, LocalChains([batchers[-1]]), eos))
        async with trio.open_nursery() as nursery:
            for batcher in batchers:
                await nursery.start(batcher.run)
            port = await nursery.start(serve, create_app(generators), "127.0.0.1", 0)
            await trio.to_thread.run_sync(ask, port, paths)
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_gateway_serves_each_model_once() -> None:
    from types import SimpleNamespace

    from shardmesh.api.app import Gateway

    with pytest.raises(ValueError, match="each model once"):
        Gateway([SimpleNamespace(model_name="a"), SimpleNamespace(model_name="a")], None, None)  # type: ignore[arg-type, list-item]
    gateway = Gateway([], None, None)  # type: ignore[arg-type]
    assert gateway.generator is None
    gateway.add(SimpleNamespace(model_name="a"))  # type: ignore[arg-type]
    assert gateway.generator.model_name == "a" and list(gateway.models) == ["a"]
    with pytest.raises(ValueError, match="served already"):
        gateway.add(SimpleNamespace(model_name="a"))  # type: ignore[arg-type]
