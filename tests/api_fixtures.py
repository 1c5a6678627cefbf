"""The fixtures the ``test_api_*`` files share: the tiny model, one gateway node, the reference.

A pytest plugin: every file that needs it says ``pytest_plugins = ["api_fixtures"]``,
and pytest registers it once per process, so its session-scoped fixtures exist once.
The gateway node is one of them: the API files that one pytest process runs share one
node, as they did when they were one file. (Under ``pytest -n auto --dist loadfile``
each worker runs whole files and starts at most one such node.)

The node serves a tiny random Llama (4 layers, hidden 64); the reference is
single-process transformers ``generate`` on the same folder. Test files import the
prompts and checks from ``api_helpers.py``, never this module: pytest must import a
plugin itself to rewrite its asserts.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from api_helpers import MESSAGES, N, PROMPT, serve_node
from node_process import Node
from reference import Reference, Transformers


# --------------------------------------------------------------------------- node


@pytest.fixture(scope="session")
def model_path() -> Path:
    from shardmesh.tools.tiny_model import cached_tiny_model

    return cached_tiny_model("llama", layers=4, hidden=64)


@pytest.fixture(scope="session")
def node(request: pytest.FixtureRequest, model_path: Path) -> Iterator[Node]:
    """The gateway node every API file of this pytest process talks to."""
    yield from serve_node(request, model_path)


@pytest.fixture
def node_output_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    """When a test fails, show what the node(s) it used printed while it ran.

    Not autouse (a plugin's autouse fixture would run for every test of the session):
    the API files ask for it with ``pytest.mark.usefixtures``.
    """
    nodes = [request.getfixturevalue(name) for name in ("node", "keyed_node") if name in request.fixturenames]
    marks = [len(n.lines) for n in nodes]
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed > failed_before:
        for n, mark in zip(nodes, marks):
            print(f"---- node output during this test ----\n{n.output(mark)}")


@pytest.fixture(scope="session")
def client(node: Node) -> openai.OpenAI:
    # No retries: a 5xx must fail the test, not be retried quietly.
    return openai.OpenAI(base_url=f"{node.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def model_id(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


# --------------------------------------------------------------------------- reference


@pytest.fixture(scope="session")
def reference(model_path: Path) -> Transformers:
    return Transformers(model_path)


@pytest.fixture(scope="session")
def chat_ref(reference: Transformers) -> Reference:
    return reference.greedy(reference.chat_ids(MESSAGES), N)


@pytest.fixture(scope="session")
def completion_ref(reference: Transformers) -> Reference:
    return reference.greedy(reference.prompt_ids(PROMPT), N)


@pytest.fixture(scope="session")
def tokenizer(model_path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)
