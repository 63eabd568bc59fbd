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

from moestream.engine import SamplingParams
from moestream.kernels.errors import MoestreamError
from moestream.server.async_engine import EngineFailed
from moestream.server.errors import APIError, bad_request
from moestream.server.generation import Delta, Generation
from moestream.server.harmony import harmony_messages, is_harmony
from moestream.server.output_split import OutputSplit
from moestream.server.reasoning import SplitPlan, plan_split
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
    if is_harmony(engine.chat_template):
        messages = harmony_messages(messages)
    template_vars = dict(tools.template_vars)
    if body.reasoning_effort is not None:
        template_vars["reasoning_effort"] = body.reasoning_effort
    try:
        prompt_ids = await asyncio.to_thread(engine.chat_prompt_ids, messages, **template_vars)
    except MoestreamError as exc:
        raise bad_request(exc, "messages") from None
    _check_logit_bias(body.token_bias, engine.config.vocab_size)
    logprobs = body.num_logprobs
    grammar = tools.grammar or body.grammar
    await check_grammar(engine.grammars, grammar, "tools" if tools.grammar else "response_format")
    gens = await _start_choices(state, body.n, prompt_ids,
                                lambda n, i: body.sampling_params(n, logprobs, grammar, choice=i),
                                body.requested_max_tokens, body.stop_strings, arrival_s, "messages")
    split: SplitPlan | None = plan_split(engine.chat_template, state.settings.reasoning_format, tools.dialect,
                                         engine.tokenizer, prompt_ids, constrained=grammar is not None)
    if (tools.dialect is not None and opener_is_control(tools.dialect, engine.tokenizer)) or (
            split is not None and split.needs_control_tokens):
        for gen in gens:
            gen.show_special_tokens()  # calls or reasoning start with a control token: keep it in the text
    envelope = Envelope.new("chat.completion.chunk" if body.stream else "chat.completion", model, "chatcmpl")
    fmts = [ChatFormat(gen, envelope, logprobs is not None, i, tools.dialect, split.make() if split else None)
            for i, gen in enumerate(gens)]
    if body.stream:
        return _event_stream(stream_events(fmts, body.include_usage))
    return await _respond_unless_gone(request, lambda: respond_all(fmts))


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
    gens = await _start_choices(state, body.n, prompt_ids,
                                lambda n, i: body.sampling_params(n, body.logprobs, grammar, choice=i),
                                body.max_tokens, body.stop_strings, arrival_s, "prompt")
    envelope = Envelope.new("text_completion", model, "cmpl")
    fmts = [CompletionFormat(gen, envelope, body.logprobs is not None, i) for i, gen in enumerate(gens)]
    if body.stream:
        return _event_stream(stream_events(fmts, body.include_usage))
    return await _respond_unless_gone(request, lambda: respond_all(fmts))


async def _start_choices(state: ServerState, n: int, prompt_ids: list[int],
                         make_params: Callable[[int, int], SamplingParams], max_tokens: int | None,
                         stops: list[str], arrival_s: float, prompt_param: str) -> list[Generation]:
    """One sequence per choice, the prompt prefilled once and shared (engine.add_group);
    `make_params(max_tokens, choice)`."""
    return await state.start_choices(prompt_ids, make_params, n, max_tokens, stops, arrival_s, prompt_param)


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


async def stream_events(fmts: list[_Format], include_usage: bool) -> AsyncIterator[str]:
    """The SSE stream of one response: every choice's opening, then their chunks as they
    come (interleaved for n > 1), the usage chunk if asked for, and [DONE]."""
    envelope = fmts[0].envelope
    extra = {"usage": None} if include_usage else {}
    try:
        for fmt in fmts:
            for choice in fmt.opening():
                yield sse(envelope.body([choice], **extra))
        async with aclosing(merged([fmt.choices() for fmt in fmts])) as choices:
            async for choice in choices:
                yield sse(envelope.body([choice], **extra))
    except EngineFailed as exc:
        yield _error_event(exc)
        return
    if include_usage:
        yield sse(envelope.body([], usage=usage_of(fmts)))
    yield sse("[DONE]")


async def respond_all(fmts: list[_Format]) -> dict:
    """The non-streaming body of n choices; one failing cancels the others (and aborts them)."""
    tasks = [asyncio.ensure_future(fmt.choice()) for fmt in fmts]
    try:
        choices = await asyncio.gather(*tasks)
    finally:
        for task in tasks:  # after a failure the others stop too (a finished task ignores this)
            task.cancel()
    return fmts[0].envelope.body(list(choices), usage=usage_of(fmts))


async def merged(streams: list[AsyncIterator[dict]]) -> AsyncIterator[dict]:
    """The items of several async iterators as each comes; closing this closes them all."""
    if len(streams) == 1:
        async with aclosing(streams[0]) as only:
            async for item in only:
                yield item
        return
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(stream: AsyncIterator[dict]) -> None:
        try:
            async with aclosing(stream):
                async for item in stream:
                    queue.put_nowait(item)
            queue.put_nowait(end)
        except Exception as exc:  # handed to the reader, which raises it
            queue.put_nowait(exc)

    tasks = [asyncio.ensure_future(pump(s)) for s in streams]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item is end:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def usage_of(fmts: list[_Format]) -> dict:
    """The prompt counted once (as OpenAI does for n > 1), the completions summed."""
    usage = dict(fmts[0].gen.usage)
    usage["completion_tokens"] = sum(f.gen.usage["completion_tokens"] for f in fmts)
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return usage


