"""reasoning_content, content and tool calls through the official openai client, from servers
whose model writes scripted text (tests/server/scripted.py): gpt-oss's harmony channels,
`<think>` tags, and a plain ChatML model whose text must come back untouched."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from moestream.engine.chat_template import render_chat
from moestream.engine.tokenizer import Tokenizer
from moestream.server.harmony import harmony_messages
from moestream.tools.gguf_write import CHATML_TEMPLATE, byte_level_bpe_vocab
from tests.server.scripted import (N_VOCAB, TEMPLATES_ABSENT, InProcessServer, ScriptedEngine, gpt_oss_template,
                                   harmony_vocab, write_model)

ANALYSIS, FINAL = "The user asks 2+2. That is 4.", "2 + 2 = 4."
WEATHER_ARGS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                                           "parameters": WEATHER_ARGS}}]
HARMONY_SCRIPTS = {  # the first key found in the prompt's last user turn picks the text
    "sunny": "<|channel|>analysis<|message|>The tool says sunny.<|end|>"
             "<|start|>assistant<|channel|>final<|message|>It is sunny in Oslo.",
    "Oslo": "<|channel|>analysis<|message|>Need the weather tool.<|end|>"
            '<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>'
            '{"city": "Oslo"}<|call|>',
    "2+2": f"<|channel|>analysis<|message|>{ANALYSIS}<|end|><|start|>assistant<|channel|>final<|message|>{FINAL}",
}
THINK_TEXT = "<think>\nAdd them.\n</think>\n\n2 + 2 = 4."
THINK_TEMPLATE = CHATML_TEMPLATE.replace("<|im_start|>assistant\\n", "<|im_start|>assistant\\n<think>\\n")
MATH = [{"role": "user", "content": "What is 2+2?"}]


def start(tmp_path_factory, name: str, vocab, template: str, scripts: dict, end: str,
          reasoning_format: str = "auto") -> InProcessServer:
    path = write_model(tmp_path_factory.mktemp(name) / f"{name}.gguf", vocab, template)
    return InProcessServer(lambda: ScriptedEngine(path, scripts, end), reasoning_format).start()


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    template = gpt_oss_template()
    if template is None:
        pytest.skip(TEMPLATES_ABSENT)
    server = start(tmp_path_factory, "harmony", harmony_vocab(), template, HARMONY_SCRIPTS, "<|return|>")
    server.template = template
    yield server
    server.stop()


def stream_parts(stream) -> tuple[list[str], list]:
    """Each chunk's kind in order ('reasoning', 'content', 'tool_calls', 'finish:<reason>')."""
    kinds, chunks = [], list(stream)
    for chunk in chunks:
        for choice in chunk.choices:
            delta = choice.delta
            if getattr(delta, "reasoning_content", None):
                kinds.append("reasoning")
            if delta.content:
                kinds.append("content")
            if delta.tool_calls:
                kinds.append("tool_calls")
            if choice.finish_reason:
                kinds.append(f"finish:{choice.finish_reason}")
    return kinds, chunks


def joined(chunks, field: str) -> str:
    return "".join(getattr(c.choices[0].delta, field, None) or "" for c in chunks if c.choices)


def test_gpt_oss_reply_has_reasoning_and_content_apart(gpt_oss):
    out = gpt_oss.client().chat.completions.create(model="scripted", messages=MATH, max_tokens=200)
    message = out.choices[0].message
    assert (message.reasoning_content, message.content) == (ANALYSIS, FINAL)
    assert out.choices[0].finish_reason == "stop" and not message.tool_calls


