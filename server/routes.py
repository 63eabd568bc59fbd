"""The OpenAI endpoints: /v1/chat/completions, /v1/completions, /v1/models; and /health."""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from moestream.kernels.errors import MoestreamError
from moestream.server.async_engine import EngineFailed
from moestream.server.errors import APIError, bad_request
from moestream.server.generation import Delta, Generation
from moestream.server.responses import Envelope, chat_logprobs, completion_logprobs, sse
from moestream.server.schemas import ChatCompletionRequest, CompletionRequest
from moestream.server.state import ServerState
from moestream.server.structured import check_grammar
from moestream.server.tool_calls import ToolCallStream, ToolDialect, opener_is_control
from moestream.server.tools import plan_tools

router = APIRouter()
_DISCONNECT_POLL_S = 0.5


def _state(request: Request) -> ServerState:
    return request.app.state.server


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    state = _state(request)
    if state.draining_since_s is not None:
        return APIError("the server is shutting down", "unavailable_error").response()
    if state.engine is None:
        return APIError("loading model", "unavailable_error").response()
    return JSONResponse({"status": "ok"})


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    return {"object": "list", "data": [_model_card(_state(request))]}


@router.get("/v1/models/{model:path}")
async def get_model(model: str, request: Request) -> dict:
    state = _state(request)
    state.check_model(model)
    return _model_card(state)


def _model_card(state: ServerState) -> dict:
    return {"id": state.settings.served_model_name, "object": "model", "created": state.created,
            "owned_by": "moestream", "max_model_len": state.engine.engine.max_model_len}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    arrival_s = time.monotonic()
    state = _state(request)
    model = state.check_model(body.model)
    engine = state.engine.engine
    messages, tools = plan_tools(engine.chat_template, [m.as_template_input() for m in body.messages],
                                 body.tools, body.tool_choice, body.parallel_tool_calls, engine.tokenizer)
    try:
        prompt_ids = await asyncio.to_thread(engine.chat_prompt_ids, messages, **tools.template_vars)
    except MoestreamError as exc:
        raise bad_request(exc, "messages") from None
    _check_logit_bias(body.token_bias, engine.config.vocab_size)
    logprobs = body.num_logprobs
    grammar = tools.grammar or body.grammar
    await check_grammar(engine.grammars, grammar, "tools" if tools.grammar else "response_format")
    gen = await state.start(prompt_ids, lambda n: body.sampling_params(n, logprobs, grammar),
                            body.requested_max_tokens, body.stop_strings, arrival_s, "messages")
    if tools.dialect is not None and opener_is_control(tools.dialect, engine.tokenizer):
        gen.show_special_tokens()  # the calls start with a control token: keep it in the text
    envelope = Envelope.new("chat.completion.chunk" if body.stream else "chat.completion", model, "chatcmpl")
    fmt = ChatFormat(gen, envelope, logprobs is not None, tools.dialect)
    if body.stream:
        return _event_stream(fmt.events(body.include_usage))
    return await _respond_unless_gone(request, fmt.response)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    arrival_s = time.monotonic()
    state = _state(request)
    model = state.check_model(body.model)
    prompt_ids = body.prompt
    if isinstance(prompt_ids, str):
        engine = state.engine.engine
        try:
            engine.check_prompt_text(prompt_ids)
        except MoestreamError as exc:
            raise bad_request(exc, "prompt") from None
        prompt_ids = await asyncio.to_thread(engine.tokenizer.encode, prompt_ids, add_special=True,
                                             parse_special=True)
    _check_logit_bias(body.token_bias, state.engine.engine.config.vocab_size)
    grammar = body.grammar
    await check_grammar(state.engine.engine.grammars, grammar, "response_format")
    gen = await state.start(prompt_ids, lambda n: body.sampling_params(n, body.logprobs, grammar),
                            body.max_tokens, body.stop_strings, arrival_s, "prompt")
    envelope = Envelope.new("text_completion", model, "cmpl")
    fmt = CompletionFormat(gen, envelope, body.logprobs is not None)
    if body.stream:
        return _event_stream(fmt.events(body.include_usage))
    return await _respond_unless_gone(request, fmt.response)


def _check_logit_bias(bias: tuple[tuple[int, float], ...], vocab_size: int) -> None:
    bad = [t for t, _ in bias if not 0 <= t < vocab_size]
    if bad:
        raise APIError(f"logit_bias names token {bad[0]}, outside the vocabulary (0..{vocab_size - 1})",
                       param="logit_bias")


class _EventStream(StreamingResponse):
    """Closes its event generator however the response ends, so a client that hung up
    aborts its sequence now rather than when the generator is garbage-collected."""

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()


