"""The smaller OpenAI details clients rely on (issue 16), against `moestream serve --demo`:
logit_bias, chunk objects, the first delta, system_fingerprint, context-length errors, CORS,
stream_options without a stream, prompt_tokens_details."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.server.conftest import DEMO_MODEL as MODEL
from tests.server.conftest import ServerProcess

HI = [{"role": "user", "content": "hi"}]
DEMO_CTX = 2048  # the demo preset's context


def test_logit_bias_of_100_makes_every_token_that_token(demo):
    out = demo.client().chat.completions.create(model=MODEL, messages=HI, max_tokens=8, seed=1, logprobs=True,
                                                logit_bias={"300": 100}, extra_body={"ignore_eos": True})
    tokens = [t.bytes for t in out.choices[0].logprobs.content]
    assert len(tokens) == 8 and all(t == tokens[0] for t in tokens)
    unbiased = demo.client().chat.completions.create(model=MODEL, messages=HI, max_tokens=8, seed=1, logprobs=True,
                                                     extra_body={"ignore_eos": True})
    assert len({bytes(t.bytes) for t in unbiased.choices[0].logprobs.content}) > 1, "random weights vary"


def test_stream_chunks_are_chunk_objects_with_a_fingerprint(demo):
    body = {"model": MODEL, "messages": HI, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{demo.url}/v1/chat/completions", json=body, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert events and all(e["object"] == "chat.completion.chunk" for e in events)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert len({e["system_fingerprint"] for e in events}) == 1
    whole = demo.client().chat.completions.create(model=MODEL, messages=HI, max_tokens=2)
    assert whole.object == "chat.completion" and whole.system_fingerprint == events[0]["system_fingerprint"]
    assert whole.usage.prompt_tokens_details.cached_tokens == 0


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "ab " * DEMO_CTX}]}, "messages"),
    ("/v1/completions", {"prompt": [5] * DEMO_CTX}, "prompt"),
    ("/v1/completions", {"prompt": [5] * 100, "max_tokens": DEMO_CTX - 99}, "max_tokens"),
    ("/v1/chat/completions", {"messages": HI, "max_tokens": DEMO_CTX}, "max_tokens"),
])
def test_context_overflow_is_a_400_with_openai_code(demo, path, body, param):
    r = demo.post(path, json={"model": MODEL, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["param"], error["code"], error["type"]) == (param, "context_length_exceeded", "invalid_request_error")


def test_max_tokens_filling_the_context_exactly_is_accepted(demo):
    # the end-of-text tokens (the last ones of the demo vocab) biased up end it after one token
    body = {"model": MODEL, "prompt": [5] * 100, "max_tokens": DEMO_CTX - 100, "logit_bias": {"1021": 100, "1023": 100}}
    r = demo.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 1 and r.json()["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("body, param", [
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"logit_bias": {"99999": 5}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"five": 1}}, "logit_bias"),
])
def test_bad_stream_options_and_logit_bias_are_400s(demo, body, param):
    r = demo.post("/v1/chat/completions", json={"model": MODEL, "messages": HI, "max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


ORIGIN = "http://app.example:3000"
PREFLIGHT = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type"}


def test_cors_preflight_is_answered_before_the_api_key(tmp_path):
    proc = ServerProcess(["--demo", "--api-key", "k", "--allowed-origins", f"{ORIGIN}, http://other.example"],
                         env={"XDG_CACHE_HOME": str(tmp_path)}, api_key="k").start()
    try:
        url = f"{proc.url}/v1/chat/completions"
        ok = httpx.options(url, headers=PREFLIGHT)
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ORIGIN
        assert "POST" in ok.headers["access-control-allow-methods"]
        stranger = httpx.options(url, headers={**PREFLIGHT, "Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in stranger.headers
        # the real request still needs the key, and its answer is readable by the page
        refused = httpx.post(url, json={"messages": HI}, headers={"Origin": ORIGIN})
        assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ORIGIN
        served = proc.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 1}, headers={"Origin": ORIGIN})
        assert served.status_code == 200 and served.headers["access-control-allow-origin"] == ORIGIN
    finally:
        proc.stop()


def test_no_cors_unless_origins_are_allowed(demo):
    r = httpx.options(f"{demo.url}/v1/chat/completions", headers=PREFLIGHT)
    assert "access-control-allow-origin" not in r.headers


# -- /v1/responses ---------------------------------------------------------------------
def test_responses_create_returns_the_text_and_usage(demo):
    client = demo.client()
    out = client.responses.create(model=MODEL, input="Say hi", instructions="Be brief.", max_output_tokens=6,
                                  temperature=0)
    chat = client.chat.completions.create(model=MODEL, max_tokens=6, temperature=0,
                                          messages=[{"role": "system", "content": "Be brief."},
                                                    {"role": "user", "content": "Say hi"}])
    assert out.object == "response" and out.id.startswith("resp_")
    assert out.output_text == chat.choices[0].message.content, "the same prompt and greedy tokens as chat"
    assert out.usage.input_tokens == chat.usage.prompt_tokens
    assert out.usage.output_tokens == chat.usage.completion_tokens
    assert out.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")


def test_responses_stream_events_build_the_same_text(demo):
    client = demo.client()
    whole = client.responses.create(model=MODEL, input=[{"role": "user", "content": "Hello"}],
                                    max_output_tokens=8, temperature=0)
    events = list(client.responses.create(model=MODEL, input=[{"role": "user", "content": "Hello"}],
                                          max_output_tokens=8, temperature=0, stream=True))
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert types[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text == events[-1].response.output_text


def test_responses_take_a_json_schema_text_format(demo):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    out = demo.client().responses.create(model=MODEL, input="json please", max_output_tokens=50,
                                         text={"format": {"type": "json_schema", "name": "r", "schema": schema}})
    assert json.loads(out.output_text) in ({"ok": True}, {"ok": False})


# -- n > 1 -----------------------------------------------------------------------------
def test_n_choices_each_equal_a_request_with_its_seed(demo):
    client = demo.client()
    computed = ("moestream:prompt_tokens_computed_total", ())
    before = demo.metrics()[computed]
    out = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=6, n=3, seed=40,
                                         extra_body={"ignore_eos": True})
    assert [c.index for c in out.choices] == [0, 1, 2]
    prefilled = out.usage.prompt_tokens - out.usage.prompt_tokens_details.cached_tokens
    assert demo.metrics()[computed] - before == prefilled, "the choices share one prefill"
    alone = [client.chat.completions.create(model=MODEL, messages=HI, max_tokens=6, seed=40 + i,
                                            extra_body={"ignore_eos": True}).choices[0].message.content
             for i in range(3)]
    assert [c.message.content for c in out.choices] == alone
    assert len(set(alone)) > 1, "different seeds, different samples"
    assert out.usage.prompt_tokens == client.chat.completions.create(
        model=MODEL, messages=HI, max_tokens=1).usage.prompt_tokens, "the prompt counted once"
    assert out.usage.completion_tokens == 18


def test_n_streamed_choices_interleave_by_index(demo):
    client = demo.client()
    whole = client.completions.create(model=MODEL, prompt="a b", max_tokens=5, n=2, seed=7,
                                      extra_body={"ignore_eos": True})
    chunks = list(client.completions.create(model=MODEL, prompt="a b", max_tokens=5, n=2, seed=7, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    texts = {0: "", 1: ""}
    finishes = {}
    for chunk in chunks[:-1]:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert texts == {c.index: c.text for c in whole.choices}
    assert finishes == {0: "length", 1: "length"}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_n_json_choices_all_validate(demo):
    schema = {"type": "object", "properties": {"size": {"enum": ["S", "M", "L"]}}, "required": ["size"]}
    out = demo.client().chat.completions.create(
        model=MODEL, messages=HI, max_tokens=40, n=4, seed=2,
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
    assert len(out.choices) == 4
    assert all(json.loads(c.message.content)["size"] in "SML" for c in out.choices)
