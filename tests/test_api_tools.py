"""Tool calls through the gateway node with the official ``openai`` client (tool_calls.py,
tool_formats.py): ``tool_choice`` ``required`` and a named function make the answer a
well-formed call even from random weights; the tool's answer goes back in the history
and the next reply is text, exactly what transformers gives on the same template; calls
stream as OpenAI streams them; the rest is refused with a 400 that says why."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from api_helpers import N

from reference import Transformers

pytest_plugins = ["api_fixtures"]
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("node_output_on_failure")]

WEATHER = {
    "type": "object",
    "properties": {"city": {"enum": ["Oslo", "Lima", "Pune"]}, "unit": {"enum": ["celsius", "fahrenheit"]},
                   "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}}, "required": ["zone"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "The time in a zone", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
QUESTION = [{"role": "user", "content": "What is the weather in Oslo?"}]


def check_call(name: str, arguments: str) -> None:
    assert name in SCHEMAS
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_required_makes_the_answer_a_call_to_one_of_the_tools(client: openai.OpenAI, model_id: str, seed: int) -> None:
    r = client.chat.completions.create(model=model_id, messages=QUESTION, tools=TOOLS, tool_choice="required", max_tokens=120,
                                       temperature=1.0, seed=seed)  # fmt: skip
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        check_call(call.function.name, call.function.arguments)


def test_a_named_function_is_the_one_called(client: openai.OpenAI, model_id: str) -> None:
    r = client.chat.completions.create(model=model_id, messages=QUESTION, tools=TOOLS, max_tokens=120, temperature=1.0, seed=4,
                                       tool_choice={"type": "function", "function": {"name": "get_time"}})  # fmt: skip
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_time"
    check_call(call.function.name, call.function.arguments)


def test_streamed_calls_arrive_as_tool_call_deltas(client: openai.OpenAI, model_id: str) -> None:
    kwargs = dict(model=model_id, messages=QUESTION, tools=TOOLS, tool_choice="required", max_tokens=120, temperature=1.0, seed=1)
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls
    calls: dict[int, dict] = {}
    reasons = []
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            assert not choice.delta.content
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
                if delta.id:
                    assert call["id"] is None and delta.function.name  # the first delta names the call
                    call["id"], call["name"] = delta.id, delta.function.name
                call["arguments"] += delta.function.arguments or ""
            reasons.append(choice.finish_reason)
    assert reasons[-1] == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in whole]


def test_a_tool_answer_in_the_history_gets_a_text_reply_as_transformers_gives(client: openai.OpenAI, model_id: str,
                                                                              reference: Transformers) -> None:
    call = client.chat.completions.create(model=model_id, messages=QUESTION, tools=TOOLS, tool_choice="required", max_tokens=120,
                                          temperature=1.0, seed=2).choices[0].message.tool_calls[0]  # fmt: skip
    history = QUESTION + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 7, "sky": "clear"})},
    ]
    reply = client.chat.completions.create(model=model_id, messages=history, tools=TOOLS, max_tokens=N, temperature=0)
    assert reply.choices[0].message.content and not reply.choices[0].message.tool_calls
    # transformers renders the same history (arguments as an object, as templates expect).
    rendered = [*history[:1], {**history[1], "tool_calls": [{**history[1]["tool_calls"][0], "function": {
        "name": call.function.name, "arguments": json.loads(call.function.arguments)}}]}, history[2]]
    ids = list(reference.tokenizer.apply_chat_template(rendered, tools=TOOLS, add_generation_prompt=True, return_dict=False))
    assert reply.choices[0].message.content == reference.greedy(ids, N).text
    streamed = client.chat.completions.create(model=model_id, messages=history, tools=TOOLS, max_tokens=N, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == reply.choices[0].message.content


def test_tool_choice_none_reads_no_calls(client: openai.OpenAI, model_id: str) -> None:
    r = client.chat.completions.create(model=model_id, messages=QUESTION, tools=TOOLS, tool_choice="none", max_tokens=N, temperature=0)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("kwargs, param", [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ({"tools": [{"type": "code_interpreter"}]}, "tools"),
    ({"tools": TOOLS * 2}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 7}}}], "tool_choice": "required"}, "tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
])  # fmt: skip
def test_bad_tool_requests_are_a_400_naming_the_field(client: openai.OpenAI, model_id: str, kwargs: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model_id, messages=QUESTION, max_tokens=4, **kwargs)
    assert info.value.body["param"] == param