def _event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    return _EventStream(events, media_type="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _respond_unless_gone(request: Request, respond: Callable) -> Response:
    """Run a non-streaming response; a client that hangs up cancels it (and its sequence)."""
    task = asyncio.ensure_future(respond())
    while True:
        done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
        if done:
            try:
                return JSONResponse(task.result())
            except EngineFailed as exc:
                return APIError(str(exc), exc.error_type).response()
        if await request.is_disconnected():
            task.cancel()
            return Response(status_code=499)


def _error_event(exc: EngineFailed) -> str:
    return sse(APIError(str(exc), exc.error_type).body())


@dataclass
class _Format(ABC):
    gen: Generation
    envelope: Envelope
    want_logprobs: bool

    async def collect(self) -> tuple[str, list, str]:
        text, records = [], []
        async with aclosing(self.gen.deltas()) as deltas:
            async for delta in deltas:
                text.append(delta.text)
                records += delta.logprobs
        return "".join(text), records, self.gen.finish_reason

    async def events(self, include_usage: bool) -> AsyncIterator[str]:
        extra = {"usage": None} if include_usage else {}
        try:
            for choice in self.opening():
                yield sse(self.envelope.body([choice], **extra))
            async with aclosing(self.gen.deltas()) as deltas:
                async for delta in deltas:
                    for choice in self.chunk_choices(delta):
                        yield sse(self.envelope.body([choice], **extra))
        except EngineFailed as exc:
            yield _error_event(exc)
            return
        if include_usage:
            yield sse(self.envelope.body([], usage=self.gen.usage))
        yield sse("[DONE]")

    def opening(self) -> list[dict]:
        return []

    @abstractmethod
    def chunk_choices(self, delta: Delta) -> list[dict]:
        """The stream choices one delta becomes."""

    @abstractmethod
    async def response(self) -> dict:
        """The whole (non-streaming) response body."""


@dataclass
class ChatFormat(_Format):
    dialect: ToolDialect | None = None  # the markup of tool calls, when the request has tools
    _calls: ToolCallStream | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.dialect is not None:
            self._calls = ToolCallStream(self.dialect)

    def opening(self) -> list[dict]:
        return [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]

    def chunk_choices(self, delta: Delta) -> list[dict]:
        choices = []
        text, call_deltas = delta.text, []
        if self._calls is not None:
            text, call_deltas = self._calls.push(delta.text)
            if delta.finish_reason is not None:
                rest, more = self._calls.finish()
                text, call_deltas = text + rest, call_deltas + more
        if text or delta.logprobs:
            choices.append({"index": 0, "delta": {"content": text},
                            "logprobs": self._logprobs(delta.logprobs), "finish_reason": None})
        choices += [{"index": 0, "delta": {"tool_calls": [d]}, "logprobs": None, "finish_reason": None}
                    for d in call_deltas]
        if delta.finish_reason is not None:
            made_calls = self._calls is not None and self._calls.calls
            reason = "tool_calls" if made_calls and delta.finish_reason == "stop" else delta.finish_reason
            choices.append({"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason})
        return choices

    async def response(self) -> dict:
        text, records, finish_reason = await self.collect()
        message = {"role": "assistant", "content": text}
        if self.dialect is not None:
            content, calls = self.dialect.parse(text)
            if calls:
                message = {"role": "assistant", "content": content,
                           "tool_calls": [c.as_dict() for c in calls]}
                finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
        choice = {"index": 0, "message": message, "logprobs": self._logprobs(records),
                  "finish_reason": finish_reason}
        return self.envelope.body([choice], usage=self.gen.usage)

    def _logprobs(self, records: list) -> dict | None:
        return chat_logprobs(self.gen.tokenizer, records) if self.want_logprobs else None


class CompletionFormat(_Format):
    _offset: int = 0  # characters of completion text sent so far, for text_offset

    def chunk_choices(self, delta: Delta) -> list[dict]:
        choices = []
        if delta.text or delta.logprobs:
            choices.append({"index": 0, "text": delta.text, "logprobs": self._logprobs(delta.logprobs),
                            "finish_reason": None})
            self._offset += len(delta.text)
        if delta.finish_reason is not None:
            choices.append({"index": 0, "text": "", "logprobs": None,
                            "finish_reason": delta.finish_reason})
        return choices

    async def response(self) -> dict:
        text, records, finish_reason = await self.collect()
        choice = {"index": 0, "text": text, "logprobs": self._logprobs(records),
                  "finish_reason": finish_reason}
        return self.envelope.body([choice], usage=self.gen.usage)

    def _logprobs(self, records: list) -> dict | None:
        if not self.want_logprobs:
            return None
        return completion_logprobs(self.gen.tokenizer, records, self._offset)
