"""One choice's output text split into reasoning, answer and tool calls as it streams: the
interface that the reasoning formats (server/reasoning.py, server/harmony.py) implement."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from moestream.server.tool_calls import ToolCall


@dataclass
class Pieces:
    """What a run of output text holds: reasoning, answer, and OpenAI tool-call deltas."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)

    def __add__(self, other: Pieces) -> Pieces:
        return Pieces(self.reasoning + other.reasoning, self.content + other.content,
                      self.tool_calls + other.tool_calls)


class OutputSplit(ABC):
    """Splits one choice's output text as it streams; `calls` holds the calls read so far."""

    calls: list[ToolCall]

    @abstractmethod
    def push(self, text: str) -> Pieces:
        """The pieces of `text` that are certain now (a possible marker is held back)."""

    @abstractmethod
    def finish(self) -> Pieces:
        """What is left at the end of the output."""

    def whole(self, text: str) -> Pieces:
        return self.push(text) + self.finish()
