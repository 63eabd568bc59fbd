"""response_format and tool calling against `moestream serve --demo` (random weights: only
the grammar makes its output valid), through the official openai client; outputs are
checked with `jsonschema`."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from tests.server.conftest import ServerProcess

MODEL = "moestream-demo"
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


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> ServerProcess:
    cache = tmp_path_factory.mktemp("cache")
    proc = ServerProcess(["--demo", "--max-batch", "4"], env={"XDG_CACHE_HOME": str(cache)})
    yield proc.start()
    proc.stop()


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
