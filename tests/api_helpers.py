"""Helpers for the ``test_api_*`` files: the shared prompts and the checks they repeat.

The fixtures live in ``api_fixtures.py`` (a pytest plugin); this is a plain module the
test files import. Raw ``httpx`` requests go where the official client would refuse to
send them, and :func:`assert_error` checks OpenAI's error envelope.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from node_process import Node, start_node, stop_node

N = 12  # tokens per generation: small keeps the tests fast
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "The quick brown fox jumps over the lazy dog. Tell me more."},
]
PROMPT = "Once upon a time, in a small village by the sea,"


def serve_node(request: pytest.FixtureRequest, model_path: Path, *extra: str) -> Iterator[Node]:
    """A fixture body: start a node with ``extra`` flags, stop it when the scope ends."""
    node = start_node(model_path, *extra)
    failed_before = request.session.testsfailed
    try:
        yield node
    finally:
        stop_node(node)
        if request.session.testsfailed > failed_before:
            print(f"---- node output ({' '.join(node.proc.args)}) ----\n{node.output()}")


# --------------------------------------------------------------------------- checks
#
# pytest does not rewrite the asserts of a helper module, so each says what it saw.


def assert_still_serving(client: openai.OpenAI, model_id: str) -> None:
    """A good request after a bad one: the node is alive and answering."""
    r = client.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": "hi"}], max_tokens=2, temperature=0
    )
    assert r.choices[0].finish_reason in ("length", "stop"), r


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """The status code and OpenAI's error envelope: {"error": {message, type, param, code}}."""
    assert response.status_code == status, f"status {response.status_code}, not {status}: {response.text}"
    body = response.json()
    error = body["error"]
    assert set(error) >= {"message", "type", "param", "code"}, body
    assert isinstance(error["message"], str) and error["message"], body
    if code is not None:
        assert error["code"] == code, f"code {error['code']!r}, not {code!r}: {body}"
    return error


def post(node: Node, path: str, body: Any, **kwargs: Any) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    headers = {"content-type": "application/json", **kwargs.pop("headers", {})}
    return httpx.post(f"{node.url}{path}", content=content, headers=headers, timeout=60, **kwargs)


def sse_events(response: httpx.Response) -> list[Any]:
    """The ``data:`` payloads of a server-sent event stream, JSON-decoded except [DONE]."""
    events = []
    for line in response.text.splitlines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events
