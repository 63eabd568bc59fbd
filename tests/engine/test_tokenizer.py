"""Tokenizer parity with llama.cpp on its own test vectors (models/ggml-vocab-*.gguf).

Each vocab file comes with `.inp` strings and `.out` ids that llama.cpp produced with
add_special=false, parse_special=false. Every file in shared_data/tokenizer is checked, and
so is every file in $MOESTREAM_EXTRA_VOCAB_DIR when set (e.g. the whole models/ folder of
the llama-cpp-python sdist). Families whose tokenizer model moestream does not implement
(WordPiece, Unigram, RWKV, ...) must fail to load with the clear "unsupported" error.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest

from moestream.engine.tokenizer import StreamDecoder, Tokenizer
from moestream.kernels.errors import MoestreamError
from tests.conftest import SHARED_DATA

SEPARATOR = "\n__ggml_vocab_test__\n"
UNSUPPORTED_MODELS = {"bert", "t5", "rwkv", "plamo2", "no_vocab", "none", "hybriddna",
                      "whitespace", "test"}
EXTRA_DIR = os.environ.get("MOESTREAM_EXTRA_VOCAB_DIR")


def _vocab_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("ggml-vocab-*.gguf") if Path(f"{p}.inp").exists())


def _same_test_file(a: Path, b: Path) -> bool:
    return all(Path(f"{a}{ext}").read_bytes() == Path(f"{b}{ext}").read_bytes()
               for ext in (".inp", ".out")) and a.stat().st_size == b.stat().st_size


def _all_vocab_files() -> list[tuple[str, Path]]:
    shared = _vocab_files(SHARED_DATA / "tokenizer")
    files = [(p.name.removeprefix("ggml-vocab-").removesuffix(".gguf"), p) for p in shared]
    if EXTRA_DIR:
        by_name = {p.name: p for p in shared}
        for p in _vocab_files(Path(EXTRA_DIR)):
            if p.name in by_name and _same_test_file(p, by_name[p.name]):
                continue  # the very same file is already checked from shared_data
            files.append(("extra-" + p.name.removeprefix("ggml-vocab-").removesuffix(".gguf"), p))
    return files


VOCAB_FILES = _all_vocab_files()
NO_VOCAB_FILES = (f"no llama.cpp tokenizer test vectors: {SHARED_DATA / 'tokenizer'} is absent and "
                  "MOESTREAM_EXTRA_VOCAB_DIR is not set (.ci/run sets it to the llama-cpp-python sdist's models/)")


@dataclass
class VocabCase:
    name: str
    path: Path
    model: str
    texts: list[str]
    expected: list[list[int]]
    tokenizer: Tokenizer | None
    error: str | None


def _read_cases(path: Path) -> tuple[list[str], list[list[int]]]:
    texts = Path(f"{path}.inp").read_text(encoding="utf-8").split(SEPARATOR)
    if texts and texts[-1] == "":
        texts.pop()  # the file ends with a separator
    lines = Path(f"{path}.out").read_text(encoding="utf-8").split("\n")
    expected = [[int(x) for x in line.split()] for line in lines[: len(texts)]]
    assert len(expected) == len(texts), f"{path}: .inp and .out disagree on the number of tests"
    return texts, expected


@pytest.fixture(scope="module", ids=[n for n, _ in VOCAB_FILES] or ["none"],
                params=VOCAB_FILES or [pytest.param(None, marks=pytest.mark.skip(reason=NO_VOCAB_FILES))])
def vocab(request) -> VocabCase:
    """One vocab file, loaded once for all the tests that use it (pytest groups them)."""
    name, path = request.param
    reader = gguf.GGUFReader(str(path))
    model = reader.get_field("tokenizer.ggml.model").contents()
    texts, expected = _read_cases(path)
    try:
        return VocabCase(name, path, model, texts, expected, Tokenizer.from_reader(reader), None)
    except MoestreamError as e:
        return VocabCase(name, path, model, texts, expected, None, str(e))


def _supported(case: VocabCase) -> Tokenizer | None:
    """The tokenizer, or None after checking the family is one declared unsupported."""
    if case.tokenizer is None:
        assert case.model in UNSUPPORTED_MODELS, f"{case.path.name}: failed to load: {case.error}"
        assert "unsupported tokenizer model" in case.error and repr(case.model) in case.error
    return case.tokenizer


def test_shared_vocab_files_are_present():
    if not VOCAB_FILES:
        pytest.skip(NO_VOCAB_FILES)
    names = {n.removeprefix("extra-") for n, _ in VOCAB_FILES}
    assert {"gpt-2", "mpt", "qwen2", "llama-spm", "phi-3", "deepseek-coder"} <= names


if EXTRA_DIR:
    def test_extra_vocab_dir_has_test_files():
        assert _vocab_files(Path(EXTRA_DIR)), f"no ggml-vocab-*.gguf with .inp in {EXTRA_DIR}"


def test_encode_matches_llama_cpp(vocab: VocabCase):
    tok = _supported(vocab)
    if tok is None:
        return
    wrong = [(text, want, tok.encode(text)) for text, want in zip(vocab.texts, vocab.expected)
             if tok.encode(text) != want]
    assert not wrong, "\n".join(f"{t!r}: llama.cpp {w} ours {g}" for t, w, g in wrong[:5])


def test_decode_round_trips(vocab: VocabCase):
    tok = _supported(vocab)
    if tok is None:
        return
    wrong = [(t, tok.decode(tok.encode(t))) for t in vocab.texts if tok.decode(tok.encode(t)) != t]
    assert not wrong, "\n".join(f"{t!r} -> {d!r}" for t, d in wrong[:5])


def test_stream_decoder_rebuilds_text(vocab: VocabCase):
    tok = _supported(vocab)
    if tok is None:
        return
    for text, ids in zip(vocab.texts, vocab.expected):
        decoder = StreamDecoder(tok)
        deltas = [decoder.push(i) for i in ids]
        # streamed pieces are llama.cpp's token_to_piece: the SentencePiece prefix space stays
        want = " " + text if tok.vocab.add_space_prefix and text else text
        assert "".join(deltas) + decoder.flush() == want
        # a character split over byte tokens is held back, never emitted as U+FFFD
        assert "\ufffd" in text or not any("\ufffd" in d for d in deltas)
    lead_byte = [i for i in range(tok.vocab_size) if tok.token_bytes(i) == b"\xe2"]
    assert lead_byte, "no token for the single byte 0xE2"
    decoder = StreamDecoder(tok)
    assert decoder.push(lead_byte[0]) == ""  # the start of a 3-byte character: held back
    assert decoder.flush() == "\ufffd"


def _special_texts(tok: Tokenizer) -> list[str]:
    return [tok.token_text(i) for i in range(tok.vocab_size) if tok.is_special(i)]


def test_parse_special_cuts_control_tokens(vocab: VocabCase):
    """llama.cpp tokenizes the text on each side of a parsed control token on its own, so
    '<ctrl>' + s gives [ctrl] + tokens(s) (a SentencePiece space prefix follows the token)."""
    tok = _supported(vocab)
    if tok is None:
        return
    control = tok.eos_id if tok.eos_id is not None and tok.is_special(tok.eos_id) else \
        next(i for i in range(tok.vocab_size) if tok.is_special(i))
    ctext = tok.token_text(control)
    specials = _special_texts(tok)
    cases = [(t, ids) for t, ids in zip(vocab.texts, vocab.expected)
             if t and not any(s in ctext + t for s in specials if s != ctext)][:12]
    for text, ids in cases:
        assert tok.encode(ctext + text, parse_special=True) == [control] + ids, repr(text)
    assert control not in tok.encode(ctext, parse_special=False)


# add_bos as llama.cpp applies it to these models (SentencePiece and deepseek-coder add BOS).
KNOWN_ADD_BOS = {"llama-spm": True, "phi-3": True, "deepseek-coder": True, "gpt-2": False,
                 "mpt": False, "qwen2": False, "extra-llama-bpe": True}
# Tokens that must end generation (chat turn ends and end-of-text).
KNOWN_EOS = {"qwen2": {"<|im_end|>", "<|endoftext|>"}, "llama-spm": {"</s>"},
             "phi-3": {"<|end|>", "<|endoftext|>"}, "mpt": {"<|endoftext|>"},
             "gpt-2": {"<|endoftext|>"}}


def test_add_special_adds_bos_and_eos(vocab: VocabCase):
    tok = _supported(vocab)
    if tok is None:
        return
    if vocab.name in KNOWN_ADD_BOS:
        assert tok.add_bos is KNOWN_ADD_BOS[vocab.name]
    text, ids = next((t, i) for t, i in zip(vocab.texts, vocab.expected) if i)
    bos = [tok.bos_id] if tok.add_bos else []
    eos = [tok.eos_id] if tok.vocab.add_eos else []
    assert tok.encode(text, add_special=True) == bos + ids + eos


def test_eos_ids(vocab: VocabCase):
    tok = _supported(vocab)
    if tok is None:
        return
    assert tok.eos_id in tok.eos_ids
    assert KNOWN_EOS.get(vocab.name, set()) <= {tok.token_text(i) for i in tok.eos_ids}


def _write_vocab(path: Path, model: str, pre: str | None, with_tensor: bool = False) -> Path:
    """A tiny byte-level BPE vocab: 'a', 'b', 'ab', 'Ġ', 'Ġab' with merges a+b and Ġ+ab."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(["<|endoftext|>", "a", "b", "ab", "Ġ", "Ġab"])
    writer.add_token_types([3, 1, 1, 1, 1, 1])
    writer.add_token_merges(["a b", "Ġ ab"])
    writer.add_eos_token_id(0)
    if with_tensor:
        writer.add_tensor("token_embd.weight", np.zeros((6, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_from_gguf_reads_a_model_file_with_tensors(tmp_path: Path):
    tok = Tokenizer.from_gguf(_write_vocab(tmp_path / "m.gguf", "gpt2", "gpt-2", with_tensor=True))
    assert tok.encode("ab ab") == [3, 5]
    assert tok.encode("<|endoftext|>ab", parse_special=True) == [0, 3]
    assert tok.eos_ids == {0} and tok.vocab_size == 6


@pytest.mark.parametrize("model,pre,message", [
    ("gpt2", "made-up-pre", "'made-up-pre'"),
    ("made-up-model", "gpt-2", "'made-up-model'"),
    ("bert", None, "unsupported tokenizer model"),
])
def test_unknown_tokenizer_types_are_errors(tmp_path: Path, model: str, pre: str | None, message: str):
    path = _write_vocab(tmp_path / "v.gguf", model, pre)
    with pytest.raises(MoestreamError, match=re.escape(message)):
        Tokenizer.from_gguf(path)