def test_gpt_oss_stream_sends_reasoning_then_content_without_markers(gpt_oss):
    kinds, chunks = stream_parts(gpt_oss.client().chat.completions.create(
        model="scripted", messages=MATH, max_tokens=200, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert kinds.count("reasoning") > 1 and kinds.count("content") > 1, "sent in fragments as they come"
    assert kinds == sorted(kinds, key=["reasoning", "content", "finish:stop"].index), kinds
    assert (joined(chunks, "reasoning_content"), joined(chunks, "content")) == (ANALYSIS, FINAL)


def test_gpt_oss_cut_by_max_tokens_keeps_the_reasoning_so_far(gpt_oss):
    out = gpt_oss.client().chat.completions.create(model="scripted", messages=MATH, max_tokens=25)
    message = out.choices[0].message
    assert out.choices[0].finish_reason == "length"
    assert message.reasoning_content and ANALYSIS.startswith(message.reasoning_content)
    assert len(message.reasoning_content) < len(ANALYSIS) and not message.content


def test_reasoning_effort_reaches_the_template(gpt_oss):
    tokenizer = Tokenizer.from_gguf(gpt_oss_path(gpt_oss)[0])
    for effort in ("low", "high"):
        out = gpt_oss.client().chat.completions.create(model="scripted", messages=MATH, max_tokens=2,
                                                       reasoning_effort=effort)
        prompt = render_chat(gpt_oss.template, MATH, reasoning_effort=effort)
        assert f"Reasoning: {effort}" in prompt
        assert out.usage.prompt_tokens == len(tokenizer.encode(prompt, parse_special=True))
    r = httpx.post(f"{gpt_oss.url}/v1/chat/completions",
                   json={"messages": MATH, "reasoning_effort": "extreme", "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "reasoning_effort"


def gpt_oss_path(server: InProcessServer):
    return [server.server.config.app.state.server.engine.engine.file.path]


def test_gpt_oss_tool_call_round_trip(gpt_oss):
    client = gpt_oss.client()
    ask = [{"role": "user", "content": "Weather in Oslo?"}]
    out = client.chat.completions.create(model="scripted", messages=ask, tools=TOOLS, max_tokens=200)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.reasoning_content == "Need the weather tool."
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Oslo"}

    history = [*ask, {"role": "assistant", "content": None, "reasoning_content": choice.message.reasoning_content,
                      "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny"}'}]
    out = client.chat.completions.create(model="scripted", messages=history, tools=TOOLS, max_tokens=200)
    assert out.choices[0].message.content == "It is sunny in Oslo." and out.choices[0].finish_reason == "stop"
    # the prompt held the call and its result as the template writes them
    prompt = render_chat(gpt_oss.template, harmony_messages([
        ask[0], {"role": "assistant", "content": "", "reasoning_content": "Need the weather tool.",
                 "tool_calls": [{"id": call.id, "type": "function",
                                 "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny"}'}]),
        tools=TOOLS)
    tokenizer = Tokenizer.from_gguf(gpt_oss_path(gpt_oss)[0])
    assert out.usage.prompt_tokens == len(tokenizer.encode(prompt, parse_special=True))


def test_gpt_oss_streamed_tool_call_arrives_as_deltas(gpt_oss):
    kinds, chunks = stream_parts(gpt_oss.client().chat.completions.create(
        model="scripted", messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=TOOLS,
        max_tokens=200, stream=True))
    assert kinds[0] == "reasoning" and kinds[-1] == "finish:tool_calls" and "content" not in kinds
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert deltas[0].id and deltas[0].function.name == "get_weather"
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == {"city": "Oslo"}


def test_gpt_oss_forced_call_samples_a_valid_harmony_call(gpt_oss):
    """tool_choice=required: the grammar writes the call (random weights pick the arguments)."""
    out = gpt_oss.client().chat.completions.create(
        model="scripted", messages=[{"role": "user", "content": "Anything"}], tools=TOOLS,
        tool_choice="required", max_tokens=100, seed=1)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_ARGS)


# -- <think> and plain models ----------------------------------------------------------------
@pytest.fixture(scope="module")
def think(tmp_path_factory):
    server = start(tmp_path_factory, "think", byte_level_bpe_vocab(N_VOCAB), THINK_TEMPLATE,
                   {"2+2": THINK_TEXT.removeprefix("<think>\n")}, "<|im_end|>")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def think_none(tmp_path_factory):
    server = start(tmp_path_factory, "think-none", byte_level_bpe_vocab(N_VOCAB), THINK_TEMPLATE,
                   {"2+2": THINK_TEXT.removeprefix("<think>\n")}, "<|im_end|>", reasoning_format="none")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    server = start(tmp_path_factory, "plain", byte_level_bpe_vocab(N_VOCAB), CHATML_TEMPLATE,
                   {"2+2": THINK_TEXT}, "<|im_end|>")
    yield server
    server.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_think_tags_split_when_the_prompt_opens_them(think, stream):
    out = think.client().chat.completions.create(model="scripted", messages=MATH, max_tokens=200, stream=stream)
    if stream:
        kinds, chunks = stream_parts(out)
        assert kinds == sorted(kinds, key=["reasoning", "content", "finish:stop"].index), kinds
        reasoning, content = joined(chunks, "reasoning_content"), joined(chunks, "content")
    else:
        reasoning, content = out.choices[0].message.reasoning_content, out.choices[0].message.content
    assert (reasoning, content) == ("Add them.\n", "2 + 2 = 4.")


@pytest.mark.parametrize("stream", [False, True])
def test_reasoning_format_none_and_plain_models_leave_the_text_as_written(think_none, plain, stream):
    for server, text in [(think_none, THINK_TEXT.removeprefix("<think>\n")), (plain, THINK_TEXT)]:
        out = server.client().chat.completions.create(model="scripted", messages=MATH, max_tokens=200,
                                                      stream=stream)
        if stream:
            kinds, chunks = stream_parts(out)
            assert "reasoning" not in kinds
            content = joined(chunks, "content")
        else:
            message = out.choices[0].message
            assert getattr(message, "reasoning_content", None) is None
            assert "reasoning_content" not in message.model_dump(exclude_unset=True)
            content = message.content
        assert content == text


@pytest.mark.parametrize("stream", [False, True])
def test_responses_api_answers_with_the_final_channel_only(gpt_oss, stream):
    client = gpt_oss.client()
    if stream:
        events = list(client.responses.create(model="scripted", input="What is 2+2?", stream=True))
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert events[-1].type == "response.completed"
        assert events[-1].response.output_text == text
    else:
        text = client.responses.create(model="scripted", input="What is 2+2?").output_text
    assert text == FINAL


def test_a_structured_answer_after_an_opened_think_is_content(think):
    """The prompt opens <think> but a grammar writes the output: it is all content."""
    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["a"]}
    out = think.client().chat.completions.create(
        model="scripted", messages=MATH, max_tokens=50, seed=0,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}})
    message = out.choices[0].message
    assert out.choices[0].finish_reason == "stop" and message.reasoning_content is None
    jsonschema.validate(json.loads(message.content), schema)
