"""`response_format`: OpenAI's structured outputs as a grammar on the generated text.

`json_object` constrains the output to a JSON object, `json_schema` to a document valid
against the given schema. Object schemas that leave `additionalProperties` unset are
closed, strict or not (OpenAI's strict mode demands it; xgrammar and so vLLM do the same by
default): the output still validates, and a weak model cannot add keys forever. An
explicit `additionalProperties` is kept.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from moestream.engine.constraints import Grammar, GrammarCompiler, GrammarError
from moestream.server.errors import APIError


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    # "schema" shadows a BaseModel attribute, hence the alias
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema object: {\"name\": ..., \"schema\": {...}}")
        return self

    def grammar(self) -> Grammar | None:
        if self.type == "json_object":
            return Grammar.json_schema({"type": "object"})
        if self.type == "json_schema":
            schema = self.json_schema.json_schema or {"type": "object"}
            return Grammar.json_schema(closed_objects(schema))
        return None


def closed_objects(schema: Any) -> Any:
    """`schema` with `additionalProperties: false` on every object schema that leaves it unset."""
    if isinstance(schema, list):
        return [closed_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: closed_objects(value) if key != "const" and key != "enum" else value
              for key, value in schema.items()}
    if "properties" in closed and "additionalProperties" not in closed:
        closed["additionalProperties"] = False
    return closed


async def check_grammar(grammars: GrammarCompiler, grammar: Grammar | None, param: str) -> None:
    """A 400 naming `param` if the grammar does not compile (compiled off the event loop)."""
    if grammar is None:
        return
    try:
        await asyncio.to_thread(grammars.check, grammar)
    except GrammarError as exc:
        raise APIError(str(exc), param=param, code="invalid_schema") from None
