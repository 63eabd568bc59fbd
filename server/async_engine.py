"""The engine in its own thread; the event loop only moves tokens.

The engine is single-threaded, so every call into it (add, abort, step, stats) happens on
the engine thread. Requests and aborts reach it through a command queue; each step's
tokens go back to per-request asyncio queues with one `call_soon_threadsafe` per step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from moestream.engine import Engine, SamplingParams
from moestream.engine.sequence import Sequence, SequenceStatus, TokenLogprob

log = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.5  # how long the idle engine thread sleeps between command checks


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    logprob: TokenLogprob | None
    finish_reason: str | None  # "stop" | "length" from the engine, else None
    time_s: float  # time.monotonic() when the step that made it ended


class EngineFailed(RuntimeError):
    """The engine failed this request: a step raised (every request in flight gets this)
    or this request's own sampling did (it alone gets it)."""

    error_type = "server_error"


class ServerStopping(EngineFailed):
    """The drain's grace ran out before this request finished."""

    error_type = "unavailable_error"


@dataclass
class RequestStream:
    """One request's tokens as the engine produces them."""

    seq_id: int
    num_prompt_tokens: int
    scheduled_s: float | None = None  # set by the engine thread when first scheduled
    seq: Sequence | None = None  # the engine's record, read here only once a token has come
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    is_finished: bool = False

    @property
    def num_cached_tokens(self) -> int:
        """Prompt tokens the prefix cache served (set at admission, before any token)."""
        return (self.seq.num_cached_tokens or 0) if self.seq is not None else 0

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        while not self.is_finished:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                self.is_finished = True
                raise item
            self.is_finished = item.finish_reason is not None
            yield item


class AsyncEngine:
    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop):
        self.engine, self.loop = engine, loop
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[int, RequestStream] = {}
        self._stopping = False
        self.stats: dict = engine.stats()  # replaced (never mutated) after each step
        self._thread = threading.Thread(target=self._run, name="moestream-engine", daemon=True)

    def start(self) -> AsyncEngine:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stopping = True
        self._wakeup.set()
        self._thread.join(timeout_s)

    # -- called from the event loop -------------------------------------------------
    async def add(self, prompt_ids: list[int], params: SamplingParams) -> RequestStream:
        """Queue a request; raises what engine.add_request raises (bad prompt, QueueFull)."""
        return (await self.add_group(prompt_ids, [params]))[0]

    async def add_group(self, prompt_ids: list[int], params: list[SamplingParams]) -> list[RequestStream]:
        """Queue one sequence per settings on one prompt, prefilled once (engine.add_group)."""
        done: Future[list[RequestStream]] = Future()
        self._submit(lambda: self._add(prompt_ids, params, done))
        return await asyncio.wrap_future(done)

    def abort(self, seq_id: int) -> None:
        self._submit(lambda: self._abort(seq_id))

    def fail_all(self, error: EngineFailed) -> None:
        """End every request in flight with `error` (their streams send it as an event)."""
        self._submit(lambda: self._fail_all(error))

    def _submit(self, command: Callable[[], None]) -> None:
        self._commands.put(command)
        self._wakeup.set()

    # -- the engine thread ----------------------------------------------------------
    def _add(self, prompt_ids: list[int], params: list[SamplingParams], done: Future) -> None:
        try:
            seqs = self.engine.add_group(prompt_ids, params)
        except Exception as exc:  # handed to the caller, who maps it to an HTTP error
            done.set_exception(exc)
            return
        streams = [RequestStream(seq.seq_id, len(prompt_ids), seq=seq) for seq in seqs]
        for stream in streams:
            self._streams[stream.seq_id] = stream
        done.set_result(streams)

    def _abort(self, seq_id: int) -> None:
        if self._streams.pop(seq_id, None) is not None:
            self.engine.abort(seq_id)

    def _run(self) -> None:
        while not self._stopping:
            ran = self._drain_commands()
            if self.engine.has_work():
                self._step()
            else:
                if ran:
                    self.stats = self.engine.stats()
                self._wakeup.wait(_IDLE_WAIT_S)
                self._wakeup.clear()

    def _drain_commands(self) -> bool:
        ran = False
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return ran
            try:
                command()
            except Exception:  # an engine bug must not kill the thread every request waits on
                log.exception("engine command failed")
            ran = True

    def _step(self) -> None:
        start_s = time.monotonic()
        try:
            outputs = self.engine.step()
        except Exception as exc:
            log.exception("engine step failed; failing the requests in flight")
            self._fail_all(EngineFailed(f"the engine failed: {type(exc).__name__}: {exc}"))
            return
        end_s = time.monotonic()
        self._mark_scheduled(start_s)
        batch = []
        for out in outputs:
            stream = self._streams.get(out.seq_id)
            if stream is None:  # aborted while this step ran
                continue
            if out.error is not None:
                batch.append((stream, EngineFailed(f"the engine failed this request: {out.error}")))
            else:
                batch.append((stream, TokenEvent(out.token_id, out.logprob, out.finish_reason, end_s)))
            if out.finished:
                del self._streams[out.seq_id]
        if batch:
            self.loop.call_soon_threadsafe(_deliver, batch)
        self.stats = self.engine.stats()

    def _mark_scheduled(self, step_start_s: float) -> None:
        for stream in self._streams.values():
            if stream.scheduled_s is None:
                seq = self.engine.sequences.get(stream.seq_id)
                if seq is None or seq.status is not SequenceStatus.WAITING:
                    stream.scheduled_s = step_start_s

    def _fail_all(self, error: EngineFailed) -> None:
        batch = [(stream, error) for stream in self._streams.values()]
        for seq_id in list(self._streams):
            self._abort(seq_id)
        if batch:
            self.loop.call_soon_threadsafe(_deliver, batch)
        self.stats = self.engine.stats()


def _deliver(batch: list[tuple[RequestStream, TokenEvent | BaseException]]) -> None:
    for stream, item in batch:
        stream.queue.put_nowait(item)
