"""`tools`, `tool_choice`, `parallel_tool_calls`: what a chat request's tools ask of the
prompt, the grammar and the parser.

The tools reach the model through its own chat template (`tools`, and `tool_calls` /
`tool` messages in the history), as transformers passes them. A template that never
mentions tools gets them from us instead: a system message describing the functions and
the Hermes `<tool_call>` form, and history calls and results written in that form.
`required` and a named function are enforced by a grammar of the dialect's markup, so the
arguments always validate against the function's parameters; `auto` leaves the model free
and parses whatever calls it writes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from moestream.engine.constraints import Grammar
from moestream.engine.tokenizer import Tokenizer
from moestream.server.harmony import Harmony, is_harmony
from moestream.server.structured import closed_objects
from moestream.server.tool_calls import Hermes, ToolDialect, dialect_for


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def as_template_input(self) -> dict:
        return self.model_dump(exclude_none=True, exclude={"strict"})


class ToolDef(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["function"]
    function: FunctionDef


class _NamedFunction(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["function"]
    function: _NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


@dataclass(frozen=True)
class ToolPlan:
    """One request's tools: the template variables, the grammar (if calls are forced) and
    the dialect to parse calls with (None: tools are off)."""

    template_vars: dict
    grammar: Grammar | None
    dialect: ToolDialect | None


def _system_text(tools: list[ToolDef]) -> str:
    """Tools described for a template that has no place for them (our words, Hermes' form)."""
    specs = "\n".join(json.dumps(t.model_dump(exclude_none=True), ensure_ascii=False) for t in tools)
    return ("You can call functions. Their signatures, one JSON object per line:\n<tools>\n"
            f"{specs}\n</tools>\nTo call a function, answer with one block per call:\n"
            '<tool_call>\n{"name": <function name>, "arguments": <arguments as a JSON object>}\n</tool_call>')


def _as_hermes_history(messages: list[dict]) -> list[dict]:
    """History calls and results in the Hermes form, for a template that drops them."""
    out = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            blocks = "\n".join("<tool_call>\n" + json.dumps({"name": c["function"]["name"],
                                                            "arguments": c["function"]["arguments"]},
                                                           ensure_ascii=False) + "\n</tool_call>"
                               for c in m["tool_calls"])
            out.append({"role": "assistant", "content": "\n".join(filter(None, [m["content"], blocks]))})
        elif m["role"] == "tool":
            out.append({"role": "tool", "content": f"<tool_response>\n{m['content']}\n</tool_response>"})
        else:
            out.append(m)
    return out


def plan_tools(template: str | None, messages: list[dict], tools: list[ToolDef] | None,
               tool_choice: ToolChoice | None, parallel: bool, tokenizer: Tokenizer) -> tuple[list[dict], ToolPlan]:
    """The messages to render and the request's tool plan."""
    knows_tools = template is not None and "tools" in template
    if not knows_tools:
        messages = _as_hermes_history(messages)
    if not tools or tool_choice == "none":
        return messages, ToolPlan({}, None, None)
    if not knows_tools:
        dialect = Hermes()
    else:
        dialect = Harmony() if is_harmony(template) else dialect_for(template)
    template_vars = {}
    if knows_tools:
        template_vars["tools"] = [t.model_dump(exclude_none=True) for t in tools]
    elif messages and messages[0]["role"] == "system":
        messages = [{**messages[0], "content": messages[0]["content"] + "\n\n" + _system_text(tools)}, *messages[1:]]
    else:
        messages = [{"role": "system", "content": _system_text(tools)}, *messages]
    functions = [closed_objects(t.function.as_template_input()) for t in tools]
    grammar = None
    if isinstance(tool_choice, NamedToolChoice):
        named = [f for f in functions if f["name"] == tool_choice.function.name]
        grammar = dialect.grammar(named, False, tokenizer)
    elif tool_choice == "required":
        grammar = dialect.grammar(functions, parallel, tokenizer)
    return messages, ToolPlan(template_vars, grammar, dialect)
