"""OpenAI request bodies (pydantic). Unknown fields are ignored; bad values are a 400
naming the field. Types are strict, as OpenAI's own API is: "4" is not a number and
"yes" is not true. `ignore_eos` is vLLM's extension, handy for benchmarks."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator,
                      model_validator)

from moestream.engine import SamplingParams
from moestream.engine.constraints import Grammar
from moestream.engine.sequence import SEED_RANGE
from moestream.server.structured import ResponseFormat
from moestream.server.tools import NamedToolChoice, ToolChoice, ToolDef


def _valid_unicode(text: str) -> str:
    # JSON's "\ud800" escape decodes to a lone surrogate, which no UTF-8 text can hold.
    # isascii() first: it takes microseconds where a scan of megabytes takes a tenth of a second.
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            raise ValueError("the text holds a lone UTF-16 surrogate (\\ud800-\\udfff); "
                             "send valid Unicode") from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]


MAX_CHOICES = 16


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Request):
    include_usage: bool = False


class TextPart(_Request):
    type: Literal["text"]
    text: Text


class CalledFunction(_Request):
    name: str
    arguments: str


class AssistantToolCall(_Request):
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction

    def as_template_input(self) -> dict:
        """As chat templates read calls: the arguments as an object, not JSON text."""
        try:
            arguments: Any = json.loads(self.function.arguments)
        except json.JSONDecodeError:
            arguments = self.function.arguments
        return {"id": self.id, "type": "function", "function": {"name": self.function.name, "arguments": arguments}}


class ChatMessage(_Request):
    role: Text
    content: Text | list[TextPart] | None = None
    name: Text | None = None
    tool_calls: list[AssistantToolCall] | None = None
    tool_call_id: Text | None = None
    reasoning_content: Text | None = None  # an assistant turn's thinking, as the server returned it

    def as_template_input(self) -> dict:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        message = {"role": self.role, "content": content or ""}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = [c.as_template_input() for c in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.reasoning_content is not None:
            message["reasoning_content"] = self.reasoning_content
        return message


class _Sampling(_Request):
    """The sampling fields chat and completions share."""

    model: Text | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)  # -1 (vLLM's "off") or 0 disables
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: Text | list[Text] | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    ignore_eos: bool = False
    response_format: ResponseFormat | None = None
    logit_bias: dict[Text, float] | None = None  # token id (as JSON object keys are: text) -> bias

    @field_validator("stream_options")
    @classmethod
    def _options_need_a_stream(cls, options: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if options is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed with stream: true")
        return options

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for token, value in (bias or {}).items():
            if not token.isdigit():
                raise ValueError(f"the key {token!r} is not a token id")
            if not -100 <= value <= 100:
                raise ValueError(f"the bias of token {token} is {value}; biases must be in [-100, 100]")
        return bias

    @property
    def token_bias(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(token), value) for token, value in (self.logit_bias or {}).items())

    @field_validator("n")
    @classmethod
    def _few_choices(cls, n: int) -> int:
        # each choice is a sequence of its own; the prompt is prefilled once and shared
        if not 1 <= n <= MAX_CHOICES:
            raise ValueError(f"n must be in [1, {MAX_CHOICES}] (got {n})")
        return n

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    @property
    def grammar(self) -> Grammar | None:
        """What the output must match (response_format); None: free text."""
        return self.response_format.grammar() if self.response_format is not None else None

    def sampling_params(self, max_tokens: int, logprobs: int | None, grammar: Grammar | None = None,
                        choice: int = 0) -> SamplingParams:
        """Choice i of n draws with seed + i (wrapped into the seed range), so n seeded choices
        differ from each other and repeat across requests."""
        seed = self.seed
        if seed is not None and choice:
            low, high = SEED_RANGE
            seed = low + (seed - low + choice) % (high - low + 1)
        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_k=max(self.top_k, 0),
            top_p=self.top_p, seed=seed, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, ignore_eos=self.ignore_eos, logprobs=logprobs,
            grammar=grammar, logit_bias=self.token_bias)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[ToolDef] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True
    # vLLM's and llama-server's field; the chat template reads it (gpt-oss: "Reasoning: high")
    reasoning_effort: Literal["low", "medium", "high"] | None = None

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return self

    @field_validator("tools")
    @classmethod
    def _distinct_names(cls, tools: list[ToolDef] | None) -> list[ToolDef] | None:
        names = [t.function.name for t in tools or []]
        if len(set(names)) != len(names):
            raise ValueError("two functions have the same name")
        return tools

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice_needs_its_tool(cls, choice: ToolChoice | None, info: ValidationInfo) -> ToolChoice | None:
        names = [t.function.name for t in info.data.get("tools") or []]
        forced = choice == "required" or isinstance(choice, NamedToolChoice)
        if forced and not names:
            raise ValueError("forcing a tool call needs tools: send the functions in `tools`")
        response_format = info.data.get("response_format")
        if forced and response_format is not None and response_format.type != "text":
            raise ValueError("a forced tool call cannot be combined with response_format")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"the function {choice.function.name!r} is not in tools ({', '.join(names)})")
        return choice

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        """None: no logprobs; n >= 0: the chosen token's plus the top n."""
        if not self.logprobs:
            return None
        return self.top_logprobs or 0


class CompletionRequest(_Sampling):
    prompt: Text | list[int] | list[Text] | list[list[int]]
    max_tokens: int = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ValueError(f"one prompt per request is supported (got {len(prompt)})")
            prompt = prompt[0]
        if not prompt:
            raise ValueError("the prompt is empty")
        return prompt

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool) -> bool:
        if echo:
            raise ValueError("echo is not supported; prepend the prompt yourself")
        return echo

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, best_of: int | None) -> int | None:
        if best_of not in (None, 1):
            raise ValueError(f"only best_of=1 is supported (got {best_of})")
        return best_of
