"""OpenAI response bodies and stream chunks, as plain dicts (openai-python's shapes)."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from importlib.metadata import version

from moestream.engine.sequence import TokenLogprob
from moestream.engine.tokenizer import Tokenizer


# Names the backend that made a response, as OpenAI's does (clients log it with seeds).
SYSTEM_FINGERPRINT = f"fp_moestream_{version('moestream')}"


@dataclass(frozen=True)
class Envelope:
    """What every chunk of one response repeats: id, object, created, model, fingerprint."""

    object: str
    model: str
    id: str
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def new(cls, object: str, model: str, id_prefix: str) -> Envelope:
        return cls(object, model, f"{id_prefix}-{uuid.uuid4().hex}")

    def body(self, choices: list[dict], **extra) -> dict:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "system_fingerprint": SYSTEM_FINGERPRINT, "choices": choices, **extra}


def sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def token_piece(tokenizer: Tokenizer, token_id: int) -> tuple[str, list[int]]:
    """A token's text alone and its bytes (a byte-level token may hold part of a character)."""
    raw = tokenizer.token_bytes(token_id)
    return raw.decode("utf-8", errors="replace"), list(raw)


def chat_logprobs(tokenizer: Tokenizer, records: list[TokenLogprob]) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        text, raw = token_piece(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": raw}

    content = [{**entry(r.token_id, r.logprob), "top_logprobs": [entry(t, lp) for t, lp in r.top]}
               for r in records]
    return {"content": content}


def completion_logprobs(tokenizer: Tokenizer, records: list[TokenLogprob], text_offset: int) -> dict:
    """The legacy format; `text_offset` is where the first record's text starts."""
    tokens, offsets = [], []
    for r in records:
        text, _ = token_piece(tokenizer, r.token_id)
        tokens.append(text)
        offsets.append(text_offset)
        text_offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [r.logprob for r in records],
        "top_logprobs": [{token_piece(tokenizer, t)[0]: lp for t, lp in r.top} for r in records],
        "text_offset": offsets,
    }
