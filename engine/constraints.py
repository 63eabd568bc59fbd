"""Grammar-constrained decoding: per-sequence token masks from llguidance.

A request names a grammar (`Grammar`: a JSON schema, a Lark grammar or a regex) in its
SamplingParams; the engine gives its sequence a `Constraint`, a matcher in the grammar's
start state. Each step the sampler asks every constrained sequence for the tokens the
grammar allows next and masks the rest before anything else touches the logits; the
accepted token then advances the matcher. A grammar that accepts and can go no further
finishes the sequence ("stop"). llguidance was chosen by measurement (docs/STRUCTURED-OUTPUT.md).

The library sees our tokenizer's vocabulary as bytes (llama.cpp's token pieces), so masks are
right for byte-level BPE and SentencePiece vocabs alike; control tokens are marked with
llguidance's 0xFF prefix, so grammar text never matches them (a grammar names them as
`<[id]>`).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import llguidance
import llguidance.torch as llt
import torch

from moestream.engine.tokenizer import Tokenizer
from moestream.kernels.errors import MoestreamError

SPECIAL_MARK = b"\xff"  # llguidance's prefix for tokens that text can't produce
# JSON as OpenAI's structured outputs write it: no free whitespace (a model could otherwise
# pad with blanks forever), ", " and ": " between items. A Lark grammar's `%json {...}` takes
# them as the schema's "x-guidance" key.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_MATCHER_CACHE_SIZE = 64


class GrammarError(MoestreamError):
    """The grammar or schema does not compile; the server answers 400."""


@dataclass(frozen=True)
class Grammar:
    """What a request's output must match. `source`: a JSON schema as JSON text, Lark, or a regex."""

    kind: Literal["json_schema", "lark", "regex"]
    source: str

    @classmethod
    def json_schema(cls, schema: dict | bool) -> Grammar:
        return cls("json_schema", json.dumps(schema))  # key order kept: properties come out in it

    def to_llguidance(self) -> str:
        if self.kind == "json_schema":
            try:
                return llguidance.LLMatcher.grammar_from_json_schema(self.source, defaults=JSON_OPTIONS)
            except ValueError as e:
                raise GrammarError(f"the JSON schema is not a JSON object or boolean: {e}") from None
        if self.kind == "lark":
            return llguidance.LLMatcher.grammar_from_lark(self.source)
        return llguidance.LLMatcher.grammar_from_regex(self.source)


class _TokenizerView:
    """What llguidance's TokenizerWrapper reads: token bytes, EOS/BOS, and text -> ids."""

    def __init__(self, tokenizer: Tokenizer, n_vocab: int):
        self._tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        self.special_token_ids = [i for i in range(tokenizer.vocab_size) if tokenizer.is_special(i)]
        special = set(self.special_token_ids)
        self.tokens = [SPECIAL_MARK + tokenizer.token_text(i).encode() if i in special
                       else tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        self.tokens += [b""] * (n_vocab - len(self.tokens))  # padding rows: no text, never allowed

        self._by_bytes = {raw: i for i, raw in reversed(list(enumerate(self.tokens))) if raw}
        self._longest = max(map(len, self._by_bytes))

    def __call__(self, text: str) -> list[int]:
        """Tokens spelling exactly `text` (llguidance tokenizes forced text with this)."""
        if isinstance(text, bytes):  # TokenizerWrapper probes with bytes; we take text only
            raise TypeError("text, not bytes")
        ids = self._tokenizer.encode(text)
        raw = text.encode()
        if b"".join(self._tokenizer.token_bytes(i) for i in ids) == raw:
            return ids
        return self._longest_match(raw)  # SentencePiece's space prefix added a space

    def _longest_match(self, raw: bytes) -> list[int]:
        ids, at = [], 0
        while at < len(raw):
            for n in range(min(self._longest, len(raw) - at), 0, -1):
                token = self._by_bytes.get(raw[at:at + n])
                if token is not None:
                    ids.append(token)
                    at += n
                    break
            else:
                raise ValueError(f"no token spells byte {raw[at]:#x}")
        return ids


def llg_tokenizer(tokenizer: Tokenizer, n_vocab: int | None = None) -> llguidance.LLTokenizer:
    """llguidance's view of our tokenizer; `n_vocab` the logits' width (padding never allowed)."""
    eos = sorted(tokenizer.eos_ids) or None
    view = _TokenizerView(tokenizer, max(n_vocab or 0, tokenizer.vocab_size))
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(view), eos_token=eos)


class Constraint:
    """One sequence's position in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher, n_vocab: int):
        self.matcher, self.n_vocab = matcher, n_vocab  # n_vocab: the library's mask width

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into row `row` of a packed int32 bitmask."""
        llt.fill_next_token_bitmask(self.matcher, bitmask, row)

    def accept(self, token_id: int) -> bool:
        """Advance by the sampled token; False if the grammar refused it."""
        return self.matcher.consume_token(token_id)

    @property
    def is_finished(self) -> bool:
        """The grammar accepted and allows nothing more (or the matcher failed)."""
        return self.matcher.is_stopped() or self.matcher.is_error()


class GrammarCompiler:
    """Compiles grammars for one tokenizer; hands each sequence a fresh matcher.

    Thread-safe: the server checks grammars off the engine thread (a bad one is a 400 before
    the request is queued), the engine starts matchers on its own. Compiled start states are
    kept (LRU) and copied, so a repeated schema costs a copy, not a compile.
    """

    def __init__(self, tokenizer: Tokenizer, n_vocab: int):
        self._tokenizer, self.n_vocab = tokenizer, n_vocab
        self._llg: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()
        self._start_state = lru_cache(maxsize=_MATCHER_CACHE_SIZE)(self._compile)

    @property
    def llg(self) -> llguidance.LLTokenizer:
        with self._lock:  # built on first use: a few seconds for a 150k vocab
            if self._llg is None:
                self._llg = llg_tokenizer(self._tokenizer, self.n_vocab)
            return self._llg

    def _compile(self, grammar: Grammar) -> llguidance.LLMatcher:
        matcher = llguidance.LLMatcher(self.llg, grammar.to_llguidance(), log_level=0)
        if matcher.is_error():
            raise GrammarError(f"the {grammar.kind.replace('_', ' ')} does not compile: {matcher.get_error()}")
        return matcher

    def check(self, grammar: Grammar) -> None:
        """Raise GrammarError if `grammar` does not compile (and keep it compiled)."""
        self._start_state(grammar)

    def start(self, grammar: Grammar) -> Constraint:
        return Constraint(self._start_state(grammar).deep_copy(), self.llg.vocab_size)


def allowed_tokens(constraints: list[Constraint], vocab_size: int) -> torch.Tensor:
    """[len(constraints), vocab_size] bool: the tokens each grammar allows next."""
    n_vocab = constraints[0].n_vocab  # one tokenizer per engine
    bitmask = llt.allocate_token_bitmask(len(constraints), n_vocab)
    for row, constraint in enumerate(constraints):
        constraint.fill_mask(bitmask, row)
    bits = torch.arange(32, dtype=torch.int32)
    unpacked = ((bitmask.unsqueeze(-1) >> bits) & 1).flatten(1).bool()  # little-endian bits per word
    allowed = torch.zeros(len(constraints), vocab_size, dtype=torch.bool)
    width = min(n_vocab, vocab_size)
    allowed[:, :width] = unpacked[:, :width]
    return allowed
