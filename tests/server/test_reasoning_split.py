"""Reasoning apart from content, without a server: gpt-oss's chat template rendered through
our Jinja environment against the harmony guide, harmony output split as llama.cpp's own
gpt-oss parser tests expect (tests/test-chat.cpp of llama.cpp, the cases below are its
inputs and expected results), `<think>` splits as llama-server's deepseek format, streamed
at every cut the same as whole."""

from __future__ import annotations

import datetime
import json

import pytest

from moestream.engine.chat_template import render_chat
from moestream.server.harmony import HarmonySplit, harmony_messages
from moestream.server.output_split import OutputSplit, Pieces
from moestream.server.reasoning import ThinkSplit, plan_split
from moestream.server.schemas import ChatCompletionRequest
from moestream.server.tool_calls import Hermes
from moestream.server.tools import plan_tools
from tests.server.scripted import TEMPLATES_ABSENT, gpt_oss_template, template_dir

# The harmony guide's example functions (without the parameter default: the template writes
# "// default: celsius," with a stray comma where the guide has none).
GUIDE_TOOLS = [
    {"type": "function", "function": {"name": "get_location", "description": "Gets the location of the user."}},
    {"type": "function", "function": {
        "name": "get_current_weather", "description": "Gets the current weather in the provided location.",
        "parameters": {"type": "object", "required": ["location"], "properties": {
            "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
            "format": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}}]


def guide_system(effort: str) -> str:
    """The system and developer messages of the harmony guide's function-calling example."""
    return ("<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
            "Knowledge cutoff: 2024-06\n"
            f"Current date: {datetime.date.today():%Y-%m-%d}\n\n"
            f"Reasoning: {effort}\n\n"
            "# Valid channels: analysis, commentary, final. Channel must be included for every message.\n"
            "Calls to these tools must go to the commentary channel: 'functions'.<|end|>"
            "<|start|>developer<|message|># Instructions\n\nAlways respond in riddles\n\n"
            "# Tools\n\n## functions\n\nnamespace functions {\n\n"
            "// Gets the location of the user.\ntype get_location = () => any;\n\n"
            "// Gets the current weather in the provided location.\ntype get_current_weather = (_: {\n"
            "// The city and state, e.g. San Francisco, CA\nlocation: string,\n"
            'format?: "celsius" | "fahrenheit",\n}) => any;\n\n} // namespace functions<|end|>')


@pytest.fixture(scope="module")
def gpt_oss() -> str:
    template = gpt_oss_template()
    if template is None:
        pytest.skip(TEMPLATES_ABSENT)
    return template


def render_request(template: str, body: dict) -> str:
    """A chat request's prompt text, through the server's own steps (schemas, tools, harmony)."""
    request = ChatCompletionRequest.model_validate({"model": "m", **body})
    messages, tools = plan_tools(template, [m.as_template_input() for m in request.messages], request.tools,
                                 request.tool_choice, request.parallel_tool_calls, None)
    extra = {"reasoning_effort": request.reasoning_effort} if request.reasoning_effort else {}
    return render_chat(template, harmony_messages(messages), **tools.template_vars, **extra)


@pytest.mark.parametrize("effort", [None, "low", "high"])
@pytest.mark.parametrize("instructions_role", ["system", "developer"])
def test_gpt_oss_prompt_is_the_harmony_guides(gpt_oss, effort, instructions_role):
    body = {"messages": [{"role": instructions_role, "content": "Always respond in riddles"},
                         {"role": "user", "content": "What is the weather like in SF?"}],
            "tools": GUIDE_TOOLS, **({"reasoning_effort": effort} if effort else {})}
    expected = (guide_system(effort or "medium")
                + "<|start|>user<|message|>What is the weather like in SF?<|end|><|start|>assistant")
    assert render_request(gpt_oss, body) == expected


def test_gpt_oss_tool_round_trip_renders_the_call_and_its_result(gpt_oss):
    """The guide's call and result; the template writes the recipient in the role header and
    the result as a JSON string (its `tojson`), and keeps the reasoning of a call turn."""
    body = {"tools": GUIDE_TOOLS, "messages": [
        {"role": "system", "content": "Always respond in riddles"},
        {"role": "user", "content": "What is the weather like in SF?"},
        {"role": "assistant", "content": None, "reasoning_content": "Need to use function get_current_weather.",
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_current_weather", "arguments": '{"location":"San Francisco"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sunny": true, "temperature": 20}'}]}
    expected = (guide_system("medium")
                + "<|start|>user<|message|>What is the weather like in SF?<|end|>"
                "<|start|>assistant<|channel|>analysis<|message|>Need to use function get_current_weather.<|end|>"
                "<|start|>assistant to=functions.get_current_weather<|channel|>commentary json<|message|>"
                '{"location": "San Francisco"}<|call|>'
                "<|start|>functions.get_current_weather to=assistant<|channel|>commentary<|message|>"
                + json.dumps('{"sunny": true, "temperature": 20}') + "<|end|><|start|>assistant")
    assert render_request(gpt_oss, body) == expected


def test_earlier_answers_drop_their_reasoning(gpt_oss):
    body = {"messages": [{"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello!", "reasoning_content": "Greet back."},
                         {"role": "user", "content": "Bye"}]}
    prompt = render_request(gpt_oss, body)
    assert prompt.endswith("<|start|>user<|message|>Hi<|end|><|start|>assistant<|channel|>final<|message|>Hello!"
                           "<|end|><|start|>user<|message|>Bye<|end|><|start|>assistant")
    assert "Greet back." not in prompt


# -- harmony output -> reasoning, content, calls --------------------------------------------
def run_split(make, text: str, cut: int) -> tuple[Pieces, OutputSplit]:
    split, out = make(), Pieces()
    for i in range(0, len(text), cut):
        out += split.push(text[i:i + cut])
    return out + split.finish(), split


def each_cut(make, text: str) -> tuple[Pieces, list]:
    """The pieces, the same at every cut of the stream (and whole); and the calls."""
    whole, split = run_split(make, text, len(text) or 1)
    for cut in range(1, 12):
        streamed, other = run_split(make, text, cut)
        assert (streamed.reasoning, streamed.content) == (whole.reasoning, whole.content), cut
        assert called(other.calls) == called(split.calls), cut
        names = [d["function"]["name"] for d in streamed.tool_calls if "name" in d["function"]]
        arguments = ["".join(d["function"]["arguments"] for d in streamed.tool_calls if d["index"] == i)
                     for i in range(len(names))]
        assert [(n, json.loads(a)) for n, a in zip(names, arguments)] == called(split.calls), cut
    return whole, split.calls


def called(calls) -> list[tuple[str, object]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


# (model text, reasoning, content) as llama.cpp's gpt-oss tests expect them
LLAMA_CPP_CASES = [
    ("<|channel|>final<|message|>Hello, world!\nWhat's up?", "", "Hello, world!\nWhat's up?"),
    ("<|channel|>commentary<|message|>Hello, world!\nWhat's up?", "", "Hello, world!\nWhat's up?"),
    ("<|channel|>analysis<|message|>I'm\nthinking<|end|><|start|>assistant<|channel|>final<|message|>"
     "Hello, world!\nWhat's up?", "I'm\nthinking", "Hello, world!\nWhat's up?"),
    ("<|channel|>analysis<|message|>I'm\nthinking", "I'm\nthinking", ""),
]


@pytest.mark.parametrize("text, reasoning, content", LLAMA_CPP_CASES)
def test_harmony_channels_split_as_llama_cpp_does(text, reasoning, content):
    pieces, calls = each_cut(lambda: HarmonySplit(allow_calls=True), text)
    assert (pieces.reasoning, pieces.content, calls) == (reasoning, content, [])


def test_reasoning_format_none_keeps_the_analysis_as_llama_cpp_does():
    text = LLAMA_CPP_CASES[2][0]
    pieces, _ = each_cut(lambda: HarmonySplit(allow_calls=True, reasoning_inline=True), text)
    assert pieces.reasoning == ""
    assert pieces.content == "<|channel|>analysis<|message|>I'm\nthinking<|end|>Hello, world!\nWhat's up?"


@pytest.mark.parametrize("text", [
    ' to=functions.special_function<|channel|>analysis<|message|>{"arg1": 1}',
    '<|channel|>analysis to=functions.special_function<|message|>{"arg1": 1}',
    ' to=functions.special_function<|channel|>analysis <|constrain|>json<|message|>{"arg1": 1}',
    '<|channel|>commentary to=functions.special_function<|message|>{"arg1": 1}',
    '<|channel|>commentary to=functions.special_function <|constrain|>json<|message|> {"arg1": 1} ',
])
def test_harmony_calls_take_the_recipient_in_either_header(text):
    pieces, calls = each_cut(lambda: HarmonySplit(allow_calls=True), text)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("special_function", {"arg1": 1})]
    assert (pieces.reasoning, pieces.content) == ("", "")


def test_harmony_call_after_reasoning():
    text = ('<|channel|>analysis<|message|>Thinking about edit...<|end|>'
            '<|start|>assistant<|channel|>commentary to=functions.edit <|constrain|>json<|message|>'
            '{"oldString": "if (part < railCount - 1) {", "newString": "if (part < 4) {", "replaceAll": false}')
    pieces, calls = each_cut(lambda: HarmonySplit(allow_calls=True), text)
    assert pieces.reasoning == "Thinking about edit..." and pieces.content == ""
    assert [c.name for c in calls] == ["edit"]
    assert json.loads(calls[0].arguments) == {"oldString": "if (part < railCount - 1) {",
                                              "newString": "if (part < 4) {", "replaceAll": False}


def test_a_call_without_tools_in_the_request_is_reasoning_not_a_call():
    text = '<|channel|>commentary to=functions.f <|constrain|>json<|message|>{"a": 1}'
    pieces, calls = each_cut(lambda: HarmonySplit(allow_calls=False), text)
    assert calls == [] and pieces.reasoning == '{"a": 1}' and pieces.content == ""


def test_no_marker_reaches_content_or_reasoning():
    text = ("<|channel|>analysis<|message|>a<b|c<|end|><|start|>assistant<|channel|>commentary<|message|>"
            "Checking.<|end|><|start|>assistant<|channel|>final<|message|>x <| y")
    pieces, _ = each_cut(lambda: HarmonySplit(allow_calls=True), text)
    assert pieces.reasoning == "a<b|c" and pieces.content == "Checking.x <| y"


def test_text_outside_the_format_is_content():
    pieces, calls = each_cut(lambda: HarmonySplit(allow_calls=True), "Just text, no channels.")
    assert (pieces.reasoning, pieces.content, calls) == ("", "Just text, no channels.", [])


# -- <think> ---------------------------------------------------------------------------------
@pytest.mark.parametrize("text, open_, reasoning, content", [
    ("<think>\nLet me see.\n</think>\n\nIt is 4.", False, "\nLet me see.\n", "It is 4."),
    ("Let me see.</think>\n\nIt is 4.", True, "Let me see.", "It is 4."),  # the prompt opened it
    ("It is 4.", False, "", "It is 4."),
    ("<think>cut short", False, "cut short", ""),
    ("  <thin", False, "", "<thin"),
])
def test_think_tags_split_as_llama_server_deepseek_format(text, open_, reasoning, content):
    pieces, _ = each_cut(lambda: ThinkSplit(None, open_), text)
    assert (pieces.reasoning, pieces.content) == (reasoning, content)


def test_think_then_a_tool_call():
    text = '<think>Use the tool.</think>\n\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
    pieces, calls = each_cut(lambda: ThinkSplit(Hermes(), False), text)
    assert pieces.reasoning == "Use the tool." and pieces.content == ""
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("f", {"a": 1})]


# -- which split a template gets -------------------------------------------------------------
class _Tokenizer:
    """What plan_split asks of a tokenizer: the prompt's last text and whether <think> is a
    control token."""

    def __init__(self, prompt_text: str):
        self.prompt_text = prompt_text

    def decode(self, ids):
        return self.prompt_text

    def encode(self, text, parse_special=False):
        return list(text.encode())

    def is_special(self, token_id):
        return False


THINK_TEMPLATE = "{% for m in messages %}{{ m.content }}{% endfor %}<think>\n\n</think>"
CHATML = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>{% endfor %}"


@pytest.mark.parametrize("template_name, reasoning_format, kind", [
    ("gpt-oss", "auto", HarmonySplit), ("gpt-oss", "none", HarmonySplit),
    ("think", "auto", ThinkSplit), ("think", "none", None), ("chatml", "auto", None), (None, "auto", None),
])
def test_the_split_is_chosen_from_the_template(gpt_oss, template_name, reasoning_format, kind):
    template = {"gpt-oss": gpt_oss, "think": THINK_TEMPLATE, "chatml": CHATML, None: None}[template_name]
    plan = plan_split(template, reasoning_format, None, _Tokenizer("<|im_start|>assistant\n"), [1, 2])
    assert (plan is None) if kind is None else isinstance(plan.make(), kind)
    if kind is HarmonySplit:
        assert plan.needs_control_tokens and plan.make().reasoning_inline == (reasoning_format == "none")


def test_a_prompt_that_opens_think_starts_in_the_reasoning():
    plan = plan_split(THINK_TEMPLATE, "auto", None, _Tokenizer("<|im_start|>assistant\n<think>\n"), [1])
    assert plan.make().whole("Hmm.</think>Yes.") == Pieces("Hmm.", "Yes.")


# Real templates (llama.cpp's copies): does the model's turn start inside <think>? Read off
# each template's generation prompt by hand: Qwen3.5 and GLM-4.7-Flash open it, DeepSeek-V3.1
# closes it at once (its default non-thinking mode), Qwen3 and GLM-4.6 leave it to the model.
@pytest.mark.parametrize("name, kind, opens", [
    ("Qwen-Qwen3-0.6B", ThinkSplit, False), ("Qwen3.5-4B", ThinkSplit, True),
    ("GLM-4.7-Flash", ThinkSplit, True), ("GLM-4.6", ThinkSplit, False),
    ("deepseek-ai-DeepSeek-V3.1", ThinkSplit, False), ("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B", ThinkSplit, False),
    ("Qwen-Qwen2.5-7B-Instruct", None, False), ("meta-llama-Llama-3.1-8B-Instruct", None, False),
])
def test_real_templates_get_their_split(name, kind, opens):
    path = template_dir() / f"{name}.jinja"
    if not path.is_file():
        pytest.skip(TEMPLATES_ABSENT)
    template = path.read_text()
    prompt = render_chat(template, [{"role": "user", "content": "hi"}], bos_token="<s>", eos_token="</s>")
    plan = plan_split(template, "auto", None, _Tokenizer(prompt), [1])
    assert (plan is None) == (kind is None)
    if kind is not None:
        pieces = plan.make().whole("Hmm.</think>\n\nYes.")
        assert pieces == (Pieces("Hmm.", "Yes.") if opens else Pieces("", "Hmm.</think>\n\nYes."))


def test_a_grammar_written_answer_is_content_even_after_an_opened_think():
    """response_format or a forced call: the grammar writes the answer from the first token."""
    tokenizer = _Tokenizer("<|im_start|>assistant\n<think>\n")
    plan = plan_split(THINK_TEMPLATE, "auto", Hermes(), tokenizer, [1], constrained=True)
    split = plan.make()
    pieces = split.whole('<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>')
    assert pieces.reasoning == "" and called(split.calls) == [("f", {"a": 1})]
    assert plan_split(THINK_TEMPLATE, "auto", None, tokenizer, [1], constrained=True).make().whole('{"a": 1}') \
        == Pieces("", '{"a": 1}')
