"""`/v1/responses` (OpenAI's Responses API) for text in and text out, streamed and not.

The request becomes a chat request (instructions as the system message, the input as
user/assistant turns, `text.format` as response_format) and runs through the same engine
path; the answer is one assistant message with one `output_text` part. Streaming sends the
Responses events in order (created, in_progress, output_item.added, content_part.added,
output_text.delta..., output_text.done, content_part.done, output_item.done, completed),
each as `event: <type>` and `data: <json>`; there is no [DONE].
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from moestream.kernels.errors import MoestreamError
from moestream.server.async_engine import EngineFailed
from moestream.server.errors import APIError, bad_request
from moestream.server.generation import Delta, Generation
from moestream.server.output_split import OutputSplit
from moestream.server.reasoning import plan_split
from moestream.server.routes import _event_stream, _respond_unless_gone, _state
from moestream.server.schemas import ChatCompletionRequest
from moestream.server.structured import check_grammar

router = APIRouter()


class _InputText(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["input_text", "output_text", "text"]
    text: str


class _InputMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[_InputText]

    def as_chat(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class _TextFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    def as_response_format(self) -> dict:
        if self.type != "json_schema":
            return {"type": self.type}
        return {"type": "json_schema", "json_schema": {"name": self.name or "output", "schema": self.json_schema,
                                                       "strict": self.strict}}


class _TextOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    format: _TextFormat | None = None


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    input: str | list[_InputMessage] = Field(min_length=1)
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stream: bool = False
    text: _TextOptions | None = None
    metadata: dict[str, str] | None = None

    def as_chat_request(self) -> ChatCompletionRequest:
        turns = [{"role": "user", "content": self.input}] if isinstance(self.input, str) \
            else [m.as_chat() for m in self.input]
        if self.instructions:
            turns = [{"role": "system", "content": self.instructions}, *turns]
        fmt = self.text.format if self.text is not None else None
        return ChatCompletionRequest(
            model=self.model, messages=turns, max_tokens=self.max_output_tokens, temperature=self.temperature,
            top_p=self.top_p, response_format=fmt.as_response_format() if fmt is not None else None)


class _Answer:
    """One response's ids and its body at each stage."""

    def __init__(self, body: ResponsesRequest, model: str, split: OutputSplit | None = None):
        self.request, self.model, self.split = body, model, split
        self.id, self.message_id = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
        self.created_at = int(time.time())

    def text_of(self, delta: Delta) -> str:
        """The answer's text in a delta (without the reasoning, when the model thinks)."""
        if self.split is None:
            return delta.text
        pieces = self.split.push(delta.text)
        if delta.finish_reason is not None:
            pieces += self.split.finish()
        return pieces.content

    def message(self, text: str, status: str) -> dict:
        content = [{"type": "output_text", "text": text, "annotations": []}] if status != "in_progress" else []
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant",
                "content": content}

    def body(self, status: str, output: list[dict], gen: Generation | None = None) -> dict:
        body = {"id": self.id, "object": "response", "created_at": self.created_at, "status": status,
                "model": self.model, "output": output, "error": None, "incomplete_details": None,
                "instructions": self.request.instructions, "metadata": self.request.metadata or {},
                "max_output_tokens": self.request.max_output_tokens, "parallel_tool_calls": False,
                "temperature": self.request.temperature, "top_p": self.request.top_p, "tool_choice": "none",
                "tools": [], "usage": None}
        if gen is not None:
            usage = gen.usage
            body["usage"] = {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"],
                             "total_tokens": usage["total_tokens"],
                             "input_tokens_details": usage["prompt_tokens_details"],
                             "output_tokens_details": {"reasoning_tokens": 0}}
            if gen.finish_reason == "length":
                body["status"], body["incomplete_details"] = "incomplete", {"reason": "max_output_tokens"}
        return body


@router.post("/v1/responses")
async def create_response(body: ResponsesRequest, request: Request) -> Response:
    arrival_s = time.monotonic()
    state = _state(request)
    model = state.check_model(body.model)
    try:
        chat = body.as_chat_request()
    except ValueError as exc:  # a bad text.format: the same message as on chat
        raise APIError(f"text.format: {exc}", param="text") from None
    engine = state.engine.engine
    try:
        prompt_ids = await asyncio.to_thread(engine.chat_prompt_ids, [m.as_template_input() for m in chat.messages])
    except MoestreamError as exc:
        raise bad_request(exc, "input") from None
    grammar = chat.grammar
    await check_grammar(engine.grammars, grammar, "text")
    gen = await state.start(prompt_ids, lambda n: chat.sampling_params(n, None, grammar),
                            chat.requested_max_tokens, [], arrival_s, "input")
    # a thinking model's reasoning is not part of the answer (not returned here yet)
    split = plan_split(engine.chat_template, state.settings.reasoning_format, None, engine.tokenizer, prompt_ids,
                       constrained=grammar is not None)
    if split is not None and split.needs_control_tokens:
        gen.show_special_tokens()
    answer = _Answer(body, model, split.make() if split is not None else None)
    if body.stream:
        return _event_stream(_events(answer, gen))

    async def respond() -> dict:
        parts = []
        async with aclosing(gen.deltas()) as deltas:
            async for delta in deltas:
                parts.append(answer.text_of(delta))
        text = "".join(parts)
        return answer.body("completed", [answer.message(text, "completed")], gen)

    return await _respond_unless_gone(request, respond)


def _event(payload: dict) -> str:
    return f"event: {payload['type']}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _events(answer: _Answer, gen: Generation) -> AsyncIterator[str]:
    seq = iter(range(1 << 30))

    def event(type: str, **fields) -> str:
        return _event({"type": type, "sequence_number": next(seq), **fields})

    where = {"item_id": answer.message_id, "output_index": 0, "content_index": 0}
    yield event("response.created", response=answer.body("in_progress", []))
    yield event("response.in_progress", response=answer.body("in_progress", []))
    yield event("response.output_item.added", output_index=0, item=answer.message("", "in_progress"))
    yield event("response.content_part.added", **where, part={"type": "output_text", "text": "", "annotations": []})
    parts = []
    try:
        async with aclosing(gen.deltas()) as deltas:
            async for delta in deltas:
                text = answer.text_of(delta)
                if text:
                    parts.append(text)
                    yield event("response.output_text.delta", **where, delta=text, logprobs=[])
    except EngineFailed as exc:
        yield event("error", code="server_error", message=str(exc), param=None)
        return
    text = "".join(parts)
    yield event("response.output_text.done", **where, text=text, logprobs=[])
    yield event("response.content_part.done", **where, part={"type": "output_text", "text": text, "annotations": []})
    item = answer.message(text, "completed")
    yield event("response.output_item.done", output_index=0, item=item)
    final = answer.body("completed", [item], gen)
    yield event("response.incomplete" if final["status"] == "incomplete" else "response.completed", response=final)
