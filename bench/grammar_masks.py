"""Compare grammar libraries for constrained decoding: `python -m bench.grammar_masks`.

For llguidance, xgrammar and outlines-core, on two vocabularies read from GGUF metadata
through our Tokenizer (Qwen2's ~151k byte-level BPE from shared/data, and the demo model's
1024 tokens), it prints: the time to build the library's tokenizer info from our token
bytes, the time to compile one JSON schema (a small nested object), and the time per
generated token to compute the next-token mask and advance by the chosen token, walking a
valid document token by token. One thread, the median of a few runs. xgrammar and
outlines-core are not dependencies: `pip install xgrammar outlines-core` first (or pass
`--libs llguidance`). `--decode` instead times the demo model's decode steps with and
without a JSON grammar (what constrained decoding adds to a step of our engine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from moestream.engine.tokenizer import Tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "role", "tags", "address"],
    "additionalProperties": False,
}
DOCUMENT = json.dumps({"name": "Ada Lovelace", "age": 36, "role": "admin", "tags": ["math", "engines"],
                       "address": {"city": "London", "zip": "W1"}})  # ", " and ": ", as all three are told


def timed(fn: Callable, repeat: int = 3) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def llguidance_run(tok: Tokenizer, ids: list[int]) -> tuple[float, float, float]:
    import llguidance
    import llguidance.torch as llt

    from moestream.engine.constraints import Grammar, llg_tokenizer

    info_s, info = timed(lambda: llg_tokenizer(tok), repeat=1)
    grammar = Grammar.json_schema(SCHEMA).to_llguidance()
    compile_s, matcher = timed(lambda: llguidance.LLMatcher(info, grammar))
    mask = llt.allocate_token_bitmask(1, tok.vocab_size)

    def walk() -> None:
        m = llguidance.LLMatcher(info, grammar)
        for t in ids:
            llt.fill_next_token_bitmask(m, mask)
            assert m.consume_token(t), m.get_error()
    return info_s, compile_s, timed(walk)[0] / len(ids)


def xgrammar_run(tok: Tokenizer, ids: list[int]) -> tuple[float, float, float]:
    import xgrammar as xgr

    vocab = [tok.token_bytes(i) for i in range(tok.vocab_size)]
    info_s, info = timed(lambda: xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=tok.vocab_size,
                                                   stop_token_ids=sorted(tok.eos_ids)), repeat=1)

    def compile_schema():
        return xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False).compile_json_schema(
            json.dumps(SCHEMA), any_whitespace=False, separators=(", ", ": "))
    compile_s, compiled = timed(compile_schema)
    mask = xgr.allocate_token_bitmask(1, tok.vocab_size)

    def walk() -> None:
        m = xgr.GrammarMatcher(compiled)
        for t in ids:
            m.fill_next_token_bitmask(mask)
            assert m.accept_token(t)
    return info_s, compile_s, timed(walk)[0] / len(ids)


def outlines_run(tok: Tokenizer, ids: list[int]) -> tuple[float, float, float]:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    eos = tok.eos_id
    by_bytes: dict[bytes, list[int]] = {}
    for i in range(tok.vocab_size):
        if i != eos and not tok.is_special(i) and tok.token_bytes(i):
            by_bytes.setdefault(tok.token_bytes(i), []).append(i)
    info_s, vocab = timed(lambda: Vocabulary(eos, by_bytes), repeat=1)
    regex = build_regex_from_schema(json.dumps(SCHEMA))
    compile_s, index = timed(lambda: Index(regex, vocab), repeat=1)
    mask = torch.zeros((tok.vocab_size + 31) // 32, dtype=torch.int32)

    def walk() -> None:
        g = Guide(index)
        for t in ids:
            g.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
            g.advance(t)
    return info_s, compile_s, timed(walk)[0] / len(ids)


def decode_overhead(n_tokens: int = 64) -> None:
    """Seconds per decode step of the demo engine, 4 sequences, free vs. each under a grammar
    that never ends early (a JSON string of any length), after a warm-up run."""
    from moestream.engine import Engine, SamplingParams
    from moestream.engine.constraints import Grammar
    from moestream.server.demo import demo_model_path

    engine = Engine.from_gguf(demo_model_path())
    prompt = engine.tokenizer.encode("a b c d e f")
    string = Grammar.json_schema({"type": "string"})
    for name, grammar in [("warm-up", None), ("free", None), ("JSON string", string), ("free", None)]:
        params = SamplingParams(max_tokens=n_tokens, temperature=1.0, seed=0, ignore_eos=True, grammar=grammar)
        for _ in range(4):
            engine.add_request(prompt, params)
        engine.step()  # prefill
        start, steps = time.perf_counter(), 0
        while engine.has_work():
            engine.step()
            steps += 1
        assert steps == n_tokens - 1, "a sequence ended early"
        print(f"{name:12} {(time.perf_counter() - start) / steps * 1e3:8.2f} ms per decode step (batch of 4)")


RUNS = {"llguidance": llguidance_run, "xgrammar": xgrammar_run, "outlines-core": outlines_run}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--libs", default=",".join(RUNS))
    parser.add_argument("--decode", action="store_true", help="time the demo engine's decode steps instead")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.decode:
        decode_overhead()
        return
    from moestream.server.demo import demo_model_path
    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "tokenizer"  # as tests/conftest.py
    vocabs = {"qwen2 (151k)": Tokenizer.from_gguf(data / "ggml-vocab-qwen2.gguf"),
              "demo (1024)": Tokenizer.from_gguf(demo_model_path())}
    print(f"load average: {os.getloadavg()[0]:.2f}")
    print(f"{'library':14} {'vocab':14} {'tokenizer info':>15} {'schema compile':>15} {'mask+advance/token':>19}")
    for vocab_name, tok in vocabs.items():
        ids = tok.encode(DOCUMENT)
        for lib in args.libs.split(","):
            info_s, compile_s, per_token_s = RUNS[lib](tok, ids)
            print(f"{lib:14} {vocab_name:14} {info_s * 1e3:12.1f} ms {compile_s * 1e3:12.2f} ms "
                  f"{per_token_s * 1e6:16.1f} us")


if __name__ == "__main__":
    main()
