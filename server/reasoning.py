"""Reasoning text apart from the answer: `reasoning_content` and `content`, whole or streamed.

A model that thinks before it answers writes both into one text. As llama-server (its
default `--reasoning-format deepseek`) and vLLM's reasoning parsers do, the server returns
the thinking as `reasoning_content` and the answer as `content`. The format is read from
the chat template, as the tool-call dialect is:
- `<think>...</think>` (Qwen3, GLM-4.5+, DeepSeek-R1): a template that writes `<think>`;
  when the prompt itself ends inside `<think>`, the output starts in the reasoning;
- harmony (gpt-oss): channels, server/harmony.py; tool calls are part of that format.
`--reasoning-format none` leaves the text as the model wrote it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from moestream.engine.tokenizer import Tokenizer
from moestream.server.harmony import HarmonySplit, is_harmony
from moestream.server.output_split import OutputSplit, Pieces
from moestream.server.tool_calls import ToolCallStream, ToolDialect, _partial_suffix

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_PROMPT_TAIL_TOKENS = 8  # enough to see whether the prompt ends inside <think>


class ThinkSplit(OutputSplit):
    """`<think>reasoning</think>answer`; the answer goes through the tool-call stream of the
    request's dialect, if it has tools."""

    def __init__(self, dialect: ToolDialect | None, starts_in_reasoning: bool):
        self._tools = ToolCallStream(dialect) if dialect is not None else None
        self.calls = self._tools.calls if self._tools is not None else []
        self._held = ""
        self._state = "reasoning" if starts_in_reasoning else "start"

    def push(self, text: str) -> Pieces:
        self._held += text
        out = Pieces()
        if self._state == "start":
            head = self._held.lstrip()
            if THINK_OPEN.startswith(head):  # nothing yet, or part of the opening tag
                return out
            if head.startswith(THINK_OPEN):
                self._state, self._held = "reasoning", head[len(THINK_OPEN):]
            else:
                self._state = "answer"
        if self._state == "reasoning":
            at = self._held.find(THINK_CLOSE)
            if at < 0:
                keep = _partial_suffix(self._held, THINK_CLOSE)
                out.reasoning, self._held = self._held[:len(self._held) - keep], self._held[len(self._held) - keep:]
                return out
            out.reasoning = self._held[:at]
            self._state, self._held = "answer_start", self._held[at + len(THINK_CLOSE):]
        if self._state == "answer_start":  # the blank lines after </think> are not the answer
            self._held = self._held.lstrip()
            if not self._held:
                return out
            self._state = "answer"
        text, self._held = self._held, ""
        return out + self._answer(text)

    def finish(self) -> Pieces:
        held, self._held = self._held, ""
        if self._state == "reasoning":
            return Pieces(reasoning=held)
        out = self._answer(held.lstrip() if self._state == "start" else held)
        if self._tools is not None:
            content, deltas = self._tools.finish()
            out = out + Pieces(content=content, tool_calls=deltas)
        return out

    def _answer(self, text: str) -> Pieces:
        if self._tools is None:
            return Pieces(content=text)
        content, deltas = self._tools.push(text)
        return Pieces(content=content, tool_calls=deltas)


def uses_think_tags(template: str | None) -> bool:
    return template is not None and (THINK_OPEN in template or THINK_CLOSE in template)


def is_control_text(text: str, tokenizer: Tokenizer) -> bool:
    """Whether `text` is one control token of the vocab (hidden unless asked for)."""
    ids = tokenizer.encode(text, parse_special=True)
    return len(ids) == 1 and tokenizer.is_special(ids[0])


@dataclass(frozen=True)
class SplitPlan:
    """How a request's choices split their output: a fresh splitter per choice, and whether
    the text must keep control tokens for it."""

    make: Callable[[], OutputSplit]
    needs_control_tokens: bool


def plan_split(template: str | None, reasoning_format: str, dialect: ToolDialect | None,
               tokenizer: Tokenizer, prompt_ids: list[int], constrained: bool = False) -> SplitPlan | None:
    """None: the output is content (and the dialect's tool calls) as before. `constrained`:
    a grammar writes the output (response_format, a forced call), so it is the answer from
    its first token even after a prompt that opened <think>."""
    if is_harmony(template):
        keep = reasoning_format == "none"
        return SplitPlan(lambda: HarmonySplit(dialect is not None, reasoning_inline=keep), True)
    if reasoning_format == "none" or not uses_think_tags(template):
        return None
    tail = tokenizer.decode(prompt_ids[-_PROMPT_TAIL_TOKENS:])
    open_ = tail.rstrip().endswith(THINK_OPEN) and not constrained
    return SplitPlan(lambda: ThinkSplit(dialect, open_), is_control_text(THINK_OPEN, tokenizer))
