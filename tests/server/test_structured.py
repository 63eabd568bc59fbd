"""response_format and tool calling against `moestream serve --demo` (random weights: only
the grammar makes its output valid), through the official openai client; outputs are
checked with `jsonschema`."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from tests.server.conftest import DEMO_MODEL as MODEL

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["red", "green"]}, "maxItems": 3},
        "address": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["zip"]},
    },
    "required": ["name", "age", "tags", "address"],
}
HI = [{"role": "user", "content": "Describe a person."}]


def person_format(strict: bool) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": strict}}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_schema_output_validates(demo, seed):
    out = demo.client().chat.completions.create(model=MODEL, messages=HI, max_tokens=400, seed=seed,
                                                response_format=person_format(strict=True))
    assert out.choices[0].finish_reason == "stop"
    value = json.loads(out.choices[0].message.content)
    jsonschema.validate(value, PERSON)
    assert set(value["address"]) == {"zip"}, "objects are closed to their properties"


def test_json_schema_streamed_validates(demo):
    stream = demo.client().chat.completions.create(model=MODEL, messages=HI, max_tokens=400, seed=5,
                                                   stream=True, response_format=person_format(strict=False))
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), PERSON)


def test_completions_take_response_format_too(demo):
    out = demo.client().completions.create(model=MODEL, prompt="A person:", max_tokens=400, seed=3,
                                           extra_body={"response_format": person_format(strict=True)})
    assert out.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(out.choices[0].text), PERSON)


@pytest.mark.parametrize("seed", [0, 2])
def test_json_object_output_is_an_object(demo, seed):
    out = demo.client().chat.completions.create(model=MODEL, messages=HI, max_tokens=400, seed=seed,
                                                temperature=0.2, response_format={"type": "json_object"})
    choice = out.choices[0]
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    else:  # cut by max_tokens: still a prefix of an object
        assert choice.finish_reason == "length" and choice.message.content.startswith("{")


@pytest.mark.parametrize("response_format, message", [
    ({"type": "sound"}, "response_format.type"),
    ({"type": "json_schema"}, "json_schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}, "nonsense"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"properties": [1]}}}, "schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": [1, 2]}}, "json_schema"),
])
def test_invalid_response_format_is_a_400(demo, response_format, message):
    for path, extra in [("/v1/chat/completions", {"messages": HI}), ("/v1/completions", {"prompt": "hi"})]:
        r = demo.post(path, json={"model": MODEL, "max_tokens": 4, "response_format": response_format, **extra})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error" and error["param"] == "response_format"
        assert message in error["message"]
    with pytest.raises(openai.BadRequestError):
        demo.client().chat.completions.create(model=MODEL, messages=HI, response_format=response_format)
    assert httpx.get(f"{demo.url}/health").status_code == 200


# -- tool calling ----------------------------------------------------------------------
WEATHER_ARGS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 15},
                                                 "unit": {"enum": ["c", "f"]}},
                "required": ["city", "unit"]}
ADD_ARGS = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                             "b": {"type": "integer", "minimum": 0, "maximum": 99}},
            "required": ["a", "b"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_ARGS}},
         {"type": "function", "function": {"name": "add", "description": "a + b", "parameters": ADD_ARGS}}]
ARGS = {"get_weather": WEATHER_ARGS, "add": ADD_ARGS}
ASK = [{"role": "user", "content": "Weather in Oslo?"}]


def check_calls(calls) -> None:
    for call in calls:
        assert call.type == "function" and call.id
        jsonschema.validate(json.loads(call.function.arguments), ARGS[call.function.name])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_required_tool_choice_returns_calls_that_validate(demo, seed):
    out = demo.client().chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                                parallel_tool_calls=False, max_tokens=200, seed=seed)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(choice.message.tool_calls) == 1
    check_calls(choice.message.tool_calls)


def test_parallel_required_calls_all_validate(demo):
    out = demo.client().chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                                max_tokens=200, seed=4)
    calls = out.choices[0].message.tool_calls
    assert calls and len({c.id for c in calls}) == len(calls)
    check_calls(calls)


def test_named_function_is_the_one_called(demo):
    out = demo.client().chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, max_tokens=200, seed=3,
        tool_choice={"type": "function", "function": {"name": "add"}})
    calls = out.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["add"] and out.choices[0].finish_reason == "tool_calls"
    check_calls(calls)


def test_streamed_tool_calls_arrive_as_deltas(demo):
    stream = demo.client().chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                                   parallel_tool_calls=False, max_tokens=200, seed=6, stream=True)
    chunks = [c for c in stream if c.choices]
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
    first = deltas[0]
    assert first.index == 0 and first.id and first.type == "function" and first.function.name in ARGS
    assert all(d.index == 0 and d.id is None for d in deltas[1:])
    arguments = "".join(d.function.arguments or "" for d in deltas)
    jsonschema.validate(json.loads(arguments), ARGS[first.function.name])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(c.choices[0].delta.content for c in chunks)


def test_tool_history_renders_and_none_turns_tools_off(demo):
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Oslo", "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "7 C, rain"}]
    client = demo.client()
    with_tools = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=2, seed=1)
    without = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice="none",
                                             max_tokens=2, seed=1)
    # The tools' system message is in the first prompt only; the history is in both.
    assert with_tools.usage.prompt_tokens > without.usage.prompt_tokens > 30
    assert without.choices[0].message.tool_calls is None


@pytest.mark.parametrize("extra, param", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": TOOLS}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": "sometimes", "tools": TOOLS}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ({"tools": TOOLS, "tool_choice": "required",
      "response_format": {"type": "json_object"}}, "tool_choice"),
])
def test_bad_tool_requests_are_400s(demo, extra, param):
    r = demo.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK, "max_tokens": 2, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
