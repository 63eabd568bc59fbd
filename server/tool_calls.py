"""Tool-call markup: each model family's way of writing calls, as a grammar (to force calls)
and a parser (to turn the text back into OpenAI `tool_calls`, whole or streamed).

The dialect is read from the chat template's text, not the file name:
- Hermes/Qwen: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, one block per call;
- Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`;
- Llama 3: `{"name": ..., "parameters": {...}}` (optionally after `<|python_tag|>`).
A template that knows no tools gets the Hermes form (server/tools.py describes it in a
system message).
"""

from __future__ import annotations

import json
import re
import secrets
import string
from abc import ABC, abstractmethod
from dataclasses import dataclass

from moestream.engine.constraints import JSON_OPTIONS, Grammar
from moestream.engine.tokenizer import Tokenizer


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str

    def as_dict(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def _call_id(length: int | None = None) -> str:
    if length is not None:  # Mistral's templates demand 9 alphanumerics
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(length))
    return f"call_{secrets.token_hex(12)}"


def _lark_json(schema: dict) -> str:
    """`%json {...}` with our JSON layout (no free whitespace) for an embedded schema."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS}, ensure_ascii=False)


def _lark_literal(text: str, tokenizer: Tokenizer) -> str:
    """`text` in a Lark grammar: the control token of that text if the vocab has one (text can
    never produce a control token), else the string."""
    ids = tokenizer.encode(text, parse_special=True)
    if len(ids) == 1 and tokenizer.is_special(ids[0]):
        return f"<[{ids[0]}]>"
    return json.dumps(text, ensure_ascii=False)


class ToolDialect(ABC):
    name: str
    opener: str  # text that starts tool calls in the output
    id_length: int | None = None
    args_key: str = "arguments"

    def call_schema(self, functions: list[dict]) -> dict:
        """One call object: {"name": <one of them>, <args_key>: <its parameters>}."""
        options = [{"type": "object",
                    "properties": {"name": {"const": f["name"]},
                                   self.args_key: f.get("parameters") or {"type": "object"}},
                    "required": ["name", self.args_key], "additionalProperties": False}
                   for f in functions]
        return options[0] if len(options) == 1 else {"anyOf": options}

    @abstractmethod
    def grammar(self, functions: list[dict], parallel: bool, tokenizer: Tokenizer) -> Grammar:
        """Output that is only tool calls (one, or one or more with `parallel`)."""

    @abstractmethod
    def split(self, text: str) -> tuple[str, list[dict]]:
        """(the content outside the calls, the call objects found)."""

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        content, objects = self.split(text)
        calls = []
        for obj in objects:
            if isinstance(obj, dict) and isinstance(obj.get("name"), str):
                args = obj.get(self.args_key, obj.get("arguments", {}))
                arguments = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
                calls.append(ToolCall(obj["name"], arguments, _call_id(self.id_length)))
        content = content.strip()
        return (content or None), calls


def _loads(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


class Hermes(ToolDialect):
    name = "hermes"
    opener = "<tool_call>"
    closer = "</tool_call>"
    _block = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)

    def grammar(self, functions: list[dict], parallel: bool, tokenizer: Tokenizer) -> Grammar:
        open_, close = _lark_literal(self.opener, tokenizer), _lark_literal(self.closer, tokenizer)
        more = ' ("\\n" call)*' if parallel else ""
        body = _lark_json(self.call_schema(functions))
        return Grammar("lark", f'start: call{more}\ncall: {open_} "\\n" {body} "\\n" {close}\n')

    def split(self, text: str) -> tuple[str, list[dict]]:
        objects = [_loads(m.group(1)) for m in self._block.finditer(text)]
        return self._block.sub("", text), [o for o in objects if o is not None]


class Mistral(ToolDialect):
    name = "mistral"
    opener = "[TOOL_CALLS]"
    id_length = 9

    def grammar(self, functions: list[dict], parallel: bool, tokenizer: Tokenizer) -> Grammar:
        array = {"type": "array", "items": self.call_schema(functions), "minItems": 1}
        if not parallel:
            array["maxItems"] = 1
        return Grammar("lark", f"start: {_lark_literal(self.opener, tokenizer)} {_lark_json(array)}\n")

    def split(self, text: str) -> tuple[str, list[dict]]:
        content, marker, rest = text.partition(self.opener)
        if not marker:
            return text, []
        value = _loads(rest.strip())
        if isinstance(value, dict):
            value = [value]
        return content, value if isinstance(value, list) else []


class Llama3(ToolDialect):
    name = "llama3"
    opener = "<|python_tag|>"
    args_key = "parameters"

    def grammar(self, functions: list[dict], parallel: bool, tokenizer: Tokenizer) -> Grammar:
        # Llama 3 writes one call per turn
        return Grammar.json_schema(self.call_schema(functions))

    def split(self, text: str) -> tuple[str, list[dict]]:
        body = text.split(self.opener, 1)[1] if self.opener in text else text
        value = _loads(body.strip())
        if isinstance(value, dict) and "name" in value and (self.args_key in value or "arguments" in value):
            return text.split(self.opener, 1)[0] if self.opener in text else "", [value]
        return text, []

    def starts_call(self, text: str) -> bool:
        return text.lstrip().startswith(("{", self.opener))


def opener_is_control(dialect: ToolDialect, tokenizer: Tokenizer) -> bool:
    """Whether the calls open with a control token (then the text must keep control tokens)."""
    return _lark_literal(dialect.opener, tokenizer).startswith("<[")


def dialect_for(template: str | None) -> ToolDialect:
    text = template or ""
    if "[TOOL_CALLS]" in text:
        return Mistral()
    if "<tool_call>" in text:
        return Hermes()
    if "<|python_tag|>" in text or ("ipython" in text and '"parameters"' in text):
        return Llama3()
    return Hermes()


class ToolCallStream:
    """Splits streamed text into content and tool-call deltas.

    Content passes through until the dialect's opener appears (text that could still become
    the opener is held back); from there the text is tool calls. A Hermes call streams as
    it is written: a delta with index, id, type and name once its name is read, then the
    argument text in fragments (closing braces held back until the block ends). Other
    dialects' calls are sent at the end, name first, then the arguments.
    """

    _hermes_head = re.compile(r'\s*<tool_call>\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')

    def __init__(self, dialect: ToolDialect):
        self.dialect = dialect
        self.held = ""
        self.in_calls = False
        self.calls: list[ToolCall] = []
        self._is_llama = isinstance(dialect, Llama3)
        self._open: ToolCall | None = None  # the Hermes call whose arguments are streaming
        self._args_at = 0  # where its arguments start in `held`

    def push(self, text: str) -> tuple[str, list[dict]]:
        """(content to send now, tool-call deltas to send now)."""
        self.held += text
        if not self.in_calls:
            if self._is_llama and self.held.strip() and self.dialect.starts_call(self.held) and not self.calls:
                self.in_calls = True
                return "", []
            at = self.held.find(self.dialect.opener)
            if at < 0:
                keep = _partial_suffix(self.held, self.dialect.opener)
                content, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
                return content, []
            content, self.held = self.held[:at], self.held[at:]
            self.in_calls = True
            return content, self._hermes_progress()
        return "", self._hermes_progress()

    def finish(self) -> tuple[str, list[dict]]:
        """At the end of the output: what is left."""
        if not self.in_calls:
            content, self.held = self.held, ""
            return content, []
        if self._open is not None:  # cut before its block closed: its arguments stay partial
            self.held = ""
            return "", []
        content, calls = self.dialect.parse(self.held)
        self.held = ""
        deltas = []
        for call in calls:
            deltas += self._header(call)
            deltas.append({"index": len(self.calls) - 1, "function": {"arguments": call.arguments}})
        return (content or "") if not calls else "", deltas

    def _header(self, call: ToolCall) -> list[dict]:
        self.calls.append(call)
        return [{"index": len(self.calls) - 1, "id": call.id, "type": "function",
                 "function": {"name": call.name, "arguments": ""}}]

    def _hermes_progress(self) -> list[dict]:
        if not isinstance(self.dialect, Hermes):
            return []
        deltas = []
        while True:
            if self._open is None:
                head = self._hermes_head.match(self.held)
                if head is None:
                    return deltas
                self._open = ToolCall(json.loads(f'"{head.group(1)}"'), "", _call_id(self.dialect.id_length))
                self._args_at = head.end()
                deltas += self._header(self._open)
            args = self.held[self._args_at:]
            end = args.find(Hermes.closer)
            if end < 0:  # send what cannot be the end of the block
                safe = args[:len(args) - _partial_suffix(args, Hermes.closer)].rstrip(" \t\r\n}")
                deltas += self._send_args(safe)
                return deltas
            # the block is complete: its arguments are the text before the outer "}"
            body = args[:end].rstrip()
            final = body[:-1].rstrip() if body.endswith("}") else body
            deltas += self._send_args(final)
            self.held, self._open = args[end + len(Hermes.closer):], None

    def _send_args(self, text: str) -> list[dict]:
        call = self._open
        if len(text) <= len(call.arguments) or not text.startswith(call.arguments):
            return []
        fragment, call.arguments = text[len(call.arguments):], text
        return [{"index": len(self.calls) - 1, "function": {"arguments": fragment}}]


def _partial_suffix(text: str, marker: str) -> int:
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
