"""Grammar masks (engine/constraints.py) against references computed here from token bytes,
and constrained generation inside continuous batching on the tiny OLMoE fixture."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from moestream.engine import SamplingParams
from moestream.engine.constraints import Grammar, GrammarCompiler, GrammarError, allowed_tokens
from moestream.engine.tokenizer import Tokenizer
from tests.engine.test_generate import run_all
from tests.fixtures.models import get_fixture, sample_token_ids

VOCABS = ["ggml-vocab-qwen2.gguf", "ggml-vocab-llama-spm.gguf"]  # byte-level BPE, SentencePiece
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12},
                   "ok": {"type": "boolean"},
                   "size": {"enum": ["S", "M", "L"]}},
    "required": ["name", "ok", "size"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module", params=VOCABS)
def compiler(request, shared_data) -> GrammarCompiler:
    tok = Tokenizer.from_gguf(shared_data / "tokenizer" / request.param)
    return GrammarCompiler(tok, tok.vocab_size + 5)  # padded logits, as a model may have


def ids_of(tok: Tokenizer, text: str) -> list[int]:
    """Tokens spelling exactly `text`: the canonical encoding, or character by character where
    that adds SentencePiece's space prefix. A character's own token is preferred to its byte
    token (<0x7B>): where the grammar forces text, llguidance allows only its usual spelling."""
    ids = tok.encode(text)
    if b"".join(tok.token_bytes(i) for i in ids) == text.encode():
        return ids
    single = {tok.token_bytes(i): i for i in range(tok.vocab_size)}  # the last (a NORMAL token) wins
    return [single[bytes([b])] for b in text.encode()]


def reference_allowed(tok: Tokenizer, pattern: str, prefix: bytes = b"") -> set[int]:
    """Tokens whose bytes keep `prefix` + bytes a prefix of some match of `pattern` (digits only,
    so a match prefix is a string of digits)."""
    allowed = set()
    for i in range(tok.vocab_size):
        raw = tok.token_bytes(i)
        if raw and not tok.is_special(i) and re.fullmatch(pattern, (prefix + raw).decode("latin-1")):
            allowed.add(i)
    return allowed


def test_regex_mask_equals_the_tokens_that_fit(compiler):
    tok = compiler._tokenizer
    constraint = compiler.start(Grammar("regex", "[0-9]{1,6}"))
    mask = allowed_tokens([constraint], compiler.n_vocab)[0]
    assert mask.shape == (compiler.n_vocab,)
    assert not mask[tok.vocab_size:].any(), "padding rows must never be allowed"
    expected = reference_allowed(tok, "[0-9]{1,6}")
    assert set(mask.nonzero().flatten().tolist()) == expected
    # After three digits: three more at most, and end-of-sequence is now allowed.
    three = ids_of(tok, "123")
    for t in three:
        assert constraint.accept(t)
    mask = allowed_tokens([constraint], compiler.n_vocab)[0]
    got = set(mask.nonzero().flatten().tolist())
    assert got - tok.eos_ids == reference_allowed(tok, "[0-9]{1,3}")
    assert tok.eos_ids & got, "an accepting grammar must allow end-of-sequence"


def test_json_schema_walk_accepts_a_valid_document_and_stops(compiler):
    """Some allowed token always continues the document (where the grammar forces text,
    llguidance allows only its usual spelling, so the walk follows the mask)."""
    tok = compiler._tokenizer
    rest = json.dumps({"name": "Ada", "ok": True, "size": "M"}).encode()
    constraint = compiler.start(Grammar.json_schema(SCHEMA))
    while rest:
        allowed = allowed_tokens([constraint], compiler.n_vocab)[0].nonzero().flatten().tolist()
        fits = [t for t in allowed if tok.token_bytes(t) and rest.startswith(tok.token_bytes(t))]
        assert fits, f"no allowed token continues {rest!r}"
        token = max(fits, key=lambda t: len(tok.token_bytes(t)))
        assert constraint.accept(token)
        rest = rest[len(tok.token_bytes(token)):]
    assert constraint.is_finished, "a closed object admits nothing more"


def test_json_schema_refuses_what_breaks_it(compiler):
    tok = compiler._tokenizer
    constraint = compiler.start(Grammar("lark", 'start: "{\\"ok\\": " %json {"type": "boolean"}'))
    for t in ids_of(tok, '{"ok": '):
        assert constraint.accept(t)
    mask = allowed_tokens([constraint], compiler.n_vocab)[0]
    allowed_text = {tok.token_bytes(i) for i in mask.nonzero().flatten().tolist()}
    assert allowed_text and all(b"true".startswith(t) or b"false".startswith(t) for t in allowed_text)


@pytest.mark.parametrize("bad", [{"type": "object", "properties": {"a": {"type": "nonsense"}}},
                                 {"type": "object", "properties": []}, [1, 2]])
def test_a_schema_that_is_not_a_schema_is_a_grammar_error(bad):
    tok = Tokenizer.from_gguf(get_fixture("olmoe").gguf_path)
    with pytest.raises(GrammarError):
        GrammarCompiler(tok, tok.vocab_size).check(Grammar.json_schema(bad))


def test_constrained_and_free_sequences_share_batches(engine_for):
    """Constrained rows give valid JSON; the free rows in the same steps are unchanged."""
    engine = engine_for("olmoe")
    fixture = get_fixture("olmoe")
    prompts = [sample_token_ids(fixture, n, seed=40 + n) for n in (5, 12, 8)]
    free = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    alone = run_all(engine, prompts[:1], free)[0]
    json_params = SamplingParams(max_tokens=200, temperature=0.8, seed=3, grammar=Grammar.json_schema(SCHEMA))
    seqs = [engine.add_request(prompts[0], free)] + [engine.add_request(p, json_params) for p in prompts[1:]]
    outputs = {seq.seq_id: [] for seq in seqs}
    reasons = {}
    while engine.has_work():
        for out in engine.step():
            outputs[out.seq_id].append(out.token_id)
            if out.finished:
                reasons[out.seq_id] = out.finish_reason
    assert outputs[seqs[0].seq_id] == alone
    for seq in seqs[1:]:
        assert reasons[seq.seq_id] == "stop"
        text = engine.tokenizer.decode(outputs[seq.seq_id], skip_special=True)
        jsonschema.validate(json.loads(text), SCHEMA)
