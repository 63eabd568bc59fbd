"""gpt-oss's harmony format: its output split into reasoning, answer and tool calls, its
forced-call grammar, and the request messages as its chat template reads them.

The prompt ends with `<|start|>assistant`; the model then writes messages
`[<|start|>assistant][ to=R]<|channel|>C[ to=R][ <|constrain|>json]<|message|>BODY` ended by
`<|end|>` (more follows), `<|return|>` or `<|call|>` (both end the generation and are not
part of the text). Channel `analysis` is the reasoning, `final` the answer, `commentary` a
preamble to the user or, with recipient `functions.NAME`, a call whose body is the JSON
arguments (one call per message; `<|call|>` ends the turn). Read from OpenAI's harmony
guide and llama.cpp's gpt-oss parser; the `openai-harmony` package cannot be used offline
(it downloads its vocabulary at run time), so this is a small incremental parser of text.
"""

from __future__ import annotations

import json
import re

from moestream.engine.constraints import Grammar
from moestream.engine.tokenizer import Tokenizer
from moestream.server.output_split import OutputSplit, Pieces
from moestream.server.tool_calls import ToolCall, ToolDialect, _call_id, _lark_json, _lark_literal, _partial_suffix

START, CHANNEL, MESSAGE, CONSTRAIN = "<|start|>", "<|channel|>", "<|message|>", "<|constrain|>"
END = "<|end|>"
# what ends a message body: <|start|> only when the model skipped the <|end|> before it
_BODY_ENDS = (END, "<|call|>", "<|return|>", START)
_HEADER_STARTS = (START, CHANNEL, " to=", "to=")
_RECIPIENT = re.compile(r"to=([^\s<]+)")
_CHANNEL_NAME = re.compile(r"<\|channel\|>\s*([A-Za-z_]+)")
_FUNCTIONS = "functions."


def is_harmony(template: str | None) -> bool:
    return template is not None and CHANNEL in template and MESSAGE in template


class HarmonySplit(OutputSplit):
    """Harmony messages -> reasoning (analysis), content (final, commentary preambles) and
    tool calls (commentary to=functions.NAME), as they stream.

    `allow_calls` False (the request has no tools): a call's text counts as reasoning.
    `reasoning_inline` (`--reasoning-format none`): the analysis stays in the content with
    its markers, as the model wrote it.
    """

    def __init__(self, allow_calls: bool, reasoning_inline: bool = False):
        self.allow_calls, self.reasoning_inline = allow_calls, reasoning_inline
        self.calls: list[ToolCall] = []
        self._held = ""
        self._kind: str | None = None  # None: reading a header; else "reasoning", "content", "call"
        self._raw_args = ""  # the open call's body as written (sent stripped)

    def push(self, text: str) -> Pieces:
        self._held += text
        out = Pieces()
        while True:
            if self._kind is None:
                at = self._held.find(MESSAGE)
                if at >= 0:
                    out += self._open(self._held[:at])
                    self._held = self._held[at + len(MESSAGE):]
                    continue
                if _could_be_header(self._held):
                    return out
                self._kind = "content"  # text outside any message: the model ignored the format
            at, marker = _first_of(self._held, _BODY_ENDS)
            if at < 0:
                keep = max(_partial_suffix(self._held, m) for m in _BODY_ENDS)
                body, self._held = self._held[:len(self._held) - keep], self._held[len(self._held) - keep:]
                return out + self._body(body)
            out += self._body(self._held[:at]) + self._close()
            self._held = self._held[at + (0 if marker == START else len(marker)):]

    def finish(self) -> Pieces:
        held, self._held = self._held, ""
        if self._kind is None:  # a header cut short says nothing; plain text is the answer
            return Pieces(content=held) if held.strip() and not held.lstrip().startswith("<|") else Pieces()
        return self._body(held) + self._close()

    def _open(self, header: str) -> Pieces:
        channel = _CHANNEL_NAME.search(header)
        recipient = next((r for r in _RECIPIENT.findall(header) if r != "assistant"), None)
        if recipient is not None and recipient.startswith(_FUNCTIONS) and self.allow_calls:
            self._kind, self._raw_args = "call", ""
            self.calls.append(ToolCall(recipient[len(_FUNCTIONS):], "", _call_id()))
            return Pieces(tool_calls=[{"index": len(self.calls) - 1, "id": self.calls[-1].id, "type": "function",
                                       "function": {"name": self.calls[-1].name, "arguments": ""}}])
        if recipient is not None or (channel is not None and channel.group(1) == "analysis"):
            self._kind = "reasoning"  # thinking, or a call to a tool the request did not give
            if self.reasoning_inline:  # as written, less the role that starts every message
                return Pieces(content=header.removeprefix(START + "assistant") + MESSAGE)
            return Pieces()
        self._kind = "content"
        return Pieces()

    def _body(self, text: str) -> Pieces:
        if not text:
            return Pieces()
        if self._kind == "content" or (self._kind == "reasoning" and self.reasoning_inline):
            return Pieces(content=text)
        if self._kind == "reasoning":
            return Pieces(reasoning=text)
        call = self.calls[-1]
        self._raw_args += text
        arguments = self._raw_args.strip()  # trailing space may yet be inside the JSON: held
        fragment, call.arguments = arguments[len(call.arguments):], arguments
        return Pieces(tool_calls=[{"index": len(self.calls) - 1, "function": {"arguments": fragment}}]
                      if fragment else [])

    def _close(self) -> Pieces:
        inline = self._kind == "reasoning" and self.reasoning_inline
        self._kind = None
        return Pieces(content=END) if inline else Pieces()