@dataclass
class _Format(ABC):
    gen: Generation
    envelope: Envelope
    want_logprobs: bool
    index: int = 0  # the choice's index (n > 1: one format per choice)

    async def collect(self) -> tuple[str, list, str]:
        text, records = [], []
        async with aclosing(self.gen.deltas()) as deltas:
            async for delta in deltas:
                text.append(delta.text)
                records += delta.logprobs
        return "".join(text), records, self.gen.finish_reason

    async def choices(self) -> AsyncIterator[dict]:
        """The stream's choices after the opening ones, as the deltas come."""
        async with aclosing(self.gen.deltas()) as deltas:
            async for delta in deltas:
                for choice in self.chunk_choices(delta):
                    yield choice

    def opening(self) -> list[dict]:
        return []

    @abstractmethod
    def chunk_choices(self, delta: Delta) -> list[dict]:
        """The stream choices one delta becomes."""

    @abstractmethod
    async def choice(self) -> dict:
        """The whole (non-streaming) choice."""


@dataclass
class ChatFormat(_Format):
    dialect: ToolDialect | None = None  # the markup of tool calls, when the request has tools
    split: OutputSplit | None = None  # reasoning apart from content (server/reasoning.py)
    _calls: ToolCallStream | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.dialect is not None:
            self._calls = ToolCallStream(self.dialect)

    def opening(self) -> list[dict]:
        return [{"index": self.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None}]

    def chunk_choices(self, delta: Delta) -> list[dict]:
        if self.split is not None:
            return self._split_chunk_choices(delta)
        choices = []
        text, call_deltas = delta.text, []
        if self._calls is not None:
            text, call_deltas = self._calls.push(delta.text)
            if delta.finish_reason is not None:
                rest, more = self._calls.finish()
                text, call_deltas = text + rest, call_deltas + more
        if text or delta.logprobs:
            choices.append({"index": self.index, "delta": {"content": text},
                            "logprobs": self._logprobs(delta.logprobs), "finish_reason": None})
        choices += [{"index": self.index, "delta": {"tool_calls": [d]}, "logprobs": None, "finish_reason": None}
                    for d in call_deltas]
        if delta.finish_reason is not None:
            made_calls = self._calls is not None and self._calls.calls
            reason = "tool_calls" if made_calls and delta.finish_reason == "stop" else delta.finish_reason
            choices.append({"index": self.index, "delta": {}, "logprobs": None, "finish_reason": reason})
        return choices

    def _split_chunk_choices(self, delta: Delta) -> list[dict]:
        pieces = self.split.push(delta.text)
        if delta.finish_reason is not None:
            pieces += self.split.finish()
        deltas = [{"reasoning_content": pieces.reasoning}] if pieces.reasoning else []
        if pieces.content or (delta.logprobs and not deltas):
            deltas.append({"content": pieces.content})
        deltas += [{"tool_calls": [d]} for d in pieces.tool_calls]
        choices = [{"index": self.index, "delta": d, "logprobs": self._logprobs(delta.logprobs) if i == 0 else None,
                    "finish_reason": None} for i, d in enumerate(deltas)]
        if delta.finish_reason is not None:
            reason = "tool_calls" if self.split.calls and delta.finish_reason == "stop" else delta.finish_reason
            choices.append({"index": self.index, "delta": {}, "logprobs": None, "finish_reason": reason})
        return choices

    async def choice(self) -> dict:
        text, records, finish_reason = await self.collect()
        if self.split is not None:
            pieces = self.split.whole(text)
            content = pieces.content.strip() if self.split.calls else pieces.content
            message = {"role": "assistant", "content": content or (None if self.split.calls else ""),
                       "reasoning_content": pieces.reasoning or None}
            if self.split.calls:
                message["tool_calls"] = [c.as_dict() for c in self.split.calls]
                finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
            return {"index": self.index, "message": message, "logprobs": self._logprobs(records),
                    "finish_reason": finish_reason}
        message = {"role": "assistant", "content": text}
        if self.dialect is not None:
            content, calls = self.dialect.parse(text)
            if calls:
                message = {"role": "assistant", "content": content,
                           "tool_calls": [c.as_dict() for c in calls]}
                finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
        return {"index": self.index, "message": message, "logprobs": self._logprobs(records),
                "finish_reason": finish_reason}

    def _logprobs(self, records: list) -> dict | None:
        return chat_logprobs(self.gen.tokenizer, records) if self.want_logprobs else None


class CompletionFormat(_Format):
    _offset: int = 0  # characters of completion text sent so far, for text_offset

    def chunk_choices(self, delta: Delta) -> list[dict]:
        choices = []
        if delta.text or delta.logprobs:
            choices.append({"index": self.index, "text": delta.text, "logprobs": self._logprobs(delta.logprobs),
                            "finish_reason": None})
            self._offset += len(delta.text)
        if delta.finish_reason is not None:
            choices.append({"index": self.index, "text": "", "logprobs": None,
                            "finish_reason": delta.finish_reason})
        return choices

    async def choice(self) -> dict:
        text, records, finish_reason = await self.collect()
        return {"index": self.index, "text": text, "logprobs": self._logprobs(records),
                "finish_reason": finish_reason}

    def _logprobs(self, records: list) -> dict | None:
        if not self.want_logprobs:
            return None
        return completion_logprobs(self.gen.tokenizer, records, self._offset)
