"""Tool-call dialects (server/tool_calls.py) and tool plans (server/tools.py), without a server:
parsing each family's markup, streaming splits, grammars that accept exactly that markup,
and tools and tool history rendered through chat templates."""

from __future__ import annotations

import json

import pytest

from moestream.engine.chat_template import render_chat
from moestream.engine.constraints import GrammarCompiler, allowed_tokens
from moestream.engine.tokenizer import Tokenizer
from moestream.server.schemas import ChatCompletionRequest
from moestream.server.tool_calls import Hermes, Llama3, Mistral, ToolCallStream, dialect_for
from moestream.server.tools import plan_tools

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"]}}}
# Hand-written templates in each family's style (what dialect_for reads is their markup).
HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
    "Call them as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>\n{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}"
    "\n</tool_call>{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MISTRAL_TEMPLATE = "{% for m in messages %}{% if m.tool_calls %}[TOOL_CALLS]{% endif %}{{ m.content }}{% endfor %}{{ tools }}"
LLAMA3_TEMPLATE = ("{% for m in messages %}{% if m.role == 'ipython' %}<|python_tag|>{% endif %}{{ m.content }}"
                   "{% endfor %}Respond as {\"name\": function name, \"parameters\": ...}{{ tools }}")


@pytest.fixture(scope="module")
def qwen2(shared_data) -> Tokenizer:
    return Tokenizer.from_gguf(shared_data / "tokenizer" / "ggml-vocab-qwen2.gguf")


def test_the_dialect_is_read_from_the_template_text():
    assert isinstance(dialect_for(HERMES_TEMPLATE), Hermes)
    assert isinstance(dialect_for(MISTRAL_TEMPLATE), Mistral)
    assert isinstance(dialect_for(LLAMA3_TEMPLATE), Llama3)
    assert isinstance(dialect_for(None), Hermes)


@pytest.mark.parametrize("dialect, text", [
    (Hermes(), 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}\n</tool_call>\n'
               '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "unit": "f"}}\n</tool_call>'),
    (Mistral(), 'Sure.[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}, '
                '{"name": "get_weather", "arguments": {"city": "Rome", "unit": "f"}}]'),
])
def test_parallel_calls_parse_into_openai_tool_calls(dialect, text):
    content, calls = dialect.parse(text)
    assert content == "Sure."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Oslo", "unit": "c"}), ("get_weather", {"city": "Rome", "unit": "f"})]
    assert len({c.id for c in calls}) == 2


def test_llama3_json_call_parses_and_plain_text_does_not():
    content, calls = Llama3().parse('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}')
    assert content is None and calls[0].name == "get_weather" and json.loads(calls[0].arguments) == {"city": "Oslo"}
    assert Llama3().parse("It is sunny.") == ("It is sunny.", [])


def test_stream_splits_content_and_calls_across_any_cut():
    text = 'Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}\n</tool_call>'
    for cut in range(1, 6):
        stream = ToolCallStream(Hermes())
        content, deltas = "", []
        for i in range(0, len(text), cut):
            c, d = stream.push(text[i:i + cut])
            content += c
            deltas += d
        c, d = stream.finish()
        content, deltas = content + c, deltas + d
        assert content == "Let me check. "
        assert deltas[0]["index"] == 0 and deltas[0]["function"]["name"] == "get_weather" and deltas[0]["id"]
        fragments = [d["function"]["arguments"] for d in deltas[1:]]
        assert len(fragments) > 3, "the arguments stream in fragments as they are written"
        assert json.loads("".join(fragments)) == {"city": "Oslo", "unit": "c"}


def test_parallel_streamed_calls_take_their_own_index():
    call = '<tool_call>\n{"name": "add", "arguments": {"a": %d}}\n</tool_call>'
    text = call % 1 + "\n" + call % 2
    stream = ToolCallStream(Hermes())
    deltas = [d for i in range(0, len(text), 3) for d in stream.push(text[i:i + 3])[1]] + stream.finish()[1]
    for index in (0, 1):
        mine = [d for d in deltas if d["index"] == index]
        assert mine[0]["function"]["name"] == "add"
        assert json.loads("".join(d["function"]["arguments"] for d in mine)) == {"a": index + 1}


def test_stream_without_calls_is_all_content():
    stream = ToolCallStream(Hermes())
    parts = [stream.push(t)[0] for t in ["a <tool", "_ca", "t> b"]]
    assert "".join(parts) + stream.finish()[0] == "a <tool_cat> b"


def walk(compiler: GrammarCompiler, constraint, text: str) -> bool:
    """Whether the mask lets some token sequence spell `text` to the end of the grammar."""
    tok, rest = compiler._tokenizer, text.encode()
    while rest:
        allowed = allowed_tokens([constraint], compiler.n_vocab)[0].nonzero().flatten().tolist()
        fits = [t for t in allowed if tok.token_bytes(t) and rest.startswith(tok.token_bytes(t))]
        if not fits:
            return False
        token = max(fits, key=lambda t: len(tok.token_bytes(t)))
        assert constraint.accept(token)
        rest = rest[len(tok.token_bytes(token)):]
    return constraint.matcher.is_accepting()


@pytest.mark.parametrize("dialect, good, bad", [
    (Hermes(), '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}\n</tool_call>',
     '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "k"}}\n</tool_call>'),
    (Mistral(), '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "f"}}]',
     '[TOOL_CALLS][{"name": "get_time", "arguments": {}}]'),
    (Llama3(), '{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "c"}}',
     '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}'),
])
def test_forced_call_grammar_takes_valid_calls_only(qwen2, dialect, good, bad):
    compiler = GrammarCompiler(qwen2, qwen2.vocab_size)
    functions = [WEATHER["function"] | {"parameters": {**WEATHER["function"]["parameters"],
                                                       "additionalProperties": False}}]
    grammar = dialect.grammar(functions, parallel=False, tokenizer=qwen2)
    assert walk(compiler, compiler.start(grammar), good)
    assert not walk(compiler, compiler.start(grammar), bad)


def history() -> list[dict]:
    body = ChatCompletionRequest(messages=[
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "7 C, rain"},
    ], tools=[WEATHER], tool_choice="auto")
    return [m.as_template_input() for m in body.messages]


def test_tools_and_history_reach_a_template_that_takes_them(qwen2):
    messages, plan = plan_tools(HERMES_TEMPLATE, history(), [ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "x"}], "tools": [WEATHER]}).tools[0]], "auto", True, qwen2)
    text = render_chat(HERMES_TEMPLATE, messages, **plan.template_vars)
    assert json.dumps(WEATHER, ensure_ascii=False) in text or '"name": "get_weather"' in text.split("<|im_end|>")[0]
    # the arguments reach the template as an object, as templates expect (not JSON text again)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}\n</tool_call>' in text
    assert "7 C, rain" in text
    assert plan.grammar is None and isinstance(plan.dialect, Hermes)


def test_a_template_without_tools_gets_them_in_a_system_message(qwen2):
    tools = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "x"}], "tools": [WEATHER]}).tools
    messages, plan = plan_tools(None, history(), tools, "required", False, qwen2)
    text = render_chat(None, messages)
    assert text.startswith("<|im_start|>system\n") and '"name": "get_weather"' in text.split("<|im_end|>")[0]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}\n</tool_call>' in text
    assert "<tool_response>\n7 C, rain\n</tool_response>" in text
    assert plan.grammar is not None and plan.grammar.kind == "lark"