def _could_be_header(text: str) -> bool:
    head = text.lstrip()
    return not head or any(head.startswith(s) or s.startswith(head) for s in _HEADER_STARTS)


def _first_of(text: str, markers: tuple[str, ...]) -> tuple[int, str]:
    found = [(at, m) for m in markers if (at := text.find(m)) >= 0]
    return min(found) if found else (-1, "")


class Harmony(ToolDialect):
    """Calls as harmony writes them; parsing is HarmonySplit's, the grammar forces one call
    (a harmony turn ends at its call)."""

    name = "harmony"
    opener = CHANNEL

    def grammar(self, functions: list[dict], parallel: bool, tokenizer: Tokenizer) -> Grammar:
        channel, constrain = _lark_literal(CHANNEL, tokenizer), _lark_literal(CONSTRAIN, tokenizer)
        message = _lark_literal(MESSAGE, tokenizer)
        rules = []
        for i, f in enumerate(functions):
            recipient = json.dumps(f"commentary to={_FUNCTIONS}{f['name']} ")
            arguments = _lark_json(f.get("parameters") or {"type": "object"})
            rules.append(f'call{i}: {channel} {recipient} {constrain} "json" {message} {arguments}')
        start = " | ".join(f"call{i}" for i in range(len(functions)))
        return Grammar("lark", f"start: {start}\n" + "\n".join(rules) + "\n")

    def split(self, text: str) -> tuple[str, list[dict]]:
        split = HarmonySplit(allow_calls=True)
        pieces = split.whole(text)
        return pieces.content, [{"name": c.name, "arguments": c.arguments} for c in split.calls]


def harmony_messages(messages: list[dict]) -> list[dict]:
    """The messages as the gpt-oss template reads them: an assistant's `reasoning_content`
    is its `thinking`, and with tool calls it replaces the content (the template refuses
    both), as llama.cpp passes them."""
    out = []
    for m in messages:
        if m["role"] == "assistant" and m.get("reasoning_content"):
            m = {**m, "thinking": m["reasoning_content"]}
            if m.get("tool_calls"):
                m.pop("content", None)
        out.append(m)
    return out
