"""One request's tokens -> text deltas: incremental detokenization, stop strings, metrics.

Chat and completions, streaming or not, all read a request through `Generation.deltas()`.
Leaving the iteration early (client gone, cancelled) aborts the sequence, which frees
its KV blocks; a stop string also aborts it and finishes with reason "stop".
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from moestream.engine.sequence import TokenLogprob
from moestream.engine.tokenizer import StreamDecoder, Tokenizer
from moestream.server.async_engine import AsyncEngine, EngineFailed, RequestStream, TokenEvent
from moestream.server.metrics import RequestRecord, ServerMetrics
from moestream.server.stops import StopMatcher


@dataclass
class Delta:
    text: str
    logprobs: list[TokenLogprob]  # the tokens consumed since the last delta (when asked for)
    finish_reason: str | None = None


@dataclass
class Generation:
    engine: AsyncEngine
    stream: RequestStream
    tokenizer: Tokenizer
    stops: list[str]
    metrics: ServerMetrics
    record: RequestRecord
    finish_reason: str | None = None
    _pending: list[TokenLogprob] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._decoder = StreamDecoder(self.tokenizer)
        self._matcher = StopMatcher(self.stops)

    def show_special_tokens(self) -> None:
        """Keep control tokens in the text (call before reading deltas)."""
        self._decoder = StreamDecoder(self.tokenizer, skip_special=False)

    @property
    def usage(self) -> dict:
        prompt, completion = self.stream.num_prompt_tokens, self.record.num_generated
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": self.stream.num_cached_tokens}}

    async def deltas(self) -> AsyncIterator[Delta]:
        try:
            async for event in self.stream:
                delta = self._on_token(event)
                if delta is not None:
                    yield delta
                if self.finish_reason is not None:
                    return
        except EngineFailed:
            self.finish_reason = "error"
            raise
        finally:
            if self.finish_reason is None:  # the reader left early
                self.engine.abort(self.stream.seq_id)
                self.finish_reason = "abort"
            self.metrics.observe_finish(self.record, self.finish_reason)

    def _on_token(self, event: TokenEvent) -> Delta | None:
        self.metrics.observe_token(self.record, event.time_s, self.stream.scheduled_s)
        if event.logprob is not None:
            self._pending.append(event.logprob)
        ends = event.finish_reason is not None
        # The end-of-sequence token that stopped the request is not part of the text.
        is_eos = event.finish_reason == "stop" and event.token_id in self.tokenizer.eos_ids
        text = "" if is_eos else self._decoder.push(event.token_id)
        if ends:
            text += self._decoder.flush()
        text = self._matcher.push(text)
        if self._matcher.is_stopped:
            if not ends:
                self.engine.abort(self.stream.seq_id)
            self.finish_reason = "stop"
        elif ends:
            text += self._matcher.flush()
            self.finish_reason = event.finish_reason
        if not text and self.finish_reason is None:
            return None
        logprobs, self._pending = self._pending, []
        return Delta(text, logprobs, self.finish_reason)
