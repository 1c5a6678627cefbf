"""Each family's tool-call format (api/tool_formats.py) and the streamed splitter
(api/tool_calls.py), on text: calls read out of answers, the grammar of a forced call
accepting exactly well-formed calls (walked token by token with the tiny vocabulary),
and the 400s for templates without tools or with a format nobody reads."""

from __future__ import annotations

import json

import pytest
import torch

from shardmesh.api.errors import ApiError
from shardmesh.api.tool_calls import CallSplitter, tool_plan
from shardmesh.api.tool_formats import HERMES, LLAMA3_JSON, MISTRAL, Function, ParsedCall, format_for
from shardmesh.backends.grammar import GrammarRefused, GrammarState
from shardmesh.node.blocks import grammar_vocabulary
from shardmesh.node.config import NodeConfig
from shardmesh.node.model import load_model_meta
from shardmesh.tools.tiny_model import cached_tiny_model
from shardmesh.tools.tiny_tokenizer import CHAT_TEMPLATE

ADD = Function("add", {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                       "required": ["a", "b"], "additionalProperties": False})  # fmt: skip
PING = Function("ping", {"type": "object", "properties": {}})
TOOLS = [{"type": "function", "function": {"name": f.name, "parameters": f.parameters}} for f in (ADD, PING)]

ANSWERS = {
    HERMES: 'Sure.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
            '<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>',
    LLAMA3_JSON: '{"name": "add", "parameters": {"a": 1, "b": 2}}',
    MISTRAL: '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "ping", "arguments": {}}]',
}
CALLS = {
    HERMES: [ParsedCall("add", '{"a": 1, "b": 2}'), ParsedCall("ping", "{}")],
    LLAMA3_JSON: [ParsedCall("add", '{"a": 1, "b": 2}')],
    MISTRAL: [ParsedCall("add", '{"a": 1, "b": 2}'), ParsedCall("ping", "{}")],
}


@pytest.fixture(scope="module")
def tiny():
    model = load_model_meta(NodeConfig(model=str(cached_tiny_model("llama", layers=2, hidden=64))))
    return model.tokenizer, grammar_vocabulary(model)


@pytest.mark.parametrize("fmt", [HERMES, LLAMA3_JSON, MISTRAL], ids=lambda f: f.name)
def test_calls_are_read_out_of_whole_answers(fmt) -> None:
    text, calls = fmt.split(ANSWERS[fmt])
    assert calls == CALLS[fmt]
    assert text.strip() == ("Sure." if fmt is HERMES else "")


@pytest.mark.parametrize("fmt", [HERMES, LLAMA3_JSON, MISTRAL], ids=lambda f: f.name)
@pytest.mark.parametrize("piece", [1, 3, 7])
def test_a_streamed_answer_splits_as_the_whole_one(fmt, piece: int) -> None:
    splitter, answer = CallSplitter(fmt), ANSWERS[fmt]
    text, calls = "", []
    for i in range(0, len(answer), piece):
        t, c = splitter.feed(answer[i : i + piece])
        text, calls = text + t, calls + c
    t, c = splitter.finish()
    assert (text + t, calls + c) == (("Sure." if fmt is HERMES else ""), CALLS[fmt])  # no whitespace before a call


def test_text_that_only_looks_like_a_call_stays_text() -> None:
    for answer in ("a <tool_call> b", "<tool_call>\nnot json\n</tool_call> tail", "I <tool_c"):
        splitter = CallSplitter(HERMES)
        t, c = splitter.feed(answer)
        t2, c2 = splitter.finish()
        assert t + t2 == answer and not c + c2
    assert LLAMA3_JSON.split('{"x": 1}') == ('{"x": 1}', [])


@pytest.mark.parametrize("fmt", [HERMES, LLAMA3_JSON, MISTRAL], ids=lambda f: f.name)
def test_a_forced_call_grammar_takes_well_formed_calls_only(fmt, tiny) -> None:
    tokenizer, vocabulary = tiny
    grammar = fmt.grammar([ADD, PING], parallel=fmt is not LLAMA3_JSON)
    good = ANSWERS[fmt].removeprefix("Sure.\n")
    state = GrammarState(vocabulary, grammar, tokenizer.encode(good, add_special_tokens=False))
    assert set(torch.nonzero(state.allowed(vocabulary.size)).reshape(-1).tolist()) & set(vocabulary.eos_ids)
    for bad in (good.replace('"a": 1', '"a": "1"'), good.replace("add", "sub"), "Sure. " + good):
        with pytest.raises(GrammarRefused):
            GrammarState(vocabulary, grammar, tokenizer.encode(bad, add_special_tokens=False))


def test_the_tiny_template_is_hermes_and_plans_follow_tool_choice() -> None:
    assert format_for(CHAT_TEMPLATE) is HERMES
    assert tool_plan(TOOLS, None, None, CHAT_TEMPLATE).grammar is None  # auto
    assert tool_plan(TOOLS, "none", None, CHAT_TEMPLATE).format is None
    required = tool_plan(TOOLS, "required", None, CHAT_TEMPLATE).grammar
    named = tool_plan(TOOLS, {"type": "function", "function": {"name": "ping"}}, None, CHAT_TEMPLATE).grammar
    assert '"const": "add"' in required and '"const": "ping"' in required and '"const": "add"' not in named
    assert tool_plan(None, None, None, CHAT_TEMPLATE) is None
    special = tool_plan(TOOLS, "required", None, "{{ tools }} [TOOL_CALLS]", lambda text: 5).grammar
    assert special.startswith("start: <[5]>")  # a special token is named, not spelt


@pytest.mark.parametrize("template, message", [
    ("{% for m in messages %}{{ m.content }}{% endfor %}", "does not take tools"),
    ("{{ tools | tojson }}{% for m in messages %}{{ m.content }}{% endfor %}", "does not read"),
])  # fmt: skip
def test_templates_without_a_readable_tool_format_are_a_400(template: str, message: str) -> None:
    with pytest.raises(ApiError, match=message) as info:
        tool_plan(TOOLS, "auto", None, template)
    assert info.value.param == "tools"
    json.dumps(info.value.body())  # an ordinary error body
