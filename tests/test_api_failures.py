"""Failures a healthy node cannot produce on demand, checked in-process.

Model unavailable, a crash before or during a stream, a client hanging up: the real app
and server run in this process in front of a scripted stand-in for the generator, and
every answer must still be a proper status code or a closing error event.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from api_helpers import assert_error, sse_events

from shardmesh.api.speculation import SpeculationStats
from shardmesh.api.streaming import HEARTBEAT_SECONDS

pytest_plugins = ["api_fixtures"]


class ScriptedGenerator:
    """Stands in for the Generator to fail on demand; everything else is the real gateway."""

    model_name = "scripted"
    speculation = SpeculationStats()  # read by /metrics, as the Generator's is
    context_length = 256

    def __init__(self, tokenizer: Any, behaviour: str) -> None:
        self.tokenizer = tokenizer
        self.behaviour = behaviour
        self.closed = False

    def ready(self) -> bool:
        return self.behaviour != "not-ready"

    def worth_waiting(self) -> bool:
        return self.ready()

    async def stream(self, req: Any) -> Any:
        import trio

        from shardmesh.api.generate import Finished, PromptTooLong, TokenEvent
        from shardmesh.contract import ModelUnavailable

        try:
            if self.behaviour == "unavailable":
                raise ModelUnavailable("no complete chain")
            if self.behaviour == "too-long":
                raise PromptTooLong("the prompt does not fit")
            if self.behaviour == "crash-first":
                raise RuntimeError("scripted crash before the first token")
            for i in range(req.max_tokens):
                if self.behaviour == "crash-mid" and i == 2:
                    raise RuntimeError("scripted crash mid-stream")
                if self.behaviour == "slow":
                    await trio.sleep(0.2)
                if self.behaviour == "waits" and i in (0, 2):
                    await trio.sleep(HEARTBEAT_SECONDS * 1.5)  # a repair of the swarm, say
                yield TokenEvent(token_id=100 + i, text=f"t{i} ", logprob=-0.5, top_logprobs=())
            yield Finished("length", "", len(req.prompt_ids), req.max_tokens)
        finally:
            self.closed = True


def run_in_process(generator: ScriptedGenerator, check: Any) -> None:
    """Serve the real app for ``generator`` on a free port and run ``check(client)``."""
    import trio

    from shardmesh.api.app import create_app, serve

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve, create_app(generator), "127.0.0.1", 0)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
                await check(c)
            nursery.cancel_scope.cancel()

    trio.run(main)


def scripted_body(stream: bool, max_tokens: int = 5) -> dict[str, Any]:
    return {"model": "scripted", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens, "stream": stream}


@pytest.mark.parametrize(
    ("behaviour", "status", "code"),
    [
        ("not-ready", 503, "model_unavailable"),
        ("unavailable", 503, "model_unavailable"),
        ("too-long", 400, "context_length_exceeded"),
        ("crash-first", 500, "internal_error"),
    ],
)
def test_generator_errors_before_first_token(tokenizer: Any, behaviour: str, status: int, code: str) -> None:
    """Raised before anything was sent: a proper status code, streaming or not."""
    generator = ScriptedGenerator(tokenizer, behaviour)

    async def check(c: httpx.AsyncClient) -> None:
        for stream in (False, True):
            assert_error(await c.post("/v1/chat/completions", json=scripted_body(stream)), status, code)
        generator.behaviour = "ok"  # and the server still serves
        r = await c.post("/v1/chat/completions", json=scripted_body(False))
        assert r.status_code == 200
        assert r.json()["choices"][0]["message"]["content"] == "t0 t1 t2 t3 t4 "

    run_in_process(generator, check)


def test_crash_mid_stream_ends_with_error_event(tokenizer: Any) -> None:
    generator = ScriptedGenerator(tokenizer, "crash-mid")

    async def check(c: httpx.AsyncClient) -> None:
        r = await c.post("/v1/chat/completions", json=scripted_body(True))
        assert r.status_code == 200  # the headers were out before the crash
        events = sse_events(r)
        assert events[-1] == "[DONE]"
        assert events[-2]["error"]["code"] == "internal_error"
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-2])
        assert text == "t0 t1 "
        assert_error(await c.post("/v1/completions", json={"model": "scripted", "prompt": "hi", "max_tokens": 5}), 500)
        assert generator.closed

    run_in_process(generator, check)


def test_client_disconnect_stops_generation(tokenizer: Any) -> None:
    import trio

    generator = ScriptedGenerator(tokenizer, "slow")

    async def check(c: httpx.AsyncClient) -> None:
        async with c.stream("POST", "/v1/chat/completions", json=scripted_body(True, max_tokens=50)) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if "t1 " in line:
                    break  # leaving the block closes the connection mid-stream
        with trio.fail_after(5):
            while not generator.closed:
                await trio.sleep(0.05)

    run_in_process(generator, check)


def test_a_stream_that_waits_sends_comments_and_its_tokens(tokenizer: Any) -> None:
    """A wait longer than the heartbeat, before the first token and mid-stream: SSE
    comments keep the connection busy; the official client ignores them."""
    import openai

    generator = ScriptedGenerator(tokenizer, "waits")

    async def check(c: httpx.AsyncClient) -> None:
        r = await c.post("/v1/chat/completions", json=scripted_body(True, max_tokens=4))
        assert r.status_code == 200
        lines = [line for line in r.text.splitlines() if line]
        comments = [i for i, line in enumerate(lines) if line == ": waiting for the swarm"]
        tokens = [i for i, line in enumerate(lines) if '"content":"t' in line]
        assert len(comments) == 2 and comments[0] < tokens[0] and tokens[1] < comments[1] < tokens[2], lines
        events = sse_events(r)
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == "t0 t1 t2 t3 "

        def official() -> str:
            with openai.OpenAI(base_url=f"{c.base_url}/v1", api_key="unused", max_retries=0) as client:
                stream = client.chat.completions.create(**scripted_body(True, max_tokens=4))
                return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)

        import trio

        assert await trio.to_thread.run_sync(official) == "t0 t1 t2 t3 "

    run_in_process(generator, check)
